// Vectorized per-element loops of the CPU kernels. Compiled once per CPU capability (see
// kernels_*.cpp): everything here lives in a namespace named after it, as ATen's
// at::vec does, so the builds do not collide.
#pragma once
#include "aligned_vector.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

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

// How a run's vectors reach memory. Through the cache, or, for an output too large to stay in
// the last-level cache, with non-temporal stores that skip it: the store then needs no read of
// the line first, and the output does not evict the input that a second pass, or the next call,
// is about to read. On the 2-core AMD EPYC VM (1 MiB L2, 32 MiB L3), forward-eval at
// 32x256x56x56 float32 took 5.0 ms so against 8.1 ms (the input and output are 103 MB each),
// forward-train 9.7 against 11.4 (interleaved A/B, 2 threads; which outputs stream, see
// streams_output in kernels_impl.h). A run is streamed only when it is whole cache lines: a line
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

template <typename acc_t>
inline acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (const acc_t lane : lanes) {
    total += lane;
  }
  return total;
}

// A per-channel parameter seen from a contiguous run of elements. In a planar (NCHW) run every
// element belongs to one channel (Uniform); in a row of a channels-last tensor element i
// belongs to channel i (PerChannel). Loops that store take these (and the dy sources below) by
// value: a callee's own copy cannot be aliased by its stores to float memory, so it stays in a
// register instead of being reloaded after every store. from(offset) is the parameter seen from
// the run's element `offset` on.
template <typename acc_t>
struct Uniform {
  acc_t value;
  Vectorized<acc_t> vec(int64_t /*i*/) const { return Vectorized<acc_t>(value); }
  acc_t operator[](int64_t /*i*/) const { return value; }
  Uniform from(int64_t /*offset*/) const { return *this; }
  const Uniform& parity(int /*h*/) const { return *this; }
};

template <typename acc_t>
struct PerChannel {
  const acc_t* values;
  Vectorized<acc_t> vec(int64_t i) const { return Vectorized<acc_t>::loadu(values + i); }
  acc_t operator[](int64_t i) const { return values[i]; }
  PerChannel from(int64_t offset) const { return {values + offset}; }
};

// A PerChannel whose runs may also be read a step at a time in load_step's lanes (channels-last
// bfloat16): `in_steps` holds the same values, each 2·V of them as their even-indexed ones, then
// their odd-indexed ones (in_step_lanes), so that parity(h) gives a step's even (h = 0) or odd
// (h = 1) values their coefficients with one load. A run starts at a multiple of 2·V channels.
template <typename acc_t>
struct PerChannelSteps {
  const acc_t* values;
  const acc_t* in_steps;
  Vectorized<acc_t> vec(int64_t i) const { return Vectorized<acc_t>::loadu(values + i); }
  acc_t operator[](int64_t i) const { return values[i]; }
  PerChannelSteps from(int64_t offset) const { return {values + offset, in_steps + offset}; }
  PerChannel<acc_t> parity(int h) const { return {in_steps + h * Vectorized<acc_t>::size()}; }
};

// `values` (n of them, a multiple of 2·V) into `out` in PerChannelSteps::in_steps's order.
template <typename acc_t>
void in_step_lanes(const acc_t* values, int64_t n, acc_t* out) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t step = 0; step < n; step += 2 * V) {
    for (int64_t lane = 0; lane < V; ++lane) {
      out[step + lane] = values[step + 2 * lane];
      out[step + V + lane] = values[step + 2 * lane + 1];
    }
  }
}

// Reductions run kUnroll vectors per step; a running total keeps one accumulator per slot, so
// the adds form kUnroll independent chains instead of one that waits on each add's latency.
constexpr int kUnroll = 4;

// Where a reduction's terms go: one running total of a planar run (all one channel). `slot` <
// kUnroll is the position of a vector within its step.
template <typename acc_t>
struct RunTotal {
  Vectorized<acc_t> lanes[kUnroll];
  acc_t tail = 0;
  RunTotal() : RunTotal(std::make_index_sequence<kUnroll>{}) {}
  void add(int slot, int64_t /*i*/, const Vectorized<acc_t>& v) { lanes[slot] += v; }
  void add(int64_t /*i*/, acc_t v) { tail += v; }
  void add(const RunTotal& other) {
    for (int slot = 0; slot < kUnroll; ++slot) {
      lanes[slot] += other.lanes[slot];
    }
    tail += other.tail;
  }
  acc_t total() const {
    Vectorized<acc_t> sum = lanes[0];
    for (int slot = 1; slot < kUnroll; ++slot) {
      sum += lanes[slot];
    }
    return horizontal_sum(sum) + tail;
  }

 private:
  // The lanes zeroed one by one: zeroed in a loop, GCC made the loop a memset (rep stos) of the
  // local totals of every run, whose stores the lanes' first loads then waited on. Backward at
  // 32x512x7x7 float32 took 0.40-0.59 ms so against 0.23-0.26 ms now (alternating builds,
  // against torch's in the same process: 0.57-0.71x of it before, 0.92-1.11x now).
  template <size_t... Slot>
  explicit RunTotal(std::index_sequence<Slot...>) : lanes{((void)Slot, Vectorized<acc_t>(acc_t(0)))...} {}
};

// n running totals (one per channel of a group), zeroed, in a plain byte buffer aligned by hand.
// A std::vector<RunTotal> allocates through the over-aligned operator new, which glibc serves
// with memalign past its per-thread cache. Two such vectors per group of channels made backward
// 2-8% slower at 32x128x28x28 float32 (otherwise the same loops, interleaved in one process, 1
// and 2 threads; as plain float vectors of the same bytes, no slower); this buffer instead:
// backward 1.03-1.05x at 32x128x28x28, 0.98-1.07x at 32x512x14x14.
template <typename acc_t>
class RunTotals {
 public:
  explicit RunTotals(int64_t n) : n_(n), bytes_(n * sizeof(RunTotal<acc_t>) + alignof(RunTotal<acc_t>)) {
    void* at = bytes_.data();
    size_t space = bytes_.size();
    first_ = static_cast<RunTotal<acc_t>*>(std::align(alignof(RunTotal<acc_t>), n * sizeof(RunTotal<acc_t>), at, space));
    reset();
  }
  RunTotals(const RunTotals&) = delete;
  RunTotals& operator=(const RunTotals&) = delete;

  RunTotal<acc_t>& operator[](int64_t i) { return first_[i]; }
  RunTotal<acc_t>* data() { return first_; }
  void reset() { std::uninitialized_fill_n(first_, n_, RunTotal<acc_t>()); }

 private:
  static_assert(std::is_trivially_destructible_v<RunTotal<acc_t>>, "the buffer is released without destructors");
  int64_t n_;
  std::vector<unsigned char> bytes_;
  RunTotal<acc_t>* first_;
};

// Calls vector_step(slot, i) on [0, n) kUnroll vectors at a time, then on the remaining whole
// vectors (slot 0), and returns where the scalar tail starts. Given a pair_step, kUnroll vectors
// at a time are pair_step(slot, i) on slots slot and slot + 1 instead: values i .. i + 2·V - 1,
// read in load_step's lanes.
template <typename acc_t, typename F, typename G = NoSteps>
inline int64_t for_each_vector(int64_t n, const F& vector_step, const G& pair_step = {}) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  static_assert(kUnroll % 2 == 0, "pair steps fill whole unrolled steps");
  int64_t i = 0;
  for (; i + kUnroll * V <= n; i += kUnroll * V) {
    for (int slot = 0; slot < kUnroll; slot += std::is_same_v<G, NoSteps> ? 1 : 2) {
      if constexpr (std::is_same_v<G, NoSteps>) {
        vector_step(slot, i + slot * V);
      } else {
        pair_step(slot, i + slot * V);
      }
    }
  }
  for (; i + V <= n; i += V) {
    vector_step(0, i);
  }
  return i;
}

// A mean of zero: `centered` leaves x as it is.
template <typename acc_t>
struct Zero {
  Zero from(int64_t /*offset*/) const { return *this; }
  const Zero& parity(int /*h*/) const { return *this; }
};

// Whether a per-channel source reads the same in every lane of a run (a planar run's channel),
// so that loops over it may read load_step's lanes.
template <typename P>
constexpr bool kSameInEveryLane = false;
template <typename acc_t>
constexpr bool kSameInEveryLane<Uniform<acc_t>> = true;
template <typename acc_t>
constexpr bool kSameInEveryLane<Zero<acc_t>> = true;

// Whether a per-channel source gives each of load_step's lanes its own channel's values
// (parity(h)), so that loops that write may read steps: those the same in every lane, and
// PerChannelSteps. The reductions of a run into one total take the former alone.
template <typename P>
constexpr bool kStepLanes = kSameInEveryLane<P>;
template <typename acc_t>
constexpr bool kStepLanes<PerChannelSteps<acc_t>> = true;

// The mean enters as hi + lo (two acc_t values whose sum is the double-precision mean), so
// (x - hi) - lo keeps the low bits that a float mean would drop: with mean 1e4 and std 1e-2
// those bits are the whole signal.
template <typename acc_t, typename P>
inline Vectorized<acc_t> centered(const Vectorized<acc_t>& x, const P& hi, const P& lo, int64_t i) {
  return (x - hi.vec(i)) - lo.vec(i);
}

template <typename acc_t, typename P>
inline acc_t centered(acc_t x, const P& hi, const P& lo, int64_t i) {
  return (x - hi[i]) - lo[i];
}

template <typename acc_t>
inline Vectorized<acc_t> centered(const Vectorized<acc_t>& x, const Zero<acc_t>&, const Zero<acc_t>&, int64_t) {
  return x;
}

template <typename acc_t>
inline acc_t centered(acc_t x, const Zero<acc_t>&, const Zero<acc_t>&, int64_t) {
  return x;
}

// f applied to vectors of the given values, lane 0's result: a value computed alone (a loop's
// scalar tail) rounds as the same value in a vector's lane does, so that no result depends on where
// a run or row starts and ends, which follows the thread count. A scalar formula of its own rounded
// differently: a (3, 5, 2, 2) float32 input gradient got other bits in rows narrower than a vector
// than in runs. The formulas given to it spell out their fused multiply-adds (at::vec::fmadd,
// fmsub), so that GCC, which fuses a·b + c where it chooses, has none of its own to fuse in one
// place and not in the other. Built with -ffp-contract=off instead, bfloat16 NCHW forward-train
// at 32x256x14x14 took about 1.15x as long (median of eight alternating process pairs), its
// statistics' squares no longer fused.
template <typename acc_t, typename F, typename... Values>
inline acc_t in_a_lane(const F& f, Values... values) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  f(Vectorized<acc_t>(static_cast<acc_t>(values))...).store(lanes);
  return lanes[0];
}

// a·b + c as at::vec::fmadd computes it (fused where the vector type fuses it).
inline constexpr auto fused_multiply_add = [](const auto& a, const auto& b, const auto& c) {
  return at::vec::fmadd(a, b, c);
};

// The reductions below sum into local totals and write them out at the end: a RunTotal's lanes
// then stay in registers through the run. Added to in place, they would be stored after every
// step, since a vector type may alias the float input read between steps.

// A term's values as an array of its sums: one, or ShiftedMoments's two.
template <typename V>
inline std::array<V, 1> as_sums(const V& v) {
  return {v};
}

template <typename V, size_t K>
inline const std::array<V, K>& as_sums(const std::array<V, K>& v) {
  return v;
}

// How many sums a term gives (see as_sums).
template <typename acc_t, typename Term>
constexpr size_t sum_count = std::tuple_size_v<std::decay_t<decltype(as_sums(std::declval<const Term&>()(
    std::declval<Vectorized<acc_t>>(), std::declval<Uniform<acc_t>>(), std::declval<Uniform<acc_t>>(), int64_t{0})))>>;

// The terms of the statistics passes over a chunk, as term(x, a, b, i) with a and b sources of
// per-channel values (Uniform over a run of one channel, PerChannel over positions).
// The one pass: (x - shift, (x - shift)²), both sums of a one-pass variance, the shift (a)
// lying near the mean (see planar_moments, forward_train_rows).
template <typename acc_t>
struct ShiftedMoments {
  template <typename P>
  std::array<Vectorized<acc_t>, 2> operator()(const Vectorized<acc_t>& x, const P& shift, const P& /*unused*/,
                                             int64_t i) const {
    const Vectorized<acc_t> d = x - shift.vec(i);
    return {d, d * d};
  }
  template <typename P>
  std::array<acc_t, 2> operator()(acc_t x, const P& shift, const P& /*unused*/, int64_t i) const {
    const acc_t d = x - shift[i];
    return {d, acc_t(d * d)};
  }
};

// The second pass of a two-pass variance, where the one pass would cancel: Σd and Σd² of
// d = (x - hi) - lo, hi + lo (a, b) being the mean the first pass found. Σd corrects that mean
// (see OnePassMoments): summed in the accumulation type its error, times the distance to the
// other pieces' means when they are merged, outweighed the rounding of Σd² where the pieces lay
// far apart (channels-last rows 50 apart image to image: running_var 1e-6 off in float32).
template <typename acc_t>
struct CenteredMoments {
  template <typename P>
  std::array<Vectorized<acc_t>, 2> operator()(const Vectorized<acc_t>& x, const P& hi, const P& lo, int64_t i) const {
    const Vectorized<acc_t> d = centered(x, hi, lo, i);
    return {d, d * d};
  }
  template <typename P>
  std::array<acc_t, 2> operator()(acc_t x, const P& hi, const P& lo, int64_t i) const {
    const acc_t d = centered(x, hi, lo, i);
    return {d, acc_t(d * d)};
  }
};

// Up to two streams (x, dy) of a run whose lines a loop fetches `distance` values ahead of those
// it reads: a reduction a loop step at a time, a write pass a piece at a time (see
// write_fetching_ahead). A distance of 0 fetches nothing. Streams are kept as addresses (see
// prefetch_lines).
struct FetchAhead {
  std::array<uintptr_t, 2> streams{};
  int64_t distance_bytes = 0;
  int64_t value_bytes = 0;

  template <typename T>
  static FetchAhead of(const T* a, const T* b, int64_t distance) {
    return {{reinterpret_cast<uintptr_t>(a), reinterpret_cast<uintptr_t>(b)},
            distance * static_cast<int64_t>(sizeof(T)), static_cast<int64_t>(sizeof(T))};
  }

  bool active() const {
    return distance_bytes != 0;
  }

  // Fetches the lines of values [j, j + n) of the streams, `distance` ahead.
  C10_ALWAYS_INLINE void fetch(int64_t j, int64_t n) const {
    if (!active()) {
      return;
    }
    for (const uintptr_t stream : streams) {
      if (stream) {
        prefetch_lines(stream + j * value_bytes + distance_bytes, n * value_bytes);
      }
    }
  }

  // Fetches the lines of the loop step (for_each_vector's kUnroll vectors of acc_t) from
  // value j.
  template <typename acc_t>
  C10_ALWAYS_INLINE void step(int64_t j) const {
    fetch(j, kUnroll * Vectorized<acc_t>::size());
  }
};

// Values a write pass writes per fetch of the lines ahead (see write_fetching_ahead): 256, 512
// and 1024 measured alike.
constexpr int64_t kFetchPieceValues = 512;

// Calls write(offset, length) on the run [0, n) a piece of kFetchPieceValues values at a time,
// each piece after fetching the lines of `ahead`'s streams that lie `distance` past it, so that
// the memory reads ahead while the core writes. Without a distance, in one call. The last piece
// takes all that is left (up to twice the others): a piece shorter than a vector would be
// written by scalar code, whose rounding can differ from the vector lanes', and whether a run is
// split at all depends on the thread count (see PlanarPlan::next_group_distance). Pieces that
// are whole vectors write every value as the unsplit run does.
template <typename F>
C10_ALWAYS_INLINE void write_fetching_ahead(const FetchAhead& ahead, int64_t n, const F& write) {
  if (!ahead.active()) {
    write(int64_t{0}, n);
    return;
  }
  for (int64_t offset = 0; offset < n;) {
    const int64_t length = n - offset < 2 * kFetchPieceValues ? n - offset : kFetchPieceValues;
    ahead.fetch(offset, length);
    write(offset, length);
    offset += length;
  }
}

// Σ term(x, a, b) over a run, the term's k-th sum (see as_sums) added to out[k] at the end. The
// run's totals start from zero in registers: copying two running totals in and out was a block
// move per run, a third of forward-train's statistics time at 14x14.
template <typename acc_t, typename T, typename Term, typename P>
inline void reduce_terms(const T* x, int64_t n, const Term& term, const P& a, const P& b, RunTotal<acc_t>* out,
                         const FetchAhead& ahead = {}) {
  constexpr size_t K = sum_count<acc_t, Term>;
  RunTotal<acc_t> total[K];
  const auto vector_step = [&](int slot, int64_t j) {
    if (slot == 0) {
      ahead.step<acc_t>(j);
    }
    const auto terms = as_sums(term(load<acc_t>(x + j), a, b, j));
    for (size_t k = 0; k < K; ++k) {
      total[k].add(slot, j, terms[k]);
    }
  };
  int64_t i = 0;
  if constexpr (kParitySteps<T> && kSameInEveryLane<P>) {
    i = for_each_vector<acc_t>(n, vector_step, [&](int slot, int64_t j) {
      if (slot == 0) {
        ahead.step<acc_t>(j);
      }
      const auto x_values = load_step<acc_t>(x + j);
      for (int half = 0; half < 2; ++half) {
        const auto terms = as_sums(term(x_values[half], a, b, j));
        for (size_t k = 0; k < K; ++k) {
          total[k].add(slot + half, j, terms[k]);
        }
      }
    });
  } else {
    i = for_each_vector<acc_t>(n, vector_step);
  }
  for (; i < n; ++i) {
    const auto terms = as_sums(term(static_cast<acc_t>(x[i]), a, b, i));
    for (size_t k = 0; k < K; ++k) {
      total[k].add(i, terms[k]);
    }
  }
  for (size_t k = 0; k < K; ++k) {
    out[k].add(total[k]);
  }
}

// Σ dy and Σ dy·(x - mean): everything backward needs from a pass over x and dy, added to sum and
// dot. `dy` is a source (Values, SignGated): dy[i] and dy.vec(i) are its values in the
// accumulation type. As in reduce_terms the run's totals start from zero in registers: copied
// in, the totals were moved in halves and read back whole, a store-forwarding stall per run
// (backward 5-15% slower at 7x7 and 14x14, even at 28x28; interleaved A/B, 2 threads).
template <typename acc_t, typename D, typename T, typename P>
inline void reduce_dy_dot(const D& dy, const T* x, int64_t n, const P& hi, const P& lo, RunTotal<acc_t>& sum,
                          RunTotal<acc_t>& dot, const FetchAhead& ahead = {}) {
  using Vec = Vectorized<acc_t>;
  RunTotal<acc_t> sum_total, dot_total;
  const auto vector_step = [&](int slot, int64_t j) {
    if (slot == 0) {
      ahead.step<acc_t>(j);
    }
    const Vec g = dy.vec(j);
    sum_total.add(slot, j, g);
    dot_total.add(slot, j, g * centered(load<acc_t>(x + j), hi, lo, j));
  };
  int64_t i = 0;
  if constexpr (kParitySteps<T> && D::kSteps && kSameInEveryLane<P>) {
    i = for_each_vector<acc_t>(n, vector_step, [&](int slot, int64_t j) {
      if (slot == 0) {
        ahead.step<acc_t>(j);
      }
      const auto g = dy.step(j);
      const auto x_values = load_step<acc_t>(x + j);
      for (int half = 0; half < 2; ++half) {
        sum_total.add(slot + half, j, g[half]);
        dot_total.add(slot + half, j, g[half] * centered(x_values[half], hi, lo, j));
      }
    });
  } else {
    i = for_each_vector<acc_t>(n, vector_step);
  }
  for (; i < n; ++i) {
    const acc_t g = dy[i];
    sum_total.add(i, g);
    dot_total.add(i, acc_t(g * centered(static_cast<acc_t>(x[i]), hi, lo, i)));
  }
  sum.add(sum_total);
  dot.add(dot_total);
}

// Σ dy and Σ dy·(x - mean) of one channel, carried from plane to plane (see carry_dy_dot).
template <typename acc_t>
struct DyDotCarry {
  Vectorized<acc_t> sum0 = Vectorized<acc_t>(acc_t(0)), sum1 = Vectorized<acc_t>(acc_t(0));
  Vectorized<acc_t> dot0 = Vectorized<acc_t>(acc_t(0)), dot1 = Vectorized<acc_t>(acc_t(0));
  acc_t sum_tail = 0, dot_tail = 0;
  acc_t sum() const { return horizontal_sum(sum0 + sum1) + sum_tail; }
  acc_t dot() const { return horizontal_sum(dot0 + dot1) + dot_tail; }
};

// `carry` plus a run's Σ dy and Σ dy·(x - mean), dy a source as in reduce_dy_dot: two vectors at
// a time, then one, then scalars. The carry comes in and goes out by value, so that a loop over a
// channel's short planes keeps it in registers from plane to plane, where reduce_dy_dot's
// RunTotal, added to in memory, costs a load and a store of kUnroll vectors per run.
template <typename acc_t, typename D, typename T, typename P>
inline DyDotCarry<acc_t> carry_dy_dot(DyDotCarry<acc_t> carry, const D& dy, const T* x, int64_t n, const P& hi,
                                      const P& lo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec g0 = dy.vec(i);
    const Vec g1 = dy.vec(i + V);
    carry.sum0 += g0;
    carry.sum1 += g1;
    carry.dot0 = at::vec::fmadd(g0, centered(load<acc_t>(x + i), hi, lo, i), carry.dot0);
    carry.dot1 = at::vec::fmadd(g1, centered(load<acc_t>(x + i + V), hi, lo, i + V), carry.dot1);
  }
  if (i + V <= n) {
    const Vec g = dy.vec(i);
    carry.sum0 += g;
    carry.dot0 = at::vec::fmadd(g, centered(load<acc_t>(x + i), hi, lo, i), carry.dot0);
    i += V;
  }
  for (; i < n; ++i) {
    const acc_t g = dy[i];
    carry.sum_tail += g;
    carry.dot_tail += g * centered(static_cast<acc_t>(x[i]), hi, lo, i);
  }
  return carry;
}

// The same per column over `rows` rows of `width` columns (a channels-last group of rows, or a
// piece of one row), added to sum[c] and dot[c]: dy, hi and lo are seen from the group's start,
// column c of row r at r·width + c. Row after row, in memory order. Strips of columns summed
// down the rows in registers took twice as long from L3 or memory (2 threads, 32x128x28x28 and
// 32x128x56x56 float32 on the AMD EPYC VM): the rows of a strip are each a new line.
template <typename acc_t, typename D, typename T, typename P>
TORCH_BN_FLATTEN inline void reduce_dy_dot_rows(const D& dy, const T* x, int64_t rows, int64_t width, const P& hi,
                                                const P& lo, acc_t* sum, acc_t* dot) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r * width;
    int64_t c = 0;
    for (; c + V <= width; c += V) {
      const Vec g = dy.vec(row + c);
      (Vec::loadu(sum + c) + g).store(sum + c);
      at::vec::fmadd(g, centered(load<acc_t>(x + row + c), hi, lo, c), Vec::loadu(dot + c)).store(dot + c);
    }
    for (; c < width; ++c) {
      // Column c's sums do not depend on whether it is in a vector (see in_a_lane).
      const acc_t g = dy[row + c];
      sum[c] += g;
      dot[c] = in_a_lane<acc_t>(fused_multiply_add, g, centered(static_cast<acc_t>(x[row + c]), hi, lo, c), dot[c]);
    }
  }
}

// Per-column sums over `rows` rows of C columns of x, row r starting at r·stride (a channels-last
// block, whose columns are its channels, or the short planes of an NCHW group), a strip of columns
// at a time: the strip's totals stay in registers down a group of rows, where adding each row
// into per-column totals in memory would load and store them for every vector. A group is a few
// KiB of consecutive rows, so that its rows, read strip by strip, are a handful of streams (a wide
// row read down a whole block would be a stream per row and miss L1). For every column c and
// each sum k of the term (see as_sums), total[k·C + c] = Σ_r term(x at r·stride + c, a, b, c)[k],
// summed in row order in the accumulation type over pieces of `piece_rows` rows (at most
// kChunk), and in double across pieces. The hardware prefetchers do not follow the strip order:
// with `fetch_ahead`, each strip fetches its columns of the next group's rows while it sums this
// group's, for a pass whose rows come from memory.
// `by_rows` walks narrow rows from memory instead (see forward_train_rows): groups of two rows,
// one vector of columns at a time, so that x is read in memory order and the totals are loaded
// and stored once per two rows; with `fetch_ahead` each group fetches the rows kRowWalkFetchBytes
// ahead. The sums are the same, added in the same order.
template <typename acc_t, typename T, typename Term, typename P>
TORCH_BN_FLATTEN inline void reduce_columns(const T* x, int64_t rows, int64_t C, int64_t stride, const Term& term,
                                            const P& a, const P& b, double* total, bool fetch_ahead,
                                            bool by_rows = false, int64_t piece_rows = kChunk) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int K = static_cast<int>(sum_count<acc_t, Term>);
  // Vectors per strip: their K totals and the terms' operands fit in 16 registers.
  constexpr int kStrip = 4;
  constexpr int64_t kGroupValues = 4096;
  constexpr int64_t kRowWalkGroup = 2;
  // 512 bytes to 8 KiB were alike on the AMD EPYC Zen 3 VM. On the Zen 4 VM, whose memory
  // delivers twice as fast, 2 KiB left the walk waiting on its loads (perf: half the samples on
  // the load of x, and the prefetches stalling as well): forward-train 1.18x faster at
  // 32x64x112x112 with 8 KiB, 1.25x at 32x256x56x56 and 32x128x56x56; 16 KiB alike, 32 KiB no
  // better (operators, three alternating rounds of processes, medians of 7 interleaved rounds).
  constexpr int64_t kRowWalkFetchBytes = 8192;
  const int64_t group_rows = by_rows ? kRowWalkGroup : std::max<int64_t>(8, kGroupValues / C);
  const int64_t row_bytes = stride * static_cast<int64_t>(sizeof(T));
  AlignedVector<acc_t> sums(K * C);
  std::fill(total, total + K * C, 0.0);
  for (int64_t p0 = 0; p0 < rows; p0 += piece_rows) {
    const int64_t p1 = std::min(rows, p0 + piece_rows);
    std::fill(sums.begin(), sums.end(), acc_t(0));
    for (int64_t r0 = p0; r0 < p1; r0 += group_rows) {
      const int64_t r1 = std::min(p1, r0 + group_rows);
      if (by_rows && fetch_ahead) {
        prefetch_lines(reinterpret_cast<uintptr_t>(x + r0 * stride) + kRowWalkFetchBytes, (r1 - r0) * row_bytes);
      }
      // Adds rows [r0, r1) of the `width` vectors of columns from c into sums.
      const auto add_strip = [&](auto width, int64_t c) {
        constexpr int W = decltype(width)::value;
        Vec strip[W][K];
        for (int w = 0; w < W; ++w) {
          for (int k = 0; k < K; ++k) {
            strip[w][k] = Vec::loadu(sums.data() + k * C + c + w * V);
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * stride + c;
          if (fetch_ahead && !by_rows) {
            // Past the last group the address lies beyond x (see prefetch_lines).
            prefetch_lines(reinterpret_cast<uintptr_t>(row) + group_rows * row_bytes,
                           W * V * static_cast<int64_t>(sizeof(T)));
          }
          for (int w = 0; w < W; ++w) {
            const auto terms = as_sums(term(load<acc_t>(row + w * V), a, b, c + w * V));
            for (int k = 0; k < K; ++k) {
              strip[w][k] += terms[k];
            }
          }
        }
        for (int w = 0; w < W; ++w) {
          for (int k = 0; k < K; ++k) {
            strip[w][k].store(sums.data() + k * C + c + w * V);
          }
        }
      };
      int64_t c = 0;
      for (; !by_rows && c + kStrip * V <= C; c += kStrip * V) {
        add_strip(std::integral_constant<int, kStrip>{}, c);
      }
      for (; c + V <= C; c += V) {
        add_strip(std::integral_constant<int, 1>{}, c);
      }
      for (; c < C; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto terms = as_sums(term(static_cast<acc_t>(x[r * stride + c]), a, b, c));
          for (int k = 0; k < K; ++k) {
            sums[k * C + c] += terms[k];
          }
        }
      }
    }
    for (const auto i : c10::irange(K * C)) {
      total[i] += static_cast<double>(sums[i]);
    }
  }
}

// dx = dy · k: the input gradient in evaluation, where the statistics are constants (x is not
// read, so a NaN in x does not reach dx, as in torch).
template <typename acc_t, typename D, typename T, typename P>
inline void scale_by(D dy, T* dx, int64_t n, bool stream, P k) {
  write_run<acc_t>(
      dx, n, stream, [=](int64_t i) { return dy.vec(i) * k.vec(i); }, [&](int64_t i) { return acc_t(dy[i] * k[i]); });
}

// Training-mode input gradient: dx = dy·k1 - ((x - mean)·k2 + k3), with per-channel
// k1 = weight·invstd, k2 = k1·invstd²·Σdy(x-mean)/n, k3 = k1·Σdy/n, in two fused multiply-adds.
template <typename acc_t, typename D, typename T, typename M, typename P>
inline void grad_input(D dy, const T* x, T* dx, int64_t n, bool stream, M hi, M lo, P k1, P k2, P k3) {
  // dy·k1 - (d·k2 + k3) from (dy, d = x - mean, k1, k2, k3).
  constexpr auto formula = [](const auto& g, const auto& d, const auto& a, const auto& b, const auto& c) {
    return at::vec::fmsub(g, a, at::vec::fmadd(d, b, c));
  };
  const auto vector_value = [=](int64_t i) {
    return formula(dy.vec(i), centered(load<acc_t>(x + i), hi, lo, i), k1.vec(i), k2.vec(i), k3.vec(i));
  };
  const auto scalar_value = [&](int64_t i) {
    return in_a_lane<acc_t>(formula, dy[i], centered(static_cast<acc_t>(x[i]), hi, lo, i), k1[i], k2[i], k3[i]);
  };
  if constexpr (kParitySteps<T> && D::kSteps && kStepLanes<M> && kStepLanes<P>) {
    // The formula on each half of the step, in the step's own loop: a helper shared with
    // vector_value made GCC stop inlining float32's write pass into its planar loop (a call per
    // plane), which takes no steps.
    write_run<acc_t>(dx, n, stream, vector_value, scalar_value, [=](int64_t i) {
      const auto g = dy.step(i);
      const auto x_values = load_step<acc_t>(x + i);
      std::array<Vectorized<acc_t>, 2> out;
      for (int half = 0; half < 2; ++half) {
        out[half] = formula(g[half], centered(x_values[half], hi.parity(half), lo.parity(half), i),
                            k1.parity(half).vec(i), k2.parity(half).vec(i), k3.parity(half).vec(i));
      }
      return out;
    });
  } else {
    write_run<acc_t>(dx, n, stream, vector_value, scalar_value);
  }
}

// The signs of a vector's lanes as its low bits: bit k = v[k] > 0 (false for NaN).
template <typename acc_t>
inline uint32_t sign_bits(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // That build takes half and bfloat16 alone (kernels_avx512.cpp): float lanes.
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)));
  } else if constexpr (std::is_same_v<acc_t, double>) {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_GT_OQ)));
  }
#endif
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  uint32_t bits = 0;
  for (int k = 0; k < Vectorized<acc_t>::size(); ++k) {
    bits |= static_cast<uint32_t>(lanes[k] > acc_t(0)) << k;
  }
  return bits;
}

// dz = positive ? dy : slope * dy. With slope 0 the gradient is selected, not multiplied, as
// torch's threshold_backward does (an infinite dy gives 0, not NaN).
template <typename acc_t>
inline acc_t gate(acc_t dy, bool positive, acc_t slope) {
  return positive ? dy : (slope == acc_t(0) ? acc_t(0) : dy * slope);
}

// gate() on a vector whose lanes' signs are the low bits of `bits`.
template <typename acc_t>
inline Vectorized<acc_t> gate(const Vectorized<acc_t>& dy, uint32_t bits, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  const Vec negative = slope == acc_t(0) ? Vec(acc_t(0)) : dy * Vec(slope);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), negative, dy);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i positive = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bit), lane_bit);
    return _mm256_blendv_ps(negative, dy, _mm256_castsi256_ps(positive));
  } else if constexpr (std::is_same_v<acc_t, double>) {
    const __m256i lane_bit = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i positive = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(bits), lane_bit), lane_bit);
    return _mm256_blendv_pd(negative, dy, _mm256_castsi256_pd(positive));
  }
#endif
  acc_t lanes[Vec::size()];
  dy.store(lanes);
  for (int k = 0; k < Vec::size(); ++k) {
    lanes[k] = gate(lanes[k], (bits >> k) & 1, slope);
  }
  return Vec::loadu(lanes);
}

// Bits [bit, bit + count) of `mask` (count <= 16) as the low bits of the result. A byte past
// the first is read only when the bits reach into it, so that nothing past the mask's end is
// read; within a run of whole vectors the branches go the same way every time.
inline uint32_t mask_bits(const uint8_t* mask, int64_t bit, int count) {
  const uint8_t* byte = mask + (bit >> 3);
  const int end = static_cast<int>(bit & 7) + count;
  uint32_t word = byte[0];
  if (end > 8) {
    word |= static_cast<uint32_t>(byte[1]) << 8;
    if (end > 16) {
      word |= static_cast<uint32_t>(byte[2]) << 16;
    }
  }
  return (word >> (bit & 7)) & ((1u << count) - 1);
}

// Where the loops read dy from: the values of a run, in any floating dtype, widened in registers.
template <typename acc_t, typename T>
struct Values {
  // Whether step(i) reads values i .. i + 2·V - 1 in load_step's lanes by parity, the lanes the
  // loops read x in: only where the values are of a type read so (kParitySteps). A float dz (the
  // residual's gradient, gathered in the accumulation type) has plain steps, two contiguous
  // vectors: read as steps beside bfloat16 x, each dz met another position's x.
  static constexpr bool kSteps = kParitySteps<T>;
  const T* values;
  Vectorized<acc_t> vec(int64_t i) const { return load<acc_t>(values + i); }
  std::array<Vectorized<acc_t>, 2> step(int64_t i) const { return load_step<acc_t>(values + i); }
  acc_t operator[](int64_t i) const { return static_cast<acc_t>(values[i]); }
};

// dy gated by the sign mask of a fused activation as it is read: element i of the run is bit
// `bit` + i of the mask.
template <typename acc_t, typename T>
struct SignGated {
  static constexpr bool kSteps = false;  // the mask's bits are in the order of the values
  const T* dy;
  const uint8_t* mask;
  int64_t bit;
  acc_t slope;
  Vectorized<acc_t> vec(int64_t i) const {
    constexpr int V = Vectorized<acc_t>::size();
    static_assert(V <= 16, "mask_bits reads at most 16 bits");
    return gate(load<acc_t>(dy + i), mask_bits(mask, bit + i, V), slope);
  }
  acc_t operator[](int64_t i) const {
    return gate(static_cast<acc_t>(dy[i]), mask_bits(mask, bit + i, 1) != 0, slope);
  }
};

// out = source, for n values.
template <typename acc_t, typename S>
inline void gather(const S& source, acc_t* out, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    source.vec(i).store(out + i);
  }
  for (; i < n; ++i) {
    out[i] = source[i];
  }
}

// Writes the sign bits of one task's runs into a zero-filled mask. Runs that continue where the
// last one ended form one span, buffered across run ends and stored 32 bits at a time, so that
// only the partial bytes at a span's two ends (which the neighbouring span, maybe another
// thread's, shares) are OR-ed atomically; every byte inside a span is a plain store. Flushes
// when destroyed.
class SignBitWriter {
 public:
  explicit SignBitWriter(uint8_t* mask) : mask_(mask) {}
  SignBitWriter(const SignBitWriter&) = delete;
  SignBitWriter& operator=(const SignBitWriter&) = delete;
  ~SignBitWriter() { flush(); }

  // Bits [bit, bit + count) of the mask are the low bits of `bits` (count <= 32).
  void put(int64_t bit, uint32_t bits, int count) {
    if (bit != byte_bit_ + filled_) {
      flush();
      span_start_ = bit;
      byte_bit_ = bit & ~int64_t{7};
      filled_ = static_cast<int>(bit & 7);
    }
    pending_ |= static_cast<uint64_t>(bits) << filled_;
    filled_ += count;
    if (filled_ >= 32) {
      const auto word = static_cast<uint32_t>(pending_);
      uint8_t* target = mask_ + (byte_bit_ >> 3);
      if (byte_bit_ >= span_start_) {
        // Byte by byte (little-endian order whatever the machine's); compilers merge the four.
        for (int k = 0; k < 4; ++k) {
          target[k] = static_cast<uint8_t>(word >> (8 * k));
        }
      } else {
        for (int k = 0; k < 4; ++k) {
          store_byte(k, static_cast<uint8_t>(word >> (8 * k)), /*complete=*/true);
        }
      }
      pending_ >>= 32;
      filled_ -= 32;
      byte_bit_ += 32;
    }
  }

 private:
  // The bytes still buffered at the end of a span; the last may be partial.
  void flush() {
    for (int k = 0; 8 * k < filled_; ++k) {
      store_byte(k, static_cast<uint8_t>(pending_ >> (8 * k)), /*complete=*/8 * (k + 1) <= filled_);
    }
    pending_ = 0;
    filled_ = 0;
  }

  // Byte k of the buffer: a plain store when all its bits are this span's, else an atomic OR.
  void store_byte(int k, uint8_t byte, bool complete) {
    uint8_t* target = mask_ + (byte_bit_ >> 3) + k;
    if (complete && byte_bit_ + 8 * k >= span_start_) {
      *target = byte;
    } else {
      __atomic_fetch_or(target, byte, __ATOMIC_RELAXED);
    }
  }

  uint8_t* mask_;
  int64_t span_start_ = 0;
  int64_t byte_bit_ = -8;  // the mask bit of pending_'s bit 0, a multiple of 8; none yet
  int filled_ = 0;         // bits of pending_ in use, fewer than 32 between calls
  uint64_t pending_ = 0;
};

// The activation of a fused layer, applied in the normalize pass. ReLU takes max(z, 0), so that
// -inf gives 0 as in torch rather than -inf * 0; NaN stays NaN in both.
template <typename acc_t>
struct Relu {
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& z) const {
    return at::vec::maximum(z, Vectorized<acc_t>(acc_t(0)));
  }
  acc_t operator()(acc_t z) const { return z > acc_t(0) || std::isnan(z) ? z : acc_t(0); }
};

// z > 0 ? z : slope * z.
template <typename acc_t>
struct LeakyRelu {
  acc_t slope;
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& z) const {
    using Vec = Vectorized<acc_t>;
    return Vec::blendv(z * Vec(slope), z, z > Vec(acc_t(0)));
  }
  acc_t operator()(acc_t z) const { return z > acc_t(0) || std::isnan(z) ? z : z * slope; }
};

// No activation: nothing applied, no signs recorded.
struct NoActivation {};

// The normalize pass of a run, in registers: y = act(((x - hi) - lo) · scale + shift + residual)
// with the residual (kResidual) and the activation (Act; the signs of its input go to bits
// [bit, bit + n) of the mask) as the epilogue asks; `stream` asks for non-temporal stores
// (RunStores). Also dy · scale (hi = lo = shift = 0).
template <typename acc_t, bool kResidual, typename Act, typename T, typename M, typename P>
TORCH_BN_FLATTEN inline void normalize_run(const T* x, T* y, int64_t n, M hi, M lo, P scale, P shift, const T* residual, Act act,
                          SignBitWriter& signs, int64_t bit, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kStep = 2 * V;
  constexpr bool kActivation = !std::is_same_v<Act, NoActivation>;
  static_assert(32 % kStep == 0, "a 32-bit word of signs holds whole steps");
  const RunStores stores(y, n * static_cast<int64_t>(sizeof(T)), stream);
  // ((x - hi) - lo) · scale + shift at i from the given per-channel sources: the run's own, or
  // (a step's half) their parity(half).
  const auto affine = [&](const Vec& x_values, int64_t i, const auto& hi_of, const auto& lo_of, const auto& scale_of,
                          const auto& shift_of) {
    return fused_multiply_add(centered(x_values, hi_of, lo_of, i), scale_of.vec(i), shift_of.vec(i));
  };
  const auto value = [&](int64_t i) {
    const Vec v = affine(load<acc_t>(x + i), i, hi, lo, scale, shift);
    if constexpr (kResidual) {
      return v + load<acc_t>(residual + i);
    } else {
      return v;
    }
  };
  // Applies the activation to v and returns the signs of its input.
  const auto activate = [&](Vec& v) {
    uint32_t signs_of_v = 0;
    if constexpr (kActivation) {
      signs_of_v = sign_bits(v);
      v = act(v);
    }
    return signs_of_v;
  };
  // Writes values [i, i + kStep) and returns their signs; without signs to record, from
  // load_step's lanes where the coefficients can be read in those (kStepLanes).
  const auto step = [&](int64_t i) {
    if constexpr (kParitySteps<T> && !kActivation && kStepLanes<M> && kStepLanes<P>) {
      const auto x_values = load_step<acc_t>(x + i);
      std::array<Vec, 2> out;
      for (int half = 0; half < 2; ++half) {
        out[half] = affine(x_values[half], i, hi.parity(half), lo.parity(half), scale.parity(half), shift.parity(half));
      }
      if constexpr (kResidual) {
        const auto residual_values = load_step<acc_t>(residual + i);
        out[0] = out[0] + residual_values[0];
        out[1] = out[1] + residual_values[1];
      }
      store_step(out, y + i, stores);
      return uint32_t{0};
    } else {
      Vec low = value(i), high = value(i + V);
      const uint32_t signs_of_step = activate(low) | activate(high) << V;
      store_pair(low, high, y + i, stores);
      return signs_of_step;
    }
  };
  // The same for the V values from i.
  const auto single = [&](int64_t i) {
    Vec v = value(i);
    const uint32_t signs_of_vector = activate(v);
    store_one(v, y + i, stores);
    return signs_of_vector;
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint32_t word = 0;
    for (int64_t j = 0; j < 32; j += kStep) {
      word |= step(i + j) << j;
    }
    if constexpr (kActivation) {
      signs.put(bit + i, word, 32);
    }
  }
  // The last (fewer than 32) values' signs go to the mask as one word too.
  const int64_t rest = i;
  uint32_t word = 0;
  for (; i + kStep <= n; i += kStep) {
    word |= step(i) << (i - rest);
  }
  if (i + V <= n) {
    word |= single(i) << (i - rest);
    i += V;
  }
  if (i < n && n >= V) {
    // The tail as in write_run; the signs of the values not yet written are the last n - i lanes'.
    word |= single(n - V) >> (V - (n - i)) << (i - rest);
    i = n;
  }
  for (; i < n; ++i) {
    acc_t v = in_a_lane<acc_t>(fused_multiply_add, centered(static_cast<acc_t>(x[i]), hi, lo, i), scale[i], shift[i]);
    if constexpr (kResidual) {
      v += static_cast<acc_t>(residual[i]);
    }
    if constexpr (kActivation) {
      word |= static_cast<uint32_t>(v > acc_t(0)) << (i - rest);
      v = act(v);
    }
    y[i] = static_cast<T>(v);
  }
  if (kActivation && n > rest) {
    signs.put(bit + rest, word, static_cast<int>(n - rest));
  }
}

// y = x · scale[c] + shift[c] over the whole NCHW planes [p0, p1), `plane` values each (at least
// V), walked as one stream: a vector that straddles two planes takes each lane's coefficients
// from its own plane, blended in registers, so that a short plane costs no loop and no scalar or
// overlapping last vector of its own. T is its own accumulation type (float, double).
template <typename T>
TORCH_BN_FLATTEN inline void affine_planes(const T* x, T* y, int64_t plane, int64_t channels, int64_t p0, int64_t p1,
                                           const T* scale, const T* shift) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec lane = Vec::arange(T(0), T(1));
  const int64_t first = p0 * plane;
  const int64_t n = (p1 - p0) * plane;
  int64_t c = p0 % channels;
  Vec scale_c(scale[c]), shift_c(shift[c]);
  const auto value = [&](int64_t i, const Vec& s, const Vec& b) {
    return at::vec::fmadd(Vec::loadu(x + first + i), s, b);
  };
  int64_t left = plane;  // values of channel c's plane from i on
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    if (left > V) {
      value(i, scale_c, shift_c).store(y + first + i);
      left -= V;
      continue;
    }
    // Lanes from `left` on belong to the next plane (none when left == V).
    c = c + 1 == channels ? 0 : c + 1;
    const Vec scale_next(scale[c]), shift_next(shift[c]);
    const Vec next_lanes = lane >= Vec(static_cast<T>(left));
    value(i, Vec::blendv(scale_c, scale_next, next_lanes), Vec::blendv(shift_c, shift_next, next_lanes))
        .store(y + first + i);
    scale_c = scale_next;
    shift_c = shift_next;
    left += plane - V;
  }
  if (i < n) {
    // The last V values lie in the last plane, whose coefficients these are.
    value(n - V, scale_c, shift_c).store(y + first + n - V);
  }
}

// y = x · scale[i] + shift[i] over a run whose coefficients are per value (channels-last rows,
// tiled over a group of rows) through the cache: what normalize_run computes with no mean kept
// apart, no epilogue and no non-temporal stores, bit for bit, and faster (see normalize_impl). T
// is its own accumulation type (float, double).
template <typename T>
inline void affine_run(const T* x, T* y, int64_t n, const T* scale, const T* shift) {
  using Vec = Vectorized<T>;
  write_run<T>(
      y, n, /*stream=*/false,
      [=](int64_t i) { return fused_multiply_add(Vec::loadu(x + i), Vec::loadu(scale + i), Vec::loadu(shift + i)); },
      [=](int64_t i) { return in_a_lane<T>(fused_multiply_add, x[i], scale[i], shift[i]); });
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
