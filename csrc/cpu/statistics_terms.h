// The terms the statistics passes sum over a run: Σd and Σd² around a shift or around the mean.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "run_sources.h"

#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

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

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
