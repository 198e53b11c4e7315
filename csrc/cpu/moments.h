// Means and variances merged in double, and a mean split into two values of the accumulation
// type for sums around it.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include <utility>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename acc_t>
struct MeanSplit {
  acc_t hi;
  acc_t lo;
};

template <typename acc_t>
MeanSplit<acc_t> split_mean(double mean) {
  const acc_t hi = static_cast<acc_t>(mean);
  return {hi, static_cast<acc_t>(mean - static_cast<double>(hi))};
}

// Count, mean and sum of squared deviations of a set of values, merged pairwise in double
// (Chan, Golub and LeVeque), in a fixed order.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double other_mean, double other_m2) {
    const double merged = count + n;
    const double delta = other_mean - mean;
    mean += delta * n / merged;
    m2 += other_m2 + delta * delta * count * n / merged;
    count = merged;
  }
};

// The mean's offset from the shift and M2 of n values, from their one-pass sums Σd and Σd² of
// d = x - shift (ShiftedMoments) and 1/n: M2 = Σd² - (Σd)²/n. `cancels` where the mean's share
// (Σd)²/n is more than half of Σd², so that M2 would lose more than a bit: there a second pass
// is due, whose sums around the mean this one found (CenteredMoments) give, by the same formula,
// that mean's correction and the exact M2. T is double, or Vectorized<double> for several
// channels at once (`cancels` then a mask of lanes); 1/n is computed once for all of them.
template <typename T>
struct OnePassMoments {
  T offset, m2;
  decltype(std::declval<T>() > std::declval<T>()) cancels;
  OnePassMoments(T inverse_n, T sum, T sum_of_squares)
      : offset(sum * inverse_n), m2(sum_of_squares - sum * offset), cancels(sum * offset > sum_of_squares * T(0.5)) {}
};

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
