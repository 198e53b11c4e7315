// How a run's values reach memory: through the cache, streamed past it whole lines at a time, or
// staged; narrowed to half or bfloat16 on the way.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "vector_loads.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

// How a run's vectors reach memory. Through the cache, or, for an output too large to stay in
// the last-level cache, with non-temporal stores that skip it: the store then needs no read of
// the line first, and the output does not evict the input that a second pass, or the next call,
// is about to read. On the 2-core AMD EPYC VM (1 MiB L2, 32 MiB L3), forward-eval at
// 32x256x56x56 float32 took 5.0 ms so against 8.1 ms (the input and output are 103 MB each),
// forward-train 9.7 against 11.4 (interleaved A/B, 2 threads; which outputs stream, see
// streams_output in cache_policy.h). A run is streamed only when it is whole cache lines: a line
// shared with the neighbouring run, written by plain stores, would cost a partial
// write-combining flush. Streaming every line inside each run made evaluation at
// 32x1024x14x14 (784-byte planes) twice as slow as not streaming it; StagedStores streams such
// runs where a pass reads its input from cache, SharedLineStores where it reads from memory.
class RunStores {
 public:
  RunStores(const void* y, int64_t bytes, bool stream) : stream_(stream && whole_lines(y, bytes)) {}

  static bool whole_lines(const void* y, int64_t bytes) {
    return reinterpret_cast<uintptr_t>(y) % kLineBytes == 0 && bytes % kLineBytes == 0;
  }

  template <typename Vec, typename T>
  void put(const Vec& v, T* y) const {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    // Every vector of such a run is aligned: the run is a multiple of 64 bytes, and so of V.
    if (stream_) {
      stream(v, y);
      return;
    }
#endif
    v.store(y);
  }

 private:
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  template <typename Vec, typename T>
  static void stream(const Vec& v, T* y) {
    if constexpr (sizeof(Vec) == 32) {
      __m256i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(y), bits);
#if defined(CPU_CAPABILITY_AVX512)
    } else if constexpr (sizeof(Vec) == 64) {
      __m512i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm512_stream_si512(reinterpret_cast<__m512i*>(y), bits);
#endif
    } else {
      v.store(y);
    }
  }
#endif

  bool stream_;
};

// Makes a task's non-temporal stores visible before it reports done: they are weakly ordered.
inline void fence_streamed_stores() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Where a run's values go, and whether they are streamed there (RunStores).
template <typename T>
struct RunDestination {
  T* values;
  bool stream;
};

// Moves a line from a buffer to its place `dst` in the output through RunStores, as float
// vectors whatever T is: the bytes are only moved.
template <typename T>
inline void stream_line(const T* src, T* dst) {
  using Vec = Vectorized<float>;
  const RunStores stores(dst, kLineBytes, /*stream=*/true);
  const auto* from = reinterpret_cast<const float*>(src);
  auto* to = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < kLineBytes / static_cast<int64_t>(sizeof(float)); i += Vec::size()) {
    stores.put(Vec::loadu(from + i), to + i);
  }
}

// Streams an output whose runs are not whole cache lines (NCHW planes of 14x14 float32 are 784
// bytes): consecutive runs are gathered in an 8 KiB buffer, which stays in L1, and written out a
// line at a time, with non-temporal stores but for the partial lines at either end of a stretch
// of consecutive runs, which plain stores share with the neighbouring stretches. Streaming each
// run's whole lines alone leaves two partial lines per run, each a read from memory that no
// prefetcher foresees (see RunStores). What is staged is written out by the destructor, so a
// task's stage must be gone before its fence_streamed_stores().
template <typename T>
class StagedStores {
 public:
  StagedStores() = default;
  StagedStores(const StagedStores&) = delete;
  StagedStores& operator=(const StagedStores&) = delete;
  ~StagedStores() {
    drain(/*keep_tail=*/false);
  }

  // Where the n values of the run at `dst` are to be written: the buffer (plain stores) for a
  // streamed run that is not whole lines and fits, otherwise `dst` itself.
  RunDestination<T> place(T* dst, int64_t n, bool stream) {
    if (!stream || RunStores::whole_lines(dst, n * static_cast<int64_t>(sizeof(T))) || n > kCapacity - kLineValues) {
      return {dst, stream};
    }
    if (pending_ > 0 && dst == base_ + begin_ + pending_) {
      if (begin_ + pending_ + n > kCapacity) {
        drain(/*keep_tail=*/true);
      }
    } else {
      drain(/*keep_tail=*/false);
      begin_ = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kLineBytes / sizeof(T));
      base_ = dst - begin_;
    }
    T* slot = buffer() + begin_ + pending_;
    pending_ += n;
    return {slot, false};
  }

 private:
  static constexpr int64_t kLineValues = kLineBytes / static_cast<int64_t>(sizeof(T));
  static constexpr int64_t kCapacity = 8192 / static_cast<int64_t>(sizeof(T));

  T* buffer() {
    return reinterpret_cast<T*>(storage_);
  }

  // Writes out the staged values [begin_, begin_ + pending_) of the buffer, whose element i
  // belongs at base_ + i (base_ is line-aligned): the first line plainly where the stretch
  // starts inside it, whole lines streamed, and the last partial line plainly, or, with
  // `keep_tail`, kept at the front of the buffer for the runs that follow.
  void drain(bool keep_tail) {
    if (pending_ == 0) {
      return;
    }
    T* values = buffer();
    const int64_t end = begin_ + pending_;
    const int64_t whole_end = end / kLineValues * kLineValues;
    int64_t i = begin_;
    if (i > 0 && whole_end > 0) {
      std::copy(values + i, values + kLineValues, base_ + i);
      i = kLineValues;
    }
    for (; i < whole_end; i += kLineValues) {
      stream_line(values + i, base_ + i);
    }
    if (keep_tail) {
      // i == whole_end, past the first line: place() drains only a buffer fuller than that.
      std::copy(values + i, values + end, values);
      base_ += i;
      begin_ = 0;
      pending_ = end - i;
      return;
    }
    std::copy(values + i, values + end, base_ + i);
    pending_ = 0;
  }

  alignas(kLineBytes) std::byte storage_[kCapacity * sizeof(T)];
  T* base_ = nullptr;
  int64_t begin_ = 0;
  int64_t pending_ = 0;
};

// Streams an output whose runs are not whole cache lines where the pass reads its input from
// memory (evaluation): a run's whole lines are streamed straight from registers, and a line it
// shares with its neighbours is gathered in a line of L1 and streamed once the runs after it
// have filled it (written plainly where the task's first or last run leaves part of it to
// another task). StagedStores' bursts of stores took turns with evaluation's reads of x. Where
// a pass reads x from cache, forward-train and backward, StagedStores is the faster: against
// it, SharedLineStores was 1.05-1.1x as fast at 32x1024x14x14 float32 (784-byte planes) but
// 0.7-0.75x in bfloat16 (392 bytes), where a plane's pieces cost as much as its values
// (interleaved old/new processes on the AMD EPYC VM, 2 threads). The last line is written out
// by the destructor, so a task's SharedLineStores must be gone before its
// fence_streamed_stores().
template <typename T>
class SharedLineStores {
 public:
  SharedLineStores() = default;
  SharedLineStores(const SharedLineStores&) = delete;
  SharedLineStores& operator=(const SharedLineStores&) = delete;
  ~SharedLineStores() {
    flush();
  }

  // Writes the run of `n` values at `y` piece by piece, in order, through write(offset, dst,
  // length, stream), which writes values [offset, offset + length) of the run to dst, streamed
  // where `stream`.
  template <typename F>
  void split(T* y, int64_t n, const F& write) {
    const int64_t into_line = static_cast<int64_t>(reinterpret_cast<uintptr_t>(y) % kLineBytes / sizeof(T));
    int64_t offset = 0;
    if (into_line != 0 || n < kLineValues) {
      T* line = y - into_line;
      if (line != line_ || end_ != into_line) {
        flush();
        line_ = line;
        begin_ = end_ = into_line;
      }
      offset = std::min(n, kLineValues - into_line);
      gather(write, n, 0, offset);
      if (end_ == kLineValues) {
        flush();
      }
    }
    const int64_t whole = (n - offset) / kLineValues * kLineValues;
    if (whole > 0) {
      write(offset, y + offset, whole, true);
      offset += whole;
    }
    if (offset < n) {
      flush();
      line_ = y + offset;
      begin_ = end_ = 0;
      gather(write, n, offset, n - offset);
    }
  }

 private:
  static constexpr int64_t kLineValues = kLineBytes / static_cast<int64_t>(sizeof(T));
  static constexpr int64_t kVectorValues = Vectorized<at::opmath_type<T>>::size();

  // Gathers values [offset, offset + length) of the run of n values into the line at end_. A
  // piece shorter than a vector is written by the vector lanes of a window of the run around it
  // and copied, as scalar code, which compilers contract to other roundings (a * b - c * d to a
  // fused multiply-add), would write it differently from the unsplit run (see
  // write_fetching_ahead).
  template <typename F>
  void gather(const F& write, int64_t n, int64_t offset, int64_t length) {
    if (length < kVectorValues && n >= kVectorValues) {
      const int64_t start = std::min(offset, n - kVectorValues);
      T window[kVectorValues];
      write(start, window, kVectorValues, false);
      std::copy(window + (offset - start), window + (offset - start + length), buffer() + end_);
    } else {
      write(offset, buffer() + end_, length, false);
    }
    end_ += length;
  }

  T* buffer() {
    return reinterpret_cast<T*>(storage_);
  }

  // Writes out the line being gathered: streamed where it is whole, its gathered values plainly
  // where the rest of it is another task's or another run's that did not follow on.
  void flush() {
    if (line_ == nullptr) {
      return;
    }
    if (begin_ == 0 && end_ == kLineValues) {
      stream_line(buffer(), line_);
    } else {
      std::copy(buffer() + begin_, buffer() + end_, line_ + begin_);
    }
    line_ = nullptr;
  }

  alignas(kLineBytes) std::byte storage_[kLineBytes];
  // The output line being gathered, and the values [begin_, end_) of it gathered so far.
  T* line_ = nullptr;
  int64_t begin_ = 0;
  int64_t end_ = 0;
};

// Stores two vectors of the accumulation type as 2·V values of T; half and bfloat16 are narrowed
// in registers (rounded to nearest even, as c10's conversion does).
template <typename acc_t, typename T>
inline void store_pair(const Vectorized<acc_t>& low, const Vectorized<acc_t>& high, T* y, const RunStores& stores) {
  if constexpr (std::is_same_v<T, acc_t>) {
    stores.put(low, y);
    stores.put(high, y + Vectorized<acc_t>::size());
  } else {
    stores.put(at::vec::convert_from_float<T>(low, high), y);
  }
}

// Stores one vector of the accumulation type as V values of T (a half-width store of the
// narrowed pair for half and bfloat16): the last whole vector of a run whose length is not a
// multiple of 2·V.
template <typename acc_t, typename T>
inline void store_one(const Vectorized<acc_t>& v, T* y, const RunStores& stores) {
  if constexpr (std::is_same_v<T, acc_t>) {
    stores.put(v, y);
  } else {
    at::vec::convert_from_float<T>(v, v).store(y, Vectorized<acc_t>::size());
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The bfloat16 bits of a float vector rounded to nearest even, in the upper half of each 32-bit
// lane (the lower half is left over), NaN as 0xffff as at::vec's conversion gives it.
inline __m256i bfloat16_in_upper_halves(const Vectorized<float>& v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_blendv_epi8(_mm256_set1_epi32(-1), rounded, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
}
#endif

// What write_run takes for a step_value where there is none.
struct NoSteps {};

// Stores a step computed from load_step's lanes as its 2·V values of T.
template <typename acc_t, typename T>
inline void store_step(const std::array<Vectorized<acc_t>, 2>& step, T* y, const RunStores& stores) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i even = _mm256_srli_epi32(bfloat16_in_upper_halves(step[0]), 16);
    stores.put(Vectorized<c10::BFloat16>(_mm256_blend_epi16(even, bfloat16_in_upper_halves(step[1]), 0xAA)), y);
    return;
  }
#endif
  store_pair(step[0], step[1], y, stores);
}

// Writes y[i] = value(i) for i in [0, n) as T: in the accumulation type four vectors computed
// before any is stored, then a vector at a time (the compiler cannot load a vector's inputs ahead
// of the previous store, which might alias them; four at a time, their loads overlap); in half
// and bfloat16 two vectors at a time, narrowed in registers (store_pair; at::vec::convert
// narrows one value at a time), then one vector. The last values, fewer than a vector, are then
// written as the vector ending at n, which rewrites values already written with the same ones
// (lanes are computed alike, and y is not an input): at 14x14 a plane is 12 vectors of 16
// bfloat16 values and 4 more, and their scalar conversions took a seventh of the normalize pass.
// Only a run shorter than a vector is written value by value. vector_value(i) gives the vector
// of values i .. i + V - 1 and scalar_value(i) value i, both in the accumulation type; `stream`
// asks for non-temporal stores (RunStores). A step_value(i), where given, gives values i .. i +
// 2·V - 1 in load_step's lanes, and half and bfloat16 are written a step at a time from it.
// vector_value and step_value capture by value, and the loop reads its own copies: the stores
// cannot alias those, so their pointers and coefficients stay in registers. Read through the
// caller's lambda, the planar bfloat16 input-gradient loop reloaded and broadcast every
// coefficient after each store, a fifth of its instructions, and the channels-last one (no
// steps) reloaded five pointers, each through a reference, per 16 values. With its own copy the
// channels-last bfloat16 backward at 32x64x56x56 took 2.8-3.1 ms against 3.3-3.5 (1.50-1.52x
// torch's against 1.23-1.30x; interleaved old/new processes, 2 threads, AMD EPYC VM), float32
// and planar backward within noise. Four vectors a step against one (operators alternated in one
// process, a copy of x between calls, medians of 200-300 calls; AMD EPYC Zen 4 VM, 2 threads):
// affine_run's channels-last evaluation as fast as its earlier loop of its own, with the same
// steps (0.95-1.09x at five shapes from 32x512x7x7 to 32x64x56x56, either call order); float32
// backward 0.94-1.20x, which of the two ran first mattering more than the step.
template <typename acc_t, typename T, typename VectorValue, typename ScalarValue, typename StepValue = NoSteps>
TORCH_BN_FLATTEN inline void write_run(T* y, int64_t n, bool stream, const VectorValue& vector_value_of,
                                       const ScalarValue& scalar_value, const StepValue& step_value_of = {}) {
  const VectorValue vector_value = vector_value_of;
  const StepValue step_value = step_value_of;
  constexpr int64_t V = Vectorized<acc_t>::size();
  const RunStores stores(y, n * static_cast<int64_t>(sizeof(T)), stream);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t>) {
    for (; i + 4 * V <= n; i += 4 * V) {
      const std::array<Vectorized<acc_t>, 4> v{vector_value(i), vector_value(i + V), vector_value(i + 2 * V),
                                               vector_value(i + 3 * V)};
      for (int k = 0; k < 4; ++k) {
        stores.put(v[k], y + i + k * V);
      }
    }
    for (; i + V <= n; i += V) {
      stores.put(vector_value(i), y + i);
    }
  } else {
    for (; i + 2 * V <= n; i += 2 * V) {
      if constexpr (std::is_same_v<StepValue, NoSteps>) {
        store_pair(vector_value(i), vector_value(i + V), y + i, stores);
      } else {
        store_step(step_value(i), y + i, stores);
      }
    }
    if (i + V <= n) {
      store_one(vector_value(i), y + i, stores);
      i += V;
    }
  }
  if (i < n && n >= V) {
    store_one(vector_value(n - V), y + n - V, stores);
    return;
  }
  for (; i < n; ++i) {
    y[i] = static_cast<T>(scalar_value(i));
  }
}

// Writes a chunk computed in the accumulation type to its half or bfloat16 destination; a no-op
// where the chunk is the destination.
template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* chunk, scalar_t* dst, int64_t n, bool stream) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    write_run<acc_t>(
        dst, n, stream, [=](int64_t i) { return Vectorized<acc_t>::loadu(chunk + i); },
        [&](int64_t i) { return chunk[i]; });
  }
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
