// Per-channel coefficients of y = (x - mean) * scale + shift, laid out for the write loops.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "aligned_vector.h"
#include "moments.h"

#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Per-channel y = ((x - hi) - lo) * scale + shift coefficients in the accumulation type, tiled
// `group_rows` times for the rows layout so that element i of a group of rows belongs to channel
// i % C. A null mean, scale or shift reads as zeros.
//
// The mean is folded into the shift where its share of the output is small, |mean·scale| <= 1 +
// |shift|: shift - mean·scale (in double) and a mean of 0, so that y = x·scale + shift is one
// multiply-add whose rounding is of the size of the centered form's. Elsewhere the mean is kept
// as hi + lo (split_mean), and `centered` says whether any channel kept it.
//
// One pass over the channels into the four arrays, then the tiling. Built a vector per step (the
// folded means, their halves, then each array tiled from doubles: eight allocations), the
// coefficients took 2.7 µs of the evaluation operator's 15 µs at 1x2048x1x1 float32 (one
// thread, AMD EPYC Zen 4 VM, perf), against 1.8 µs so.
template <typename acc_t>
struct ChannelAffine {
  struct Mean {
    AlignedVector<acc_t> hi, lo;
  } mean;
  AlignedVector<acc_t> scale, shift;
  bool centered = false;

  ChannelAffine(int64_t channels, int64_t group_rows, const double* mean_of, const double* scale_of,
                const double* shift_of)
      : mean{AlignedVector<acc_t>(channels * group_rows), AlignedVector<acc_t>(channels * group_rows)},
        scale(channels * group_rows),
        shift(channels * group_rows) {
    bool kept = false;
    for (const auto c : c10::irange(channels)) {
      const double m = mean_of ? mean_of[c] : 0.0;
      const double k = scale_of ? scale_of[c] : 0.0;
      const double b = shift_of ? shift_of[c] : 0.0;
      const bool folds = std::abs(m * k) <= 1.0 + std::abs(b);
      const auto split = split_mean<acc_t>(folds ? 0.0 : m);
      mean.hi[c] = split.hi;
      mean.lo[c] = split.lo;
      scale[c] = static_cast<acc_t>(k);
      shift[c] = static_cast<acc_t>(folds ? b - m * k : b);
      kept |= !folds;
    }
    centered = kept;
    for (auto* values : {&mean.hi, &mean.lo, &scale, &shift}) {
      for (int64_t row = channels; row < channels * group_rows; row += channels) {
        std::copy_n(values->begin(), channels, values->begin() + row);
      }
    }
  }
};

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
