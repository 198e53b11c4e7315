// A fused activation in the loops: its sign mask written by the normalize pass, and dy read
// as is or gated by that mask in backward.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "run_sources.h"
#include "vector_loads.h"

#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

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

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
