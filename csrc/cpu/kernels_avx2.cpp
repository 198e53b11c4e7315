// The AVX2 + FMA build of the CPU kernels. The target pragma stands in for per-file compiler
// flags (setuptools has none) and must precede every include, so that ATen's AVX2 vector types
// and the intrinsics they use are compiled for that target. Only called when the CPU has AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c")
// What -mavx2 -mfma would predefine; Sleef's header declares its AVX2 functions only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#else
// Elsewhere the AVX2 entry points forward to the portable build, which cpu_capability_for() picks.
#define CPU_CAPABILITY AVX2
#include "kernels_impl.h"
#endif
