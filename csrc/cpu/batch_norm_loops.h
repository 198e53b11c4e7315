// Vectorized per-element loops of the CPU kernels. Compiled once per CPU capability (see
// kernels_*.cpp): everything here lives in a namespace named after it, as ATen's
// at::vec does, so the builds do not collide.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Values converted to the accumulation type per step: 16 KiB of float, so a chunk widened
// from half/bfloat16 stays in L1 while it is used.
constexpr int64_t kChunk = 4096;

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

// float and double are used in place; half and bfloat16 are widened to float a chunk at a time,
// a vector at a time with `load` (at::vec::convert widens them one value at a time).
template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, acc_t* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using Vec = Vectorized<acc_t>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      load<acc_t>(src + i).store(buffer + i);
    }
    for (; i < n; ++i) {
      buffer[i] = static_cast<acc_t>(src[i]);
    }
    return buffer;
  }
}

// Values a buffer for widen() or output_chunk() needs: none where the values are used in place.
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

template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* chunk, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    at::vec::convert(chunk, dst, n);
  }
}

// Writes a chunk computed in the accumulation type to its destination.
template <typename scalar_t, typename acc_t>
inline void store(const acc_t* chunk, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy_n(chunk, n, dst);
  } else {
    at::vec::convert(chunk, dst, n);
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
// belongs to channel i (PerChannel).
template <typename acc_t>
struct Uniform {
  acc_t value;
  Vectorized<acc_t> vec(int64_t /*i*/) const { return Vectorized<acc_t>(value); }
  acc_t operator[](int64_t /*i*/) const { return value; }
};

template <typename acc_t>
struct PerChannel {
  const acc_t* values;
  Vectorized<acc_t> vec(int64_t i) const { return Vectorized<acc_t>::loadu(values + i); }
  acc_t operator[](int64_t i) const { return values[i]; }
};

// Reductions run kUnroll vectors per step; a running total keeps one accumulator per slot, so
// the adds form kUnroll independent chains instead of one that waits on each add's latency.
constexpr int kUnroll = 4;

// Where a reduction's terms go: one running total (a planar run, all one channel), or the
// per-channel totals at each element's own index (a row of channels). `slot` < kUnroll is the
// position of a vector within its step.
template <typename acc_t>
struct RunTotal {
  Vectorized<acc_t> lanes[kUnroll];
  acc_t tail = 0;
  RunTotal() {
    for (auto& lane : lanes) {
      lane = Vectorized<acc_t>(acc_t(0));
    }
  }
  void add(int slot, int64_t /*i*/, const Vectorized<acc_t>& v) { lanes[slot] += v; }
  void add(int64_t /*i*/, acc_t v) { tail += v; }
  acc_t total() const {
    Vectorized<acc_t> sum = lanes[0];
    for (int slot = 1; slot < kUnroll; ++slot) {
      sum += lanes[slot];
    }
    return horizontal_sum(sum) + tail;
  }
};

template <typename acc_t>
struct ChannelTotals {
  acc_t* totals;
  void add(int /*slot*/, int64_t i, const Vectorized<acc_t>& v) {
    (Vectorized<acc_t>::loadu(totals + i) + v).store(totals + i);
  }
  void add(int64_t i, acc_t v) { totals[i] += v; }
};

// Calls vector_step(slot, i) on [0, n) kUnroll vectors at a time, then on the remaining whole
// vectors (slot 0), and returns where the scalar tail starts.
template <typename acc_t, typename F>
inline int64_t for_each_vector(int64_t n, const F& vector_step) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + kUnroll * V <= n; i += kUnroll * V) {
    for (int slot = 0; slot < kUnroll; ++slot) {
      vector_step(slot, i + slot * V);
    }
  }
  for (; i + V <= n; i += V) {
    vector_step(0, i);
  }
  return i;
}

// A mean of zero: `centered` leaves x as it is.
template <typename acc_t>
struct Zero {};

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

// Σ (x - shift), the shift being a sample of the channel so that the terms are small.
template <typename acc_t, typename T, typename P, typename Out>
inline void reduce_shifted(const T* x, int64_t n, const P& shift, Out& out) {
  int64_t i = for_each_vector<acc_t>(n, [&](int slot, int64_t j) { out.add(slot, j, load<acc_t>(x + j) - shift.vec(j)); });
  for (; i < n; ++i) {
    out.add(i, acc_t(static_cast<acc_t>(x[i]) - shift[i]));
  }
}

// Σ ((x - hi) - lo)², the second pass of a two-pass variance.
template <typename acc_t, typename T, typename P, typename Out>
inline void reduce_sq_centered(const T* x, int64_t n, const P& hi, const P& lo, Out& out) {
  using Vec = Vectorized<acc_t>;
  int64_t i = for_each_vector<acc_t>(n, [&](int slot, int64_t j) {
    const Vec d = centered(load<acc_t>(x + j), hi, lo, j);
    out.add(slot, j, d * d);
  });
  for (; i < n; ++i) {
    const acc_t d = centered(static_cast<acc_t>(x[i]), hi, lo, i);
    out.add(i, acc_t(d * d));
  }
}

// Σ dy and Σ dy·(x - mean): everything backward needs from a pass over x and dy.
template <typename acc_t, typename D, typename T, typename P, typename Out>
inline void reduce_dy_dot(const D* dy, const T* x, int64_t n, const P& hi, const P& lo, Out& sum, Out& dot) {
  using Vec = Vectorized<acc_t>;
  int64_t i = for_each_vector<acc_t>(n, [&](int slot, int64_t j) {
    const Vec g = load<acc_t>(dy + j);
    sum.add(slot, j, g);
    dot.add(slot, j, g * centered(load<acc_t>(x + j), hi, lo, j));
  });
  for (; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    sum.add(i, g);
    dot.add(i, acc_t(g * centered(static_cast<acc_t>(x[i]), hi, lo, i)));
  }
}

// y = ((x - hi) - lo) · scale + shift: the normalize pass, and (hi = lo = shift = 0) dy · scale.
template <typename acc_t, typename T, typename M, typename P>
inline void affine(
    const T* x, acc_t* y, int64_t n, const M& hi, const M& lo, const P& scale, const P& shift) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(centered(load<acc_t>(x + i), hi, lo, i), scale.vec(i), shift.vec(i)).store(y + i);
  }
  for (; i < n; ++i) {
    y[i] = centered(static_cast<acc_t>(x[i]), hi, lo, i) * scale[i] + shift[i];
  }
}

// affine() for a half or bfloat16 output: two vectors at a time, narrowed in registers (rounded
// to nearest even, as c10's conversion does) and stored, instead of through a float buffer.
template <typename acc_t, typename T, typename M, typename P>
inline void affine_narrow(
    const T* x, T* y, int64_t n, const M& hi, const M& lo, const P& scale, const P& shift) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec low = at::vec::fmadd(centered(load<acc_t>(x + i), hi, lo, i), scale.vec(i), shift.vec(i));
    const Vec high =
        at::vec::fmadd(centered(load<acc_t>(x + i + V), hi, lo, i + V), scale.vec(i + V), shift.vec(i + V));
    at::vec::convert_from_float<T>(low, high).store(y + i);
  }
  for (; i < n; ++i) {
    y[i] = static_cast<T>(centered(static_cast<acc_t>(x[i]), hi, lo, i) * scale[i] + shift[i]);
  }
}

// dx = dy · k: the input gradient in evaluation, where the statistics are constants (x is not
// read, so a NaN in x does not reach dx, as in torch).
template <typename acc_t, typename D, typename P>
inline void scale_by(const D* dy, acc_t* dx, int64_t n, const P& k) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (load<acc_t>(dy + i) * k.vec(i)).store(dx + i);
  }
  for (; i < n; ++i) {
    dx[i] = static_cast<acc_t>(dy[i]) * k[i];
  }
}

// Training-mode input gradient: dx = dy·k1 - (x - mean)·k2 - k3, with per-channel
// k1 = weight·invstd, k2 = k1·invstd²·Σdy(x-mean)/n, k3 = k1·Σdy/n.
template <typename acc_t, typename D, typename T, typename P>
inline void grad_input(
    const D* dy,
    const T* x,
    acc_t* dx,
    int64_t n,
    const P& hi,
    const P& lo,
    const P& k1,
    const P& k2,
    const P& k3) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = centered(load<acc_t>(x + i), hi, lo, i);
    (load<acc_t>(dy + i) * k1.vec(i) - d * k2.vec(i) - k3.vec(i)).store(dx + i);
  }
  for (; i < n; ++i) {
    dx[i] = static_cast<acc_t>(dy[i]) * k1[i] - centered(static_cast<acc_t>(x[i]), hi, lo, i) * k2[i] - k3[i];
  }
}

// z += r: the residual add of a fused layer.
template <typename acc_t>
inline void add_into(acc_t* z, const acc_t* r, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(z + i) + Vec::loadu(r + i)).store(z + i);
  }
  for (; i < n; ++i) {
    z[i] += r[i];
  }
}

// The signs of 8 consecutive values as one byte: bit k = z[k] > 0.
template <typename acc_t>
inline uint8_t sign_byte(const acc_t* z) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z), _mm256_setzero_ps(), _CMP_GT_OQ)));
  } else if constexpr (std::is_same_v<acc_t, double>) {
    const __m256d zero = _mm256_setzero_pd();
    return static_cast<uint8_t>(
        _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(z), zero, _CMP_GT_OQ)) |
        (_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(z + 4), zero, _CMP_GT_OQ)) << 4));
  }
#endif
  uint8_t bits = 0;
  for (int k = 0; k < 8; ++k) {
    bits |= static_cast<uint8_t>(z[k] > acc_t(0)) << k;
  }
  return bits;
}

// dz = bit set ? dy : slope * dy. With slope 0 the gradient is selected, not multiplied, as
// torch's threshold_backward does (an infinite dy gives 0, not NaN).
template <typename acc_t>
inline acc_t gate(acc_t dy, bool positive, acc_t slope) {
  return positive ? dy : (slope == acc_t(0) ? acc_t(0) : dy * slope);
}

// gate() for 8 consecutive values whose signs are the bits of one byte.
template <typename acc_t>
inline void gate_byte(acc_t* dz, const acc_t* dy, uint8_t bits, acc_t slope) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i positive = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bit), lane_bit);
    const __m256 g = _mm256_loadu_ps(dy);
    const __m256 negative = slope == 0.0f ? _mm256_setzero_ps() : _mm256_mul_ps(g, _mm256_set1_ps(slope));
    _mm256_storeu_ps(dz, _mm256_blendv_ps(negative, g, _mm256_castsi256_ps(positive)));
    return;
  }
#endif
  for (int k = 0; k < 8; ++k) {
    dz[k] = gate(dy[k], (bits >> k) & 1, slope);
  }
}

// Bits [bit, bit + n) of `mask` |= (z > 0). Partial bytes at either end may be shared with the
// run another thread writes, so they are OR-ed atomically; whole bytes are plain stores.
template <typename acc_t>
inline void write_sign_bits(uint8_t* mask, int64_t bit, const acc_t* z, int64_t n) {
  int64_t i = 0;
  const auto or_partial = [&](int64_t count) {
    uint8_t bits = 0;
    for (int64_t k = 0; k < count; ++k, ++i) {
      bits |= static_cast<uint8_t>(z[i] > acc_t(0)) << ((bit + i) & 7);
    }
    __atomic_fetch_or(mask + ((bit + i - 1) >> 3), bits, __ATOMIC_RELAXED);
  };
  const int64_t head = std::min(n, (8 - (bit & 7)) & 7);
  if (head > 0) {
    or_partial(head);
  }
  for (; i + 8 <= n; i += 8) {
    mask[(bit + i) >> 3] = sign_byte(z + i);
  }
  if (i < n) {
    or_partial(n - i);
  }
}

// z = z > 0 ? z : slope * z. ReLU (slope 0) takes max(z, 0) instead, so that -inf gives 0 as
// in torch rather than -inf * 0; NaN stays NaN either way.
template <typename acc_t>
inline void leaky_relu(acc_t* z, int64_t n, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), k(slope);
  int64_t i = 0;
  if (slope == acc_t(0)) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      at::vec::maximum(Vec::loadu(z + i), zero).store(z + i);
    }
  } else {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec v = Vec::loadu(z + i);
      Vec::blendv(v * k, v, v > zero).store(z + i);
    }
  }
  for (; i < n; ++i) {
    z[i] = z[i] > acc_t(0) || std::isnan(z[i]) ? z[i] : (slope == acc_t(0) ? acc_t(0) : z[i] * slope);
  }
}

// dz = gate(dy) by bits [bit, bit + n) of `mask`.
template <typename acc_t>
inline void gate_by_sign_bits(acc_t* dz, const acc_t* dy, const uint8_t* mask, int64_t bit, int64_t n, acc_t slope) {
  int64_t i = 0;
  const auto gate_bits = [&](int64_t end) {
    for (; i < end; ++i) {
      dz[i] = gate(dy[i], (mask[(bit + i) >> 3] >> ((bit + i) & 7)) & 1, slope);
    }
  };
  gate_bits(std::min(n, (8 - (bit & 7)) & 7));
  for (; i + 8 <= n; i += 8) {
    gate_byte(dz + i, dy + i, mask[(bit + i) >> 3], slope);
  }
  gate_bits(n);
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
