// The AVX-512 build of the CPU kernels (F, BW, VL, DQ: what ATen's AVX512 capability requires),
// for half and bfloat16 only: their conversions are most of their work, and 16 lanes halve it.
// Float and double stay on the AVX2 build (see cpu_capability_for). As kernels_avx2.cpp is,
// this file is compiled with its extensions' flags (build_config.EXTENSION_KERNELS). Only called
// when the CPU has these extensions.
#define TORCH_BN_REDUCED_PRECISION_ONLY
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#else
// Built without those flags (not on x86-64), the AVX512 entry points forward to the portable
// build, which cpu_capability_for() picks there.
#define CPU_CAPABILITY AVX512
#include "kernels_impl.h"
#endif
