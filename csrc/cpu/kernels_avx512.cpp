// The AVX-512 build of the CPU kernels (F, BW, VL, DQ: what ATen's AVX512 capability requires),
// for half and bfloat16 only: their conversions are most of their work, and 16 lanes halve it.
// Float and double stay on the AVX2 build (see cpu_capability_for). As in kernels_avx2.cpp, the
// target pragma precedes every include. Only called when the CPU has these extensions.
#define TORCH_BN_REDUCED_PRECISION_ONLY
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
// What the matching -m flags would predefine; Sleef's header declares its functions under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#else
// Elsewhere the AVX512 entry points forward to the portable build, which cpu_capability_for() picks.
#define CPU_CAPABILITY AVX512
#include "kernels_impl.h"
#endif
