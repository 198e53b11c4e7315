// Backward on the CPU: each channel's Σdy and Σdy·(x - mean), then the input gradient.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "../activation.h"
#include "../layout.h"
#include "aligned_vector.h"
#include "cache_policy.h"
#include "fetch_ahead.h"
#include "fused_activation.h"
#include "grad_input_loops.h"
#include "moments.h"
#include "normalize_pass.h"
#include "planar_plan.h"
#include "reductions.h"
#include "row_plan.h"
#include "statistics_terms.h"
#include "work_units.h"

#include <ATen/OpMathType.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// dy of one task as the normalization's gradient dz: gated by the sign mask of a fused
// activation, and stored as the residual's gradient on the pass that asks for it.
template <typename scalar_t>
struct GradReader {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const uint8_t* mask;
  acc_t slope;
  scalar_t* grad_residual;
  AlignedVector<acc_t> gated;
  // Whether the passes' outputs (the input's and the residual's gradients) are streamed.
  bool stream;

  GradReader(const scalar_t* dy, const Shape& s, const GradPrologue& p)
      : dy(dy), mask(p.mask), slope(static_cast<acc_t>(p.slope)),
        grad_residual(static_cast<scalar_t*>(p.grad_residual)),
        gated(grad_residual ? chunk_buffer_size<scalar_t, acc_t>() : 0),
        stream(streams_output(s, sizeof(scalar_t), pass_tensors(p))) {}

  // The tensors a gradient pass moves: x, dy and dx, and a fused residual's gradient.
  static int64_t pass_tensors(const GradPrologue& p) { return p.grad_residual ? 4 : 3; }

  // Whether read gathers dz into a buffer: on the pass that stores the residual's gradient.
  bool gathers(bool store_residual_grad) const { return store_residual_grad && grad_residual; }

  // Calls use(dz) with the run's dz as a source for the loops, read and gated in registers; on
  // the pass that stores the residual's gradient, a chunk of dz gathered into a buffer first.
  // Returns what use returns. A dz that is not gathered (see gathers) reads dy in place, at any
  // offset from `first`, not only the run's n values.
  template <typename F>
  auto read(int64_t first, int64_t n, bool store_residual_grad, const F& use) {
    if (gathers(store_residual_grad)) {
      // Gathered in place when the gradient is in the accumulation type.
      acc_t* dz = output_chunk(grad_residual + first, gated.data());
      if (mask) {
        gather(SignGated<acc_t, scalar_t>{dy + first, mask, first, slope}, dz, n);
      } else {
        gather(Values<acc_t, scalar_t>{dy + first}, dz, n);
      }
      narrow(dz, grad_residual + first, n, stream);
      return use(Values<acc_t, acc_t>{dz});
    } else if (mask) {
      return use(SignGated<acc_t, scalar_t>{dy + first, mask, first, slope});
    } else {
      return use(Values<acc_t, scalar_t>{dy + first});
    }
  }
};

// Training-mode input-gradient coefficients of one channel (see grad_input).
struct GradCoefficients {
  double k1, k2, k3;
};

// In evaluation the statistics are constants: dx = dy * weight * invstd.
GradCoefficients grad_coefficients(bool training, double weight, double invstd, double sum_dy, double sum_dy_xmu,
                                   double n) {
  const double k1 = weight * invstd;
  if (!training) {
    return {k1, 0.0, 0.0};
  }
  return {k1, k1 * invstd * invstd * sum_dy_xmu / n, k1 * sum_dy / n};
}

// The input-gradient coefficients of channel c into k1[i], k2[i], k3[i], with the mean folded
// into k3 where it is at most a standard deviation from zero: dx = dy·k1 - x·k2 - (k3 - k2·mean),
// whose rounding is then of the size of the centered form's, and whose loop reads neither hi nor
// lo. A channel whose mean is kept leaves hi[i], lo[i] as they are; one whose mean is folded
// zeroes them. Returns whether any channel of [c0, c1) kept its mean. Interleaved A/B on the AMD
// EPYC VM (2 threads), backward old/new: channels-last 1.04-1.19x at ResNet-50 shapes, float32
// and bfloat16; NCHW 1.0-1.11x (by position at 7x7 the most: two loads less per vector).
template <typename acc_t>
bool fold_grad_coefficients(int64_t c0, int64_t c1, bool training, const double* mean, const double* invstd,
                            const double* weight, const double* sum_dy, const double* sum_dy_xmu, double n,
                            acc_t* hi, acc_t* lo, acc_t* k1, acc_t* k2, acc_t* k3) {
  bool centered = false;
  for (const auto c : c10::irange(c0, c1)) {
    const int64_t i = c - c0;
    const auto k = grad_coefficients(training, weight ? weight[c] : 1.0, invstd[c], sum_dy[c], sum_dy_xmu[c], n);
    k1[i] = static_cast<acc_t>(k.k1);
    k2[i] = static_cast<acc_t>(k.k2);
    if (std::abs(mean[c] * invstd[c]) <= 1.0) {
      k3[i] = static_cast<acc_t>(k.k3 - k.k2 * mean[c]);
      hi[i] = lo[i] = acc_t(0);
    } else {
      k3[i] = static_cast<acc_t>(k.k3);
      centered = true;
    }
  }
  return centered;
}

// Backward's Σdy and Σdy·(x - mean) of channels [c0, c1) by position (see
// PlanarPlan::by_position), added to sum_dy and sum_dy_xmu (hi and lo: the mean, index i for
// channel c0 + i): a group's planes of one batch are a row of positions, each summed down the
// chunk's rows in the accumulation type (a row in pieces of at most kChunk values, as GradReader
// gathers them), and a channel's positions are then added in double (add_positions, as
// SumByPosition does). Plane by plane, a 4x4 plane was two vectors added into one
// accumulator, each add waiting on the one before: operators against torch's, medians of 9
// interleaved rounds (AMD EPYC Zen 4 VM, 2 threads), the statistics at 128x512x4x4 float32 took
// 0.26 ms against 0.14 ms now (torch's 0.14), the whole backward 0.44 against 0.32 ms (torch's
// 0.33), 1.56 against 1.38 ms at 256x512x4x4 and 0.43 against 0.21 ms in bfloat16; at
// ResNet-50's 7x7 shapes even to 1.14x faster (bfloat16 32x512x7x7).
// With a `fetch_distance` (values from a row to the next batch's, or 0), each row's x and dy fetch
// the next batch's row first: a row is a few KiB, a channel count of planes apart, a new stream
// each that the hardware prefetchers learn too late. Operators, medians of 9 interleaved rounds
// (AMD EPYC Zen 4 VM, 2 threads): the statistics 1.45-1.61 -> 0.90-0.99 ms at 32x2048x7x7
// float32, the whole backward 2.65-2.75 -> 2.13-2.15 ms (torch's 4.5); 64x2048x7x7 bfloat16 1.96
// against 2.67 ms. From the cache it costs: 32x512x7x7 float32 backward 0.30 -> 0.32-0.33 ms,
// 24x1024x7x7 0.38-0.48 -> 0.46-0.51 ms.
template <typename scalar_t>
void sum_dy_dot_by_position(const PlanarPlan& plan, GradReader<scalar_t>& grad, const scalar_t* x, int64_t c0,
                            int64_t c1, const at::opmath_type<scalar_t>* hi, const at::opmath_type<scalar_t>* lo,
                            int64_t fetch_distance, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = c1 - c0;
  const int64_t inner = plan.s.inner;
  const int64_t width = channels * inner;
  const FetchAhead next_row = FetchAhead::of<scalar_t>(x, grad.dy, fetch_distance);
  const auto hi_at = spread(hi, channels, inner), lo_at = spread(lo, channels, inner);
  AlignedVector<acc_t> sums(width), dots(width);
  // Rows summed at once: each position's totals stay in registers down them (see
  // reduce_dy_dot_rows). Row by row, the totals were loaded and stored for every vector of every
  // row: half the loop's loads and all its stores. A gathered dz holds one row. Operators, one
  // thread, AMD EPYC Zen 4 VM, fastest of 15 rounds, alternating processes against the row-by-row
  // build: float32 32x512x7x7 396-454 -> 358-403 µs, bfloat16 283-288 -> 261 µs and 32x2048x7x7
  // 1.83-2.13 -> 1.34-1.47 ms; on 2 threads bfloat16 1.07-1.3x faster, float32 even (8 rows were as
  // fast as 4).
  constexpr int kRowsAtOnce = 4;
  const int64_t rows_at_once = grad.gathers(/*store_residual_grad=*/true) ? 1 : kRowsAtOnce;
  const int64_t row_stride = plan.s.channels * inner;
  plan.for_each_chunk_range([&](int64_t b0, int64_t b1, int64_t /*offset: 0*/, int64_t /*length: inner*/) {
    std::fill(sums.begin(), sums.end(), acc_t(0));
    std::fill(dots.begin(), dots.end(), acc_t(0));
    for (int64_t b = b0; b < b1; b += rows_at_once) {
      const int64_t rows = std::min(rows_at_once, b1 - b);
      const int64_t row = plan.plane(b, c0);
      for (const auto r : c10::irange(rows)) {
        next_row.fetch(row + r * row_stride, width);
      }
      for_each_chunk(width, [&](int64_t at, int64_t n) {
        grad.read(row + at, n, /*store_residual_grad=*/true, [&](const auto& dz) {
          reduce_dy_dot_rows<kRowsAtOnce, acc_t>(dz, x + row + at, rows, n, row_stride,
                                                 PerChannel<acc_t>{hi_at.data() + at},
                                                 PerChannel<acc_t>{lo_at.data() + at}, sums.data() + at,
                                                 dots.data() + at);
        });
      });
    }
    add_positions(sums.data(), channels, inner, sum_dy + c0);
    add_positions(dots.data(), channels, inner, sum_dy_xmu + c0);
  });
}

// Backward's Σdy and Σdy·(x - mean) of channels [c0, c1) channel by channel (see
// PlanarPlan::channel_by_channel), added to sum_dy and sum_dy_xmu (hi and lo as in
// sum_dy_dot_by_position): a channel's planes of a chunk are summed one after another into one
// DyDotCarry, in the accumulation type, and chunks in double.
template <typename scalar_t>
void sum_dy_dot_by_channel(const PlanarPlan& plan, GradReader<scalar_t>& grad, const scalar_t* x, int64_t c0,
                           int64_t c1, const at::opmath_type<scalar_t>* hi, const at::opmath_type<scalar_t>* lo,
                           double* sum_dy, double* sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  plan.for_each_chunk_range([&](int64_t b0, int64_t b1, int64_t offset, int64_t length) {
    for (const auto c : c10::irange(c0, c1)) {
      const Uniform<acc_t> mean_hi{hi[c - c0]}, mean_lo{lo[c - c0]};
      DyDotCarry<acc_t> carry;
      for (const auto b : c10::irange(b0, b1)) {
        const int64_t first = plan.plane(b, c) + offset;
        // The carry captured by value: by reference, it would live in memory.
        carry = grad.read(first, length, /*store_residual_grad=*/true,
                          [carry, run = x + first, length, mean_hi, mean_lo](const auto& dz) {
                            return carry_dy_dot(carry, dz, run, length, mean_hi, mean_lo);
                          });
      }
      sum_dy[c] += static_cast<double>(carry.sum());
      sum_dy_xmu[c] += static_cast<double>(carry.dot());
    }
  });
}

// The backward of channels [c0, c1) one channel at a time, where planes are short and written as
// runs through the cache (not streamed): a channel's sums (sum_dy_dot_by_channel on it alone),
// then its input gradient at once, with its coefficients in registers and its planes still in
// L1, as torch.nn's kernel does; hi and lo as in sum_dy_dot_by_position. The group's write pass
// after its statistics had each plane's run take its coefficients from the group's arrays and
// read the group back from L2. Operators against torch's, medians of 9 interleaved rounds, two
// alternating process pairs against that build (AMD EPYC Zen 4 VM, 2 threads), float32 with the
// means kept: 16x512x7x7 0.89x of torch's speed -> 0.97x, 8x256x7x7 0.89x -> 0.99x, 128x64x8x8
// 0.87-0.91x -> 0.94-0.97x, 16x256x6x6 1.07-1.09x -> 1.09-1.15x, 8x64x8x8 0.58-0.60x ->
// 0.64-0.67x, 8x2048x7x7 even; with the means folded 1.05-1.3x faster, bfloat16 at 8x8 and 6x6
// even to 1.06x (an experimental build of the same loops). The same sums and the same gradient.
// The write is told its stores do not stream as a constant: given GradReader's flag, false but a
// runtime value, the loop kept the streaming store's branch and the gain was gone.
template <typename scalar_t>
void backward_by_channel(const PlanarPlan& plan, GradReader<scalar_t>& grad, const scalar_t* x, scalar_t* dx,
                         int64_t c0, int64_t c1, const double* mean, const double* invstd, const double* weight,
                         bool training, const at::opmath_type<scalar_t>* hi, const at::opmath_type<scalar_t>* lo,
                         double* sum_dy, double* sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t inner = plan.s.inner;
  for (const auto c : c10::irange(c0, c1)) {
    sum_dy_dot_by_channel(plan, grad, x, c, c + 1, hi + (c - c0), lo + (c - c0), sum_dy, sum_dy_xmu);
    acc_t mean_hi = hi[c - c0], mean_lo = lo[c - c0], k1, k2, k3;
    const bool centered = fold_grad_coefficients(c, c + 1, training, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                                 static_cast<double>(plan.s.count()), &mean_hi, &mean_lo, &k1,
                                                 &k2, &k3);
    const auto write = [&](const auto& h, const auto& l) {
      for (const auto b : c10::irange(plan.s.batch)) {
        const int64_t first = plan.plane(b, c);
        grad.read(first, inner, /*store_residual_grad=*/false, [&](const auto& dz) {
          write_input_grad<acc_t>(training, dz, x + first, dx + first, inner, /*stream=*/false, h, l,
                                  Uniform<acc_t>{k1}, Uniform<acc_t>{k2}, Uniform<acc_t>{k3});
        });
      }
    };
    if (centered) {
      write(Uniform<acc_t>{mean_hi}, Uniform<acc_t>{mean_lo});
    } else {
      write(Zero<acc_t>{}, Zero<acc_t>{});
    }
  }
}

template <typename scalar_t>
void backward_planar(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Shape& s,
                     const double* mean, const double* invstd, const double* weight, bool training,
                     const GradPrologue& prologue, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const double n = static_cast<double>(s.count());
  const PlanarPlan plan(s, 2 * sizeof(scalar_t));
  constexpr int64_t V = Vectorized<acc_t>::size();
  const bool rows = plan.writes_rows(kRowGradVectors * V, std::is_same_v<scalar_t, acc_t> ? 0 : V);
  const int64_t tensors = GradReader<scalar_t>::pass_tensors(prologue);
  const bool fetch_output = fetches_output_ahead(s, sizeof(scalar_t), tensors);
  // By position, the same positions of the next batch's row (see sum_dy_dot_by_position).
  const int64_t row_fetch_distance = moves_past_cache(s, sizeof(scalar_t), tensors) ? s.channels * s.inner : 0;
  // Flattened, so that the write pass's per-run lambdas are one loop: GCC left the run's write
  // out of line, a call per plane whose closure it read back as 16-byte loads of two 8-byte
  // stores, a failed store forward per plane (in a profile, the instruction after that load took
  // half as long as the plane's values). Backward at 14x14 was 0.90-0.94x torch's before and
  // 1.02-1.06x after, 7x7 and 56x56 1.05-1.1x faster, 28x28 even (float32, 2 threads, alternating
  // old/new processes on the Intel Xeon VM, each against torch in-process).
  plan.for_each_group([&](int64_t c0, int64_t c1, bool next) TORCH_BN_FLATTEN {
    const int64_t channels = c1 - c0;
    GradReader<scalar_t> grad(dy, s, prologue);
    AlignedVector<acc_t> hi(channels), lo(channels), k1(channels), k2(channels), k3(channels);
    for (const auto i : c10::irange(channels)) {
      const auto m = split_mean<acc_t>(mean[c0 + i]);
      hi[i] = m.hi;
      lo[i] = m.lo;
      sum_dy[c0 + i] = 0;
      sum_dy_xmu[c0 + i] = 0;
    }
    if (plan.by_position()) {
      sum_dy_dot_by_position(plan, grad, x, c0, c1, hi.data(), lo.data(), row_fetch_distance, sum_dy, sum_dy_xmu);
    } else if (plan.channel_by_channel()) {
      // Where the group's write pass would write rows, stream, or fetch ahead, it stays.
      if (dx && !rows && !grad.stream && !fetch_output) {
        backward_by_channel(plan, grad, x, dx, c0, c1, mean, invstd, weight, training, hi.data(), lo.data(), sum_dy,
                            sum_dy_xmu);
        return;
      }
      sum_dy_dot_by_channel(plan, grad, x, c0, c1, hi.data(), lo.data(), sum_dy, sum_dy_xmu);
    } else {
      const int64_t distance = plan.fetch_distance();
      RunTotals<acc_t> sum_totals(channels), dot_totals(channels);
      plan.for_each_chunk_range([&](int64_t b0, int64_t b1, int64_t offset, int64_t length) {
        plan.for_each_run(c0, c1, b0, b1, offset, length, [&](int64_t i, int64_t first, int64_t len) {
          grad.read(first, len, /*store_residual_grad=*/true, [&](const auto& dz) {
            reduce_dy_dot<acc_t>(dz, x + first, len, Uniform<acc_t>{hi[i]}, Uniform<acc_t>{lo[i]}, sum_totals[i],
                                 dot_totals[i], FetchAhead::of<scalar_t>(x + first, dy + first, distance));
          });
        });
        for (const auto i : c10::irange(channels)) {
          sum_dy[c0 + i] += sum_totals[i].total();
          sum_dy_xmu[c0 + i] += dot_totals[i].total();
        }
        sum_totals.reset();
        dot_totals.reset();
      });
    }
    if (!dx) {
      return;
    }
    const bool centered = fold_grad_coefficients(c0, c1, training, mean, invstd, weight, sum_dy, sum_dy_xmu, n,
                                                 hi.data(), lo.data(), k1.data(), k2.data(), k3.data());
    // As in forward_train_planar.
    StagedStores<scalar_t> stage;
    const int64_t fetch_distance = plan.next_group_distance(c0, c1, next, grad.stream);
    plan.for_each_group_write_centered(
        rows, c0, c1, centered, hi.data(), lo.data(), std::array<const acc_t*, 3>{k1.data(), k2.data(), k3.data()},
        [&](int64_t run, int64_t run_length, const auto& hi_of, const auto& lo_of, const auto& view) {
          if (fetch_output) {
            fetch_next_batch_for_write(s, dx, run, run_length);
          }
          write_fetching_ahead(
              FetchAhead::of(x + run, dy + run, fetch_distance), run_length, [&](int64_t offset, int64_t len) {
                const int64_t first = run + offset;
                const auto out = stage.place(dx + first, len, grad.stream);
                grad.read(first, len, /*store_residual_grad=*/false, [&](const auto& dz) {
                  write_input_grad<acc_t>(training, dz, x + first, out.values, len, out.stream, hi_of.from(offset),
                                          lo_of.from(offset), view(0).from(offset), view(1).from(offset),
                                          view(2).from(offset));
                });
              });
        });
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Shape& s,
                   const double* mean, const double* invstd, const double* weight, bool training,
                   const GradPrologue& prologue, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowPlan plan(s, std::min(kGradBlockValues, std::max(kBlockValues, kChunk * s.channels)));
  const int64_t C = s.channels;
  // The mean as hi + lo, then (for dx) k1, k2 and k3, per channel.
  ChannelArrays<acc_t> coefficients(C, 5);
  for (const auto c : c10::irange(C)) {
    const auto m = split_mean<acc_t>(mean[c]);
    coefficients[0][c] = m.hi;
    coefficients[1][c] = m.lo;
  }
  // The per-channel coefficient k from `position` in a row.
  const auto of = [&](int k, int64_t position) { return PerChannel<acc_t>{coefficients[k] + position}; };
  std::vector<double> block_sum(plan.num_blocks * C), block_dot(plan.num_blocks * C);
  // Where rows are whole chunks (C <= kChunk) and no chunk is gathered for the residual's
  // gradient, a block's rows are one run: the same adds in the same order as chunk by chunk,
  // and the statistics pass 4-16% faster than with a run per group of rows (two rows at 512
  // channels) at ResNet-50's 7x7 to 28x28 shapes, 3-8% at 32x64x56x56 (operators, medians of
  // 15-31 interleaved rounds, 2-4 processes, AMD EPYC Zen 4 VM, 2 threads).
  const bool block_is_one_run = C <= kChunk && !prologue.grad_residual;
  for_each_block(plan.num_blocks, /*recent_first=*/false, [&](int64_t block) {
    GradReader<scalar_t> grad(dy, s, prologue);
    ChannelArrays<acc_t> totals(C, 2);
    acc_t* sums = totals[0];
    acc_t* dots = totals[1];
    // A run is whole rows, or a piece of one row (C > kChunk) from `position`.
    const auto reduce_run = [&](int64_t first, int64_t position, int64_t n) {
      const int64_t width = std::min(n, C);
      grad.read(first, n, /*store_residual_grad=*/true, [&](const auto& dz) {
        reduce_dy_dot_rows<1, acc_t>(dz, x + first, n / width, width, width, of(0, position), of(1, position),
                                     sums + position, dots + position);
      });
    };
    if (block_is_one_run) {
      reduce_run(plan.block_start(block) * C, 0, plan.rows_in(block) * C);
    } else {
      plan.for_each_chunk_in(block, reduce_run);
    }
    for (const auto c : c10::irange(C)) {
      block_sum[block * C + c] = static_cast<double>(sums[c]);
      block_dot[block * C + c] = static_cast<double>(dots[c]);
    }
  });
  // Block by block, so that the loops run along the channels.
  std::fill(sum_dy, sum_dy + C, 0.0);
  std::fill(sum_dy_xmu, sum_dy_xmu + C, 0.0);
  for (const auto block : c10::irange(plan.num_blocks)) {
    for (const auto c : c10::irange(C)) {
      sum_dy[c] += block_sum[block * C + c];
      sum_dy_xmu[c] += block_dot[block * C + c];
    }
  }
  if (!dx) {
    return;
  }
  const bool centered = fold_grad_coefficients(int64_t{0}, C, training, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                               static_cast<double>(plan.rows), coefficients[0], coefficients[1],
                                               coefficients[2], coefficients[3], coefficients[4]);
  // mean_of(k, position) and coefficient_of(k, position) as `of` for the mean's hi (k = 0) and lo
  // (1), and k1, k2 and k3 (2 to 4).
  const auto write_dx = [&](const auto& mean_of, const auto& coefficient_of) {
    for_each_block(plan.num_blocks, /*recent_first=*/true, [&](int64_t block) {
      GradReader<scalar_t> grad(dy, s, prologue);
      plan.for_each_chunk_in(block, [&](int64_t first, int64_t position, int64_t n) {
        // Row by row, with the per-channel coefficients the statistics pass reads too: tiled to a
        // group of rows they were five more 4 KiB arrays, no faster (interleaved A/B, within noise).
        const int64_t width = std::min(n, C);
        for (int64_t row = first; row < first + n; row += width) {
          grad.read(row, width, /*store_residual_grad=*/false, [&](const auto& dz) {
            write_input_grad<acc_t>(training, dz, x + row, dx + row, width, grad.stream, mean_of(0, position),
                                    mean_of(1, position), coefficient_of(2, position), coefficient_of(3, position),
                                    coefficient_of(4, position));
          });
        }
      });
    });
  };
  // Each coefficient is a load per vector: folded means are not read at all.
  const std::array<const acc_t*, 5> arrays{coefficients[0], coefficients[1], coefficients[2], coefficients[3],
                                           coefficients[4]};
  // grad_input reads steps of plain dy (not gated by a mask); scale_by reads none.
  const bool reads_steps = training && !prologue.mask;
  with_row_sources<scalar_t>(arrays, C, C, reads_steps, [&](const auto& coefficient_of) {
    if (centered) {
      write_dx(coefficient_of, coefficient_of);
    } else {
      write_dx([](int, int64_t) { return Zero<acc_t>{}; }, coefficient_of);
    }
  });
}

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
