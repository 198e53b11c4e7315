// Per-channel coefficients of y = (x - mean) * scale + shift, laid out for the write loops.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "aligned_vector.h"
#include "moments.h"

#include <c10/util/irange.h>

#include <cmath>
#include <vector>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Per-channel values in the accumulation type, tiled `group_rows` times for the rows layout so
// that element i of a group of rows belongs to channel i % C. A null `values` reads as zeros.
template <typename acc_t>
AlignedVector<acc_t> tile(const double* values, int64_t channels, int64_t group_rows) {
  AlignedVector<acc_t> tiled(channels * group_rows, acc_t(0));
  if (values) {
    for (int64_t row = 0; row < channels * group_rows; row += channels) {
      for (const auto c : c10::irange(channels)) {
        tiled[row + c] = static_cast<acc_t>(values[c]);
      }
    }
  }
  return tiled;
}

// The mean as hi + lo (see `centered`), tiled like `tile`.
template <typename acc_t>
struct TiledMean {
  AlignedVector<acc_t> hi, lo;
  TiledMean(const double* mean, int64_t channels, int64_t group_rows) {
    std::vector<double> hi_of(channels, 0.0), lo_of(channels, 0.0);
    for (const auto c : c10::irange(mean ? channels : 0)) {
      const auto m = split_mean<acc_t>(mean[c]);
      hi_of[c] = m.hi;
      lo_of[c] = m.lo;
    }
    hi = tile<acc_t>(hi_of.data(), channels, group_rows);
    lo = tile<acc_t>(lo_of.data(), channels, group_rows);
  }
};

// The per-channel mean and shift of y = (x - mean) * scale + shift, with the mean folded into the
// shift where its share of the output is small, |mean·scale| <= 1 + |shift|: shift - mean·scale
// (in double) and a mean of 0, so that y = x·scale + shift is one multiply-add whose rounding is
// of the size of the centered form's. `centered` says whether any channel kept its mean.
struct FoldedMeans {
  std::vector<double> mean, shift;
  bool centered = false;

  FoldedMeans(int64_t channels, const double* mean_of, const double* scale_of, const double* shift_of)
      : mean(channels, 0.0), shift(channels) {
    for (const auto c : c10::irange(channels)) {
      const double m = mean_of ? mean_of[c] : 0.0;
      const double k = scale_of ? scale_of[c] : 0.0;
      const double b = shift_of ? shift_of[c] : 0.0;
      if (std::abs(m * k) <= 1.0 + std::abs(b)) {
        shift[c] = b - m * k;
      } else {
        mean[c] = m;
        shift[c] = b;
        centered = true;
      }
    }
  }
};

// Per-channel y = ((x - hi) - lo) * scale + shift coefficients, the mean folded (FoldedMeans).
template <typename acc_t>
struct ChannelAffine {
  TiledMean<acc_t> mean;
  AlignedVector<acc_t> scale, shift;
  bool centered;

  ChannelAffine(int64_t channels, int64_t group_rows, const double* mean_of, const double* scale_of,
                const double* shift_of)
      : ChannelAffine(channels, group_rows, scale_of, FoldedMeans(channels, mean_of, scale_of, shift_of)) {}

 private:
  ChannelAffine(int64_t channels, int64_t group_rows, const double* scale_of, const FoldedMeans& folded)
      : mean(folded.mean.data(), channels, group_rows),
        scale(tile<acc_t>(scale_of, channels, group_rows)),
        shift(tile<acc_t>(folded.shift.data(), channels, group_rows)),
        centered(folded.centered) {}
};

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
