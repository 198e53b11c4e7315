// The normalize pass's write loops: the general one, with a kept mean, a residual and an
// activation, and the plain affine loops of float rows and planes.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "fused_activation.h"
#include "run_sources.h"
#include "run_stores.h"
#include "vector_loads.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <type_traits>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

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

// y = ((x - hi[c]) - lo[c]) · scale[c] + shift[c] over the whole NCHW planes [p0, p1), `plane`
// values each (at least V), walked as one stream: a vector that straddles two planes takes each
// lane's coefficients from its own plane, blended in registers, so that a short plane costs no
// loop and no scalar or overlapping last vector of its own. `coefficients` holds the per-channel
// scale, shift, hi and lo (ChannelAffine's); without kCentered (no mean kept apart, see
// ChannelAffine) hi and lo are not read and y = x · scale[c] + shift[c]. Computed in T's
// accumulation type as normalize_run computes it, bit for bit: where a call keeps some means,
// the channels that fold theirs subtract zeros, which changes no value. Half and bfloat16 are
// widened and narrowed in registers, V values at a time.
template <bool kCentered, typename T, typename acc_t = at::opmath_type<T>>
TORCH_BN_FLATTEN inline void affine_planes(const T* x, T* y, int64_t plane, int64_t channels, int64_t p0, int64_t p1,
                                           const std::array<const acc_t*, 4>& coefficients) {
  using Vec = Vectorized<acc_t>;
  // A channel's coefficients as named members, blended one by one: looped over as an array, the
  // same blends made float32 with kept means 1.4-1.9x slower than plane by plane.
  struct Coefficients {
    Vec scale, shift, hi, lo;
  };
  constexpr int64_t V = Vec::size();
  const acc_t* const scale = coefficients[0];
  const acc_t* const shift = coefficients[1];
  const acc_t* const hi = coefficients[2];
  const acc_t* const lo = coefficients[3];
  const RunStores through_cache(y, 0, /*stream=*/false);
  const Vec lane = Vec::arange(acc_t(0), acc_t(1));
  const int64_t first = p0 * plane;
  const int64_t n = (p1 - p0) * plane;
  const auto of_channel = [&](int64_t c) {
    if constexpr (kCentered) {
      return Coefficients{Vec(scale[c]), Vec(shift[c]), Vec(hi[c]), Vec(lo[c])};
    } else {
      return Coefficients{Vec(scale[c]), Vec(shift[c]), Vec(), Vec()};
    }
  };
  const auto blended = [&](const Coefficients& a, const Coefficients& b, const Vec& take_b) {
    const auto blend = [&](const Vec& u, const Vec& v) { return Vec::blendv(u, v, take_b); };
    if constexpr (kCentered) {
      return Coefficients{blend(a.scale, b.scale), blend(a.shift, b.shift), blend(a.hi, b.hi), blend(a.lo, b.lo)};
    } else {
      return Coefficients{blend(a.scale, b.scale), blend(a.shift, b.shift), Vec(), Vec()};
    }
  };
  const auto value = [&](int64_t i, const Coefficients& k) {
    Vec v = load<acc_t>(x + first + i);
    if constexpr (kCentered) {
      v = (v - k.hi) - k.lo;
    }
    return at::vec::fmadd(v, k.scale, k.shift);
  };
  const auto store = [&](const Vec& v, int64_t i) { store_one(v, y + first + i, through_cache); };
  int64_t c = p0 % channels;
  Coefficients k_c = of_channel(c);
  int64_t left = plane;  // values of channel c's plane from i on
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    if (left > V) {
      store(value(i, k_c), i);
      left -= V;
      continue;
    }
    // Lanes from `left` on belong to the next plane (none when left == V).
    c = c + 1 == channels ? 0 : c + 1;
    const Coefficients k_next = of_channel(c);
    store(value(i, blended(k_c, k_next, lane >= Vec(static_cast<acc_t>(left)))), i);
    k_c = k_next;
    left += plane - V;
  }
  if (i < n) {
    // The last V values lie in the last plane, whose coefficients these are.
    store(value(n - V, k_c), n - V);
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
