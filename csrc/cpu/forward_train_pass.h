// Forward-train on the CPU: each channel's mean and variance, then the write pass.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "../activation.h"
#include "../layout.h"
#include "aligned_vector.h"
#include "cache_policy.h"
#include "channel_affine.h"
#include "fetch_ahead.h"
#include "moments.h"
#include "normalize_pass.h"
#include "planar_plan.h"
#include "reductions.h"
#include "row_plan.h"
#include "run_sources.h"
#include "statistics_terms.h"
#include "work_units.h"

#include <ATen/OpMathType.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// The sums of a chunk's terms, channel by channel, as planar_moments asks: run by run.
template <typename acc_t, typename scalar_t>
struct SumByRun {
  const scalar_t* x;
  const PlanarPlan& plan;
  int64_t c0, c1;
  // Room for two sums per channel, reused chunk after chunk: allocated per chunk (a plane at
  // 56x56), they made forward-train 12% slower there.
  mutable RunTotals<acc_t> totals{2 * (c1 - c0)};

  template <typename Term>
  void operator()(int64_t b0, int64_t b1, int64_t offset, int64_t length, const Term& term,
                  const AlignedVector<acc_t>& a, const AlignedVector<acc_t>& b, std::vector<double>& into) const {
    constexpr size_t K = sum_count<acc_t, Term>;
    totals.reset();
    const int64_t distance = plan.fetch_distance();
    plan.for_each_run(c0, c1, b0, b1, offset, length, [&](int64_t i, int64_t first, int64_t n) {
      reduce_terms<acc_t>(x + first, n, term, Uniform<acc_t>{a[i]}, Uniform<acc_t>{b[i]}, totals.data() + i * K,
                          FetchAhead::of<scalar_t>(x + first, nullptr, distance));
    });
    const int64_t channels = c1 - c0;
    for (const auto i : c10::irange(channels)) {
      for (const auto k : c10::irange(K)) {
        into[k * channels + i] = static_cast<double>(totals[i * K + k].total());
      }
    }
  }
};

// The same by position: each position summed down the chunk's rows, then a channel's
// positions added in order.
template <typename acc_t, typename scalar_t>
struct SumByPosition {
  const scalar_t* x;
  const PlanarPlan& plan;
  int64_t c0, c1;
  // Per-position totals of up to two sums, reused chunk after chunk.
  mutable std::vector<double> total = std::vector<double>(2 * (c1 - c0) * plan.s.inner);

  template <typename Term>
  void operator()(int64_t b0, int64_t b1, int64_t /*offset: 0*/, int64_t /*length: inner*/, const Term& term,
                  const AlignedVector<acc_t>& a, const AlignedVector<acc_t>& b, std::vector<double>& into) const {
    constexpr int64_t K = sum_count<acc_t, Term>;
    const int64_t inner = plan.s.inner;
    const int64_t channels = c1 - c0;
    const auto a_at = spread(a.data(), channels, inner), b_at = spread(b.data(), channels, inner);
    const PerChannel<acc_t> a_of{a_at.data()}, b_of{b_at.data()};
    reduce_columns<acc_t>(x + plan.plane(b0, c0), b1 - b0, channels * inner, plan.s.channels * inner, term, a_of, b_of,
                          total.data(), /*fetch_ahead=*/false);
    std::fill(into.begin(), into.begin() + K * channels, 0.0);
    for (const auto k : c10::irange(K)) {
      add_positions(total.data() + k * channels * inner, channels, inner, into.data() + k * channels);
    }
  }
};

// The mean of a run's first values (at most kShiftValues of them), in double.
template <typename scalar_t>
double leading_mean(const scalar_t* run, int64_t length) {
  const int64_t n = std::min(length, kShiftValues);
  double sum = 0;
  for_each_as_double(run, n, [&](int64_t, double value) { sum += value; });
  return sum / static_cast<double>(n);
}

// Per channel of [c0, c1): the moments of its values, chunk by chunk (see PlanarPlan), the chunks
// merged in order with Chan's update. A chunk is read once: Σd and Σd² of d = x - shift, the
// shift being the channel's mean over its chunks so far (in its first chunk, the mean of the
// chunk's first values), near the chunk's own mean (see OnePassMoments). A channel whose M2
// would cancel gets the chunk's mean and M2 from a second pass, from cache. With that
// second pass for every chunk, forward-train took up to 40% longer at ResNet-50's shapes (even
// at 32x512x14x14 float32; interleaved A/B, 2 threads). `make_reduce(c0, c1)` gives the reducer
// (SumByRun, SumByPosition) of channels [c0, c1): reduce(b0, b1, offset, length, term, a, b,
// into) sets into[k·(c1 - c0) + i] to the k-th sum of term(x, a, b) over channel c0 + i's values
// in the chunk.
template <typename acc_t, typename scalar_t, typename MakeReduce>
std::vector<Moments> planar_moments(const scalar_t* x, const PlanarPlan& plan, int64_t c0, int64_t c1,
                                    const MakeReduce& make_reduce) {
  const int64_t channels = c1 - c0;
  const auto reduce = make_reduce(c0, c1);
  std::vector<Moments> moments(channels);
  AlignedVector<acc_t> shift(channels);
  std::vector<double> sums(2 * channels), exact(2);
  plan.for_each_chunk_range([&](int64_t b0, int64_t b1, int64_t offset, int64_t length) {
    const double count = static_cast<double>((b1 - b0) * length);
    const double inverse_count = 1.0 / count;
    for (const auto i : c10::irange(channels)) {
      const double so_far =
          moments[i].count > 0 ? moments[i].mean : leading_mean(x + plan.plane(b0, c0 + i) + offset, length);
      shift[i] = static_cast<acc_t>(so_far);
    }
    reduce(b0, b1, offset, length, ShiftedMoments<acc_t>{}, shift, shift, sums);
    for (const auto i : c10::irange(channels)) {
      const OnePassMoments one_pass(inverse_count, sums[i], sums[channels + i]);
      double mean = static_cast<double>(shift[i]) + one_pass.offset;
      double m2 = one_pass.m2;
      if (one_pass.cancels) {
        const auto m = split_mean<acc_t>(mean);
        make_reduce(c0 + i, c0 + i + 1)(b0, b1, offset, length, CenteredMoments<acc_t>{}, AlignedVector<acc_t>{m.hi},
                                        AlignedVector<acc_t>{m.lo}, exact);
        const OnePassMoments two_pass(inverse_count, exact[0], exact[1]);
        mean += two_pass.offset;
        m2 = two_pass.m2;
      }
      moments[i].merge(count, mean, m2);
    }
  });
  return moments;
}

// NCHW: each task owns groups of channels and runs statistics and normalization of a group back
// to back, so the normalize pass reads the group from cache.
template <typename scalar_t>
void forward_train_planar(const scalar_t* x, scalar_t* y, const Shape& s, const double* weight,
                          const double* bias, double eps, const Epilogue& epilogue, double* mean_out,
                          double* invstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const PlanarPlan plan(s, sizeof(scalar_t));
  const bool rows = plan.writes_rows(kShortPlane, Vectorized<acc_t>::size());
  const bool fetch_output =
      fetches_output_ahead(s, sizeof(scalar_t), NormalizeWriter<scalar_t>::pass_tensors(epilogue));
  plan.for_each_group([&](int64_t c0, int64_t c1, bool next) {
    const int64_t channels = c1 - c0;
    const auto moments =
        plan.by_position()
            ? planar_moments<acc_t>(x, plan, c0, c1,
                                    [&](int64_t a, int64_t b) { return SumByPosition<acc_t, scalar_t>{x, plan, a, b}; })
            : planar_moments<acc_t>(x, plan, c0, c1,
                                    [&](int64_t a, int64_t b) { return SumByRun<acc_t, scalar_t>{x, plan, a, b}; });
    std::vector<double> scale(channels);
    for (const auto i : c10::irange(channels)) {
      const int64_t c = c0 + i;
      mean_out[c] = moments[i].mean;
      invstd_out[c] = 1.0 / std::sqrt(moments[i].m2 / moments[i].count + eps);
      scale[i] = (weight ? weight[c] : 1.0) * invstd_out[c];
    }
    // Means folded as in evaluation. By position, where each coefficient is a load per vector,
    // forward-train at 32x512x7x7 and 32x2048x7x7 was 1.13-1.33x faster so in float32 and
    // 1.07-1.19x in bfloat16 (interleaved A/B, 2 threads); plane by plane it is a subtraction less.
    const ChannelAffine<acc_t> affine(channels, /*group_rows=*/1, mean_out + c0, scale.data(), bias ? bias + c0 : nullptr);
    // Runs that are not whole lines (14x14 float32 planes) of a streamed output are staged: the
    // group was just read, so its pass reads from cache and the memory only takes what is
    // written. Forward-train at 32x1024x14x14 float32 was 1.39x faster so, backward (the same
    // for dx) 1.09x; evaluation, whose input comes from memory, was 0.8-0.9x as fast, the
    // write-outs taking turns with the reads instead of overlapping them (interleaved A/B on
    // the AMD EPYC VM, 2 threads), so that its runs are not staged (see SharedLineStores).
    StagedStores<scalar_t> stage;
    NormalizeWriter<scalar_t> writer(x, y, s, epilogue, &stage);
    write_planar_group(plan, rows, c0, c1, affine, 0, writer, fetch_output,
                       plan.next_group_distance(c0, c1, next, writer.stream));
  });
}

// The per-column mean of kShiftRows rows (all rows when fewer) spread over the rows layout at a
// golden-ratio stride: evenly spaced rows would all be the same pixel (a corner, where a padded
// convolution's output differs) of every other image.
template <typename acc_t, typename scalar_t>
AlignedVector<acc_t> sampled_mean(const scalar_t* x, int64_t rows, int64_t C) {
  constexpr double kGoldenRatio = 0.6180339887498949;
  const int64_t samples = std::min(rows, kShiftRows);
  std::vector<double> sum(C, 0.0);
  for (const auto k : c10::irange(samples)) {
    const double at = std::fmod((static_cast<double>(k) + 0.5) * kGoldenRatio, 1.0);
    const scalar_t* row = x + (samples == rows ? k : static_cast<int64_t>(at * static_cast<double>(rows))) * C;
    for_each_as_double(row, C, [&](int64_t c, double value) { sum[c] += value; });
  }
  AlignedVector<acc_t> mean(C);
  for (const auto c : c10::irange(C)) {
    mean[c] = static_cast<acc_t>(sum[c] / static_cast<double>(samples));
  }
  return mean;
}

// Channels-last: each block of rows gets its mean and M2 from one pass over memory, Σd and Σd²
// of d = x - shift, the shift being a sampled mean (sampled_mean) and so near the block's own
// (see OnePassMoments). Where a column's M2 would cancel, the block's mean and M2 come from a
// second pass over that column. With that second pass for every block (blocks of kBlockValues
// then, read from L2, and no fetch-ahead), forward-train took 13-37% longer at ResNet-50's
// shapes (float32 and bfloat16, interleaved A/B, 2 threads). The blocks are then merged with the
// two-pass formula over their means, M2 = Σ (m2_b + n_b·(mean_b - mean)²), in loops that run
// along the channels.
template <typename scalar_t>
void forward_train_rows(const scalar_t* x, scalar_t* y, const Shape& s, const double* weight,
                        const double* bias, double eps, const Epilogue& epilogue, double* mean_out,
                        double* invstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowPlan plan(s, kStatsBlockValues);
  const int64_t C = s.channels;
  // A channel's sums in the accumulation type cover the rows of a kBlockValues block.
  const int64_t piece_rows = std::min(kChunk, RowPlan::wanted_rows(C, kBlockValues));
  // The blocks keep their means relative to the shift.
  const auto shift = sampled_mean<acc_t>(x, plan.rows, C);
  // Per block, the channels' Σd then Σd², turned in place into their mean offsets and M2s. Not
  // zero-filled: reduce_columns writes every value (zeroing it took as long as the offsets).
  const std::unique_ptr<double[]> block_moments(new double[plan.num_blocks * 2 * C]);
  const auto offset_of = [&](int64_t block) { return block_moments.get() + block * 2 * C; };
  const auto m2_of = [&](int64_t block) { return offset_of(block) + C; };
  // Where x alone passes the bound of streams_output, and so comes from memory, narrow float rows
  // are read in memory order (reduce_columns's by_rows): float32 forward-train 1.04-1.15x faster at
  // 32x64x112x112, 32x256x56x56 and 32x128x56x56 (in-process A/B, medians of 9-11 interleaved
  // rounds, AMD EPYC Zen 3 VM, 2 threads). From the cache (25.7 MB) it was 0.85-0.93x as fast as
  // strips, and bfloat16, widened as it is read, 0.92-1.05x; in a standalone loop rows of 2 KiB
  // were slower than strips.
  const bool by_rows = std::is_same_v<scalar_t, acc_t> &&
                       C * static_cast<int64_t>(sizeof(scalar_t)) <= kMaxRowWalkBytes &&
                       pass_bytes(s, sizeof(scalar_t), /*tensors=*/1) >= cache_bytes();
  for_each_block(plan.num_blocks, /*recent_first=*/false, [&](int64_t block) {
    const int64_t rows = plan.rows_in(block);
    const scalar_t* rows_x = x + plan.block_start(block) * C;
    const PerChannel<acc_t> shift_of{shift.data()};
    double* offset = offset_of(block);
    double* m2 = m2_of(block);
    reduce_columns<acc_t>(rows_x, rows, C, C, ShiftedMoments<acc_t>{}, shift_of, shift_of, offset,
                          /*fetch_ahead=*/true, by_rows, piece_rows);
    const double inverse_rows = 1.0 / static_cast<double>(rows);
    // Runs of columns whose M2 would cancel (their mean far from the shift), each [first, last].
    // A far column at most a cache line of x past a run's last joins the run, whose pass reads
    // that line anyway; columns between runs are not read again. One pass from the first far
    // column to the last read about a tenth of x again at 32x2048x7x7 on normal data, where a
    // block's mean lies 3.6 standard deviations of the 16-row sample from it in a few channels
    // per call: forward-train there 1.06x faster with runs, 1.01-1.04x at 32x1024x14x14,
    // 32x512x28x28 and 32x512x14x14, and 1.02x at 32x64x56x56, which has no far block (medians
    // of 21 interleaved rounds in one process, AMD EPYC Zen 3 VM, 2 threads).
    constexpr int64_t kLineColumns = kLineBytes / static_cast<int64_t>(sizeof(scalar_t));
    std::vector<std::pair<int64_t, int64_t>> far_runs;
    const auto note_far = [&](int64_t c) {
      if (!far_runs.empty() && c - far_runs.back().second <= kLineColumns) {
        far_runs.back().second = c;
      } else {
        far_runs.emplace_back(c, c);
      }
    };
    // Vectors of channels: one channel at a time, with a division each, this was 5-6% of
    // forward-train's samples at 32x512x7x7 (one thread), whose 64-row blocks leave a channel's
    // sums per 64 values; so it is 2%.
    using DoubleVec = Vectorized<double>;
    constexpr int kLanes = DoubleVec::size();
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      const OnePassMoments one_pass(DoubleVec(inverse_rows), DoubleVec::loadu(offset + c), DoubleVec::loadu(m2 + c));
      one_pass.offset.store(offset + c);
      one_pass.m2.store(m2 + c);
      // A bit per lane whose M2 does not cancel.
      const int near = one_pass.cancels.zero_mask();
      if (near != (1 << kLanes) - 1) {
        for (int lane = 0; lane < kLanes; ++lane) {
          if (!(near >> lane & 1)) {
            note_far(c + lane);
          }
        }
      }
    }
    for (; c < C; ++c) {
      const OnePassMoments one_pass(inverse_rows, offset[c], m2[c]);
      offset[c] = one_pass.offset;
      m2[c] = one_pass.m2;
      if (one_pass.cancels) {
        note_far(c);
      }
    }
    for (const auto& [first, last] : far_runs) {
      const int64_t width = last + 1 - first;
      AlignedVector<acc_t> hi(width), lo(width);
      for (const auto i : c10::irange(width)) {
        const auto m = split_mean<acc_t>(static_cast<double>(shift[first + i]) + offset[first + i]);
        hi[i] = m.hi;
        lo[i] = m.lo;
      }
      std::vector<double> exact(2 * width);
      reduce_columns<acc_t>(rows_x + first, rows, width, C, CenteredMoments<acc_t>{}, PerChannel<acc_t>{hi.data()},
                            PerChannel<acc_t>{lo.data()}, exact.data(), /*fetch_ahead=*/false, /*by_rows=*/false,
                            piece_rows);
      for (const auto i : c10::irange(width)) {
        const OnePassMoments two_pass(inverse_rows, exact[i], exact[width + i]);
        offset[first + i] += two_pass.offset;
        m2[first + i] = two_pass.m2;
      }
    }
  });
  const double count = static_cast<double>(plan.rows);
  std::vector<double> mean_offset(C, 0.0), m2(C, 0.0);
  for (const auto block : c10::irange(plan.num_blocks)) {
    const double n = static_cast<double>(plan.rows_in(block));
    const double* offset = offset_of(block);
    for (const auto c : c10::irange(C)) {
      mean_offset[c] += n * offset[c];
    }
  }
  for (const auto c : c10::irange(C)) {
    mean_offset[c] /= count;
  }
  for (const auto block : c10::irange(plan.num_blocks)) {
    const double n = static_cast<double>(plan.rows_in(block));
    const double* offset = offset_of(block);
    const double* block_m2 = m2_of(block);
    for (const auto c : c10::irange(C)) {
      const double d = offset[c] - mean_offset[c];
      m2[c] += block_m2[c] + n * d * d;
    }
  }
  for (const auto c : c10::irange(C)) {
    mean_out[c] = static_cast<double>(shift[c]) + mean_offset[c];
    invstd_out[c] = 1.0 / std::sqrt(m2[c] / count + eps);
  }
  const auto scale = scale_by_invstd(s, weight, invstd_out);
  normalize_impl(x, y, s, ChannelAffine<acc_t>(C, plan.group_rows, mean_out, scale.data(), bias), epilogue,
                 /*recent_first=*/true);
}

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
