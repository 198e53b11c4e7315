// The AVX2 + FMA build of the CPU kernels. setup.py compiles this file with -mavx2 -mfma -mf16c
// (build_config.EXTENSION_KERNELS), so that everything in it, ATen's AVX2 vector types and the
// functions the compiler defines implicitly included, is built for that target. Only called
// when the CPU has AVX2.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#else
// Built without those flags (not on x86-64), the AVX2 entry points forward to the portable
// build, which cpu_capability_for() picks there.
#define CPU_CAPABILITY AVX2
#include "kernels_impl.h"
#endif
