// Reading a run's values as vectors of the accumulation type: prefetches, widening loads, and
// the chunk buffers values are widened into.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <type_traits>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Inlines every call in the function's body. GCC does not inline ATen's bfloat16/half
// conversions (at::vec::convert_from_float and the like) into the larger loops on its own, and a
// call per 16 values costs as much as the loop's work.
#if defined(__GNUC__)
#define TORCH_BN_FLATTEN __attribute__((flatten))
#else
#define TORCH_BN_FLATTEN
#endif

// Values converted to the accumulation type per step: 16 KiB of float, so a chunk widened
// from half/bfloat16 stays in L1 while it is used.
constexpr int64_t kChunk = 4096;
// Bytes of a cache line, the unit a prefetch fetches.
constexpr int64_t kLineBytes = 64;

// Prefetches the cache lines of `bytes` bytes from `address` into L2 (prefetcht2). An address,
// not a pointer: ahead of the last piece of a pass it lies beyond the tensor (a prefetch does
// not fault). Always inlined, as is every function that calls it for a loop: GCC takes a
// function whose only effect is prefetching for one without side effects, and deletes a call it
// does not inline (FetchAhead::step, not inlined into the statistics loops, compiled to nothing
// so). The lines are wanted a stretch later, not now; fetched into L1 (prefetcht0) they
// probably held L1's few outstanding-miss slots, which the loop's own loads wait for.
// Interleaved A/B on the AMD EPYC VM (2 threads), into L2 against into L1: NCHW float32
// forward-train 1.12-1.3x faster at 56x56 and 28x28, backward 1.2-1.8x at 28x28, channels-last
// forward-train 1.2-1.4x at 56x56 and 28x28, bfloat16 NCHW backward 1.1-1.26x; 14x14 0.94-1.16x,
// 7x7 even.
C10_ALWAYS_INLINE void prefetch_lines(uintptr_t address, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += kLineBytes) {
    __builtin_prefetch(reinterpret_cast<const void*>(address + byte), /*rw=*/0, /*locality=*/1);
  }
}

// Prefetches the cache lines of `bytes` bytes from `address` for writing: prefetchw where the
// build has it (the extension builds, see build_config.py), else a read prefetch. A line written
// through the cache is first read for ownership, from memory where the output is not in the
// cache (a fresh activation); fetched ahead, those reads overlap the writes before them.
// Always inlined, as prefetch_lines is.
C10_ALWAYS_INLINE void prefetch_lines_for_write(uintptr_t address, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += kLineBytes) {
    __builtin_prefetch(reinterpret_cast<const void*>(address + byte), /*rw=*/1, /*locality=*/3);
  }
}

// One vector of the accumulation type from `src`: a plain load, or (half, bfloat16) a load of
// as many narrow values, widened in registers. The loops read x this way, so that reduced
// precision input is not widened into a buffer first.
template <typename acc_t, typename T>
inline Vectorized<acc_t> load(const T* src) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vectorized<acc_t>::loadu(src);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float(src, v);
    return v;
  }
}

// Calls use(i, value) for each of the n values of `src` in order, the value widened to double:
// half and bfloat16 a vector at a time. Value by value, the AVX-512 build widened each half
// through a vector register of its own: reading four 2048-channel half tensors took 5.6 µs of the
// evaluation operator's 15.9 µs (1x2048x1x1, one thread, AMD EPYC Zen 4 VM, perf), and
// sampled_mean a quarter of channels-last forward-train's time at 1x2048x7x7 float16.
template <typename T, typename F>
C10_ALWAYS_INLINE void for_each_as_double(const T* src, int64_t n, const F& use) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    constexpr int64_t V = Vectorized<float>::size();
    std::array<float, V> widened;
    for (; i + V <= n; i += V) {
      load<float>(src + i).store(widened.data());
      for (int64_t k = 0; k < V; ++k) {
        use(i + k, static_cast<double>(widened[k]));
      }
    }
  }
  for (; i < n; ++i) {
    use(i, static_cast<double>(src[i]));
  }
}

// A step of 2·V values (V = Vectorized<acc_t>::size()) as two vectors of the accumulation type,
// its lanes in an order that store_step undoes: bfloat16 on AVX2 by the parity of the position,
// the even values widened by a shift and the odd ones by a mask of one load, two instructions
// for 2·V values where widening V contiguous values takes two (a lane-crossing zero extension
// and a shift); and store_step narrows the odd lanes without a shift and merges the halves with
// one blend, where a contiguous pair needs a pack and a lane-crossing permute. Only loops whose
// per-channel values are the same in every lane (kSameInEveryLane), or that write and whose
// per-channel values are read in the steps' lanes too (kStepLanes), read steps, and only where
// the lanes are reordered (kParitySteps): elsewhere a step would be two plain vectors, and the
// float32 loops keep their vector code (given steps too, its input-gradient pass was no longer
// inlined into the planar loop, a call per plane). In a standalone loop over L2-resident data
// the input-gradient pass took 0.25-0.30 ns per value so against 0.30-0.33, the backward sums
// 0.09 against 0.115 (AMD EPYC VM, one thread).
template <typename T>
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kParitySteps = std::is_same_v<T, c10::BFloat16>;
#else
constexpr bool kParitySteps = false;
#endif

template <typename acc_t, typename T>
inline std::array<Vectorized<acc_t>, 2> load_step(const T* src) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(values, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(values, _mm256_set1_epi32(0xffff0000)))};
  }
#endif
  return {load<acc_t>(src), load<acc_t>(src + Vectorized<acc_t>::size())};
}

// Values a buffer for output_chunk() needs: none where the values are used in place.
template <typename scalar_t, typename acc_t>
constexpr int64_t chunk_buffer_size() {
  return std::is_same_v<scalar_t, acc_t> ? 0 : kChunk;
}

template <typename scalar_t, typename acc_t>
inline acc_t* output_chunk(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buffer;
  }
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
