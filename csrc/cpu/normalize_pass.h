// The CPU kernels' write pass y = act((x - mean) * scale + shift + residual), for evaluation
// and after forward-train's statistics.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "../activation.h"
#include "../layout.h"
#include "cache_policy.h"
#include "channel_affine.h"
#include "fetch_ahead.h"
#include "normalize_loops.h"
#include "planar_plan.h"
#include "row_plan.h"
#include "run_stores.h"
#include "work_units.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// The normalize pass of one task: writes act(((x - mean) * scale + shift) + residual) run by
// run, recording the sign mask of a fused activation.
template <typename scalar_t>
struct NormalizeWriter {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  const scalar_t* residual;
  bool activation;
  SignBitWriter signs;
  acc_t slope;
  bool stream;
  // What streams runs that are not whole lines (one or neither), where they are not written
  // through the cache: see forward_train_planar and normalize_impl.
  StagedStores<scalar_t>* stage;
  SharedLineStores<scalar_t>* lines;

  NormalizeWriter(const scalar_t* x, scalar_t* y, const Shape& s, const Epilogue& e,
                  StagedStores<scalar_t>* stage = nullptr, SharedLineStores<scalar_t>* lines = nullptr)
      : x(x), y(y), residual(static_cast<const scalar_t*>(e.residual)), activation(e.mask != nullptr), signs(e.mask),
        slope(static_cast<acc_t>(e.slope)), stream(streams_output(s, sizeof(scalar_t), pass_tensors(e))),
        stage(stage), lines(lines) {}

  // The tensors a normalize pass moves: x and y, and a fused residual.
  static int64_t pass_tensors(const Epilogue& e) { return e.residual ? 3 : 2; }

  template <typename M, typename P>
  void write(int64_t first, int64_t n, const M& hi, const M& lo, const P& scale, const P& shift) {
    with_runs([&](const auto& run) { run(first, n, hi, lo, scale, shift); });
  }

  // Calls use(run), where run(first, n, hi, lo, scale, shift) writes a run as write() does, the
  // epilogue's kind chosen once for all the runs use() writes: a caller whose runs are short
  // planes inlines run into its loop (TORCH_BN_FLATTEN), where a call of write() per run costs
  // as much as a 7x7 plane's values. Interleaved A/B on the AMD EPYC VM (2 threads), inline
  // against write() per plane: float32 NCHW evaluation 1.34-1.48x faster at 7x7, 1.04-1.26x at
  // 14x14, 1.02-1.05x at 28x28 and 56x56.
  template <typename F>
  void with_runs(const F& use) {
    const auto with = [&](const auto& act, auto has_residual) {
      use([&](int64_t first, int64_t n, const auto& hi, const auto& lo, const auto& scale, const auto& shift) {
        constexpr bool kResidual = decltype(has_residual)::value;
        if (lines && stream) {
          lines->split(y + first, n, [&](int64_t offset, scalar_t* dst, int64_t len, bool streamed) {
            const int64_t at = first + offset;
            normalize_run<acc_t, kResidual>(x + at, dst, len, hi.from(offset), lo.from(offset), scale.from(offset),
                                            shift.from(offset), kResidual ? residual + at : nullptr, act, signs, at,
                                            streamed);
          });
        } else {
          const auto out = stage ? stage->place(y + first, n, stream) : RunDestination<scalar_t>{y + first, stream};
          normalize_run<acc_t, kResidual>(x + first, out.values, n, hi, lo, scale, shift,
                                          kResidual ? residual + first : nullptr, act, signs, first, out.stream);
        }
      });
    };
    const auto with_act = [&](const auto& act) {
      if (residual) {
        with(act, std::true_type{});
      } else {
        with(act, std::false_type{});
      }
    };
    if (!activation) {
      with_act(NoActivation{});
    } else if (slope == acc_t(0)) {
      with_act(Relu<acc_t>{});
    } else {
      with_act(LeakyRelu<acc_t>{slope});
    }
  }
};

// Fetches for writing (prefetch_lines_for_write) the same place in the next batch's planes as
// values [first, first + n) of the planar output `out`, before a training pass writes those
// (where fetches_output_ahead): the pass writes it after the group's other planes of this
// batch. A run of a short plane is a few lines, each a new stream to the hardware prefetchers,
// and into an output out of the cache (a fresh activation) its stores wait for their lines to be
// read. The benchmark's forward+backward writes y and dx where its allocator puts them anew from
// round to round: module forward+backward, float32 NCHW, medians of 3 runs of
// benchmarks/bench.py alternating with the build before (Intel Xeon VM, 2 threads):
// 32x512x14x14 2.54 -> 2.03 ms, 32x128x28x28 2.27 -> 1.99 ms, 32x2048x7x7 2.91 -> 2.66 ms,
// 32x256x14x14 even. Where the output stays in the cache, as in the benchmark's forward-train
// and backward alone, the fetch cost 3-9% at 7x7 and gained 2-10% in forward-train at 14x14;
// the training step was even (1.147-1.171x over torch.nn against 1.155-1.175x, 3 alternating
// process pairs of 14 steps). Evaluation does not fetch: at 32x2048x7x7 bfloat16 (by position)
// it took 0.45 ms with the fetch in two full benchmark runs against 0.42 ms in the run before,
// and none of its benchmarked shapes gained.
template <typename T>
C10_ALWAYS_INLINE void fetch_next_batch_for_write(const Shape& s, T* out, int64_t first, int64_t n) {
  const int64_t next = first + s.channels * s.inner;
  if (next + n <= s.count() * s.channels) {
    prefetch_lines_for_write(reinterpret_cast<uintptr_t>(out + next), n * static_cast<int64_t>(sizeof(T)));
  }
}

// Writes the planar group of channels [c0, c1), a row at a time with `rows` (see
// PlanarPlan::writes_rows), with the coefficients of `p` from its channel `first` on (p's
// channel first + i is channel c0 + i), fetching x `fetch_distance` values ahead
// (see PlanarPlan::next_group_distance) and, where `fetch_output`, the output's next batch
// (fetch_next_batch_for_write).
template <typename scalar_t, typename acc_t>
void write_planar_group(const PlanarPlan& plan, bool rows, int64_t c0, int64_t c1, const ChannelAffine<acc_t>& p,
                        int64_t first, NormalizeWriter<scalar_t>& writer, bool fetch_output,
                        int64_t fetch_distance = 0) {
  plan.for_each_group_write_centered(
      rows, c0, c1, p.centered, p.mean.hi.data() + first, p.mean.lo.data() + first,
      std::array<const acc_t*, 2>{p.scale.data() + first, p.shift.data() + first},
      [&](int64_t at, int64_t n, const auto& hi, const auto& lo, const auto& view) {
        if (fetch_output) {
          fetch_next_batch_for_write(plan.s, writer.y, at, n);
        }
        write_fetching_ahead(FetchAhead::of<scalar_t>(writer.x + at, nullptr, fetch_distance), n,
                             [&](int64_t offset, int64_t length) {
                               writer.write(at + offset, length, hi.from(offset), lo.from(offset),
                                            view(0).from(offset), view(1).from(offset));
                             });
      });
}

// Writes the NCHW planes [p0, p1) of a task, plane by plane; `share_lines` streams planes that
// are not whole lines (SharedLineStores) where the output streams.
template <typename scalar_t>
void normalize_planes(const scalar_t* x, scalar_t* y, const Shape& s, const ChannelAffine<at::opmath_type<scalar_t>>& p,
                      const Epilogue& epilogue, int64_t p0, int64_t p1, bool share_lines) {
  using acc_t = at::opmath_type<scalar_t>;
  SharedLineStores<scalar_t> lines;
  NormalizeWriter<scalar_t> writer(x, y, s, epilogue, nullptr, share_lines ? &lines : nullptr);
  // The channel is stepped rather than computed (plane % C): a division per short plane costs
  // as much as normalizing it.
  writer.with_runs([&](const auto& run) TORCH_BN_FLATTEN {
    int64_t c = p0 % s.channels;
    for (const auto plane : c10::irange(p0, p1)) {
      const Uniform<acc_t> scale{p.scale[c]}, shift{p.shift[c]};
      // A plane is one run: the writer keeps nothing per chunk.
      if (p.mean.hi[c] != acc_t(0) || p.mean.lo[c] != acc_t(0)) {
        run(plane * s.inner, s.inner, Uniform<acc_t>{p.mean.hi[c]}, Uniform<acc_t>{p.mean.lo[c]}, scale, shift);
      } else {
        run(plane * s.inner, s.inner, Zero<acc_t>{}, Zero<acc_t>{}, scale, shift);
      }
      c = c + 1 == s.channels ? 0 : c + 1;
    }
  });
}

template <typename scalar_t>
void normalize_impl(const scalar_t* x, scalar_t* y, const Shape& s, const ChannelAffine<at::opmath_type<scalar_t>>& p,
                    const Epilogue& epilogue, bool recent_first = false) {
  using acc_t = at::opmath_type<scalar_t>;
  // No mean kept apart from the shift and no epilogue: y = x · scale + shift. Channels-last rows
  // have a loop of their own for it in float and double (the `if constexpr` block below); short
  // NCHW planes without an epilogue have one in every dtype, a kept mean or not.
  const bool no_epilogue = !epilogue.residual && !epilogue.mask;
  const bool plain = !p.centered && no_epilogue;
  if (s.rows) {
    const RowPlan plan(s);
    // write(r0, r1) writes rows [r0, r1).
    const auto write_rows = [&](const auto& write) {
      if (recent_first) {
        for_each_block(plan.num_blocks, /*recent_first=*/true, [&](int64_t block) {
          write(plan.block_start(block), plan.block_end(block));
        });
        return;
      }
      // With no statistics pass before it to follow, the rows are split evenly among the
      // threads, a group at a time, whatever their number.
      const int64_t grain = std::max<int64_t>(1, kGrainValues / (plan.group_rows * s.channels));
      at::parallel_for(0, plan.num_groups, grain, [&](int64_t g0, int64_t g1) {
        write(g0 * plan.group_rows, std::min(plan.rows, g1 * plan.group_rows));
        fence_streamed_stores();
      });
    };
    // Plain rows written through the cache by write_run, four vectors a step (affine_run).
    // Against normalize_run's steps of two (operators, the two alternated call by call in one
    // process with a copy of x between calls, medians of 200-400 calls; AMD EPYC Zen 4 VM, 2
    // threads): float32 channels-last evaluation 4-14% faster (32x128x28x28 542 -> 490 µs,
    // 32x512x14x14 702 -> 639, 32x2048x7x7 800 -> 768, 32x512x7x7 93 -> 83; one thread,
    // 32x256x14x14 273 -> 237), forward-train 3-7% (32x128x28x28 472 -> 440, 32x64x56x56 1242 ->
    // 1203). Without the copy between them, a call's place in the rotation moved it by more than
    // that: the call right after torch's operator took 10-25% longer, whichever loop it ran.
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (plain && !streams_output(s, sizeof(scalar_t), NormalizeWriter<scalar_t>::pass_tensors(epilogue))) {
        write_rows([&](int64_t r0, int64_t r1) {
          plan.for_each_chunk_in_rows(r0, r1, [&](int64_t first, int64_t position, int64_t n) {
            affine_run(x + first, y + first, n, p.scale.data() + position, p.shift.data() + position);
          });
        });
        return;
      }
    }
    // mean_of(k, position) and source_of(k, position) for the mean's hi (k = 0) and lo (1), the
    // scale (2) and the shift (3).
    const auto write_runs = [&](const auto& mean_of, const auto& source_of) {
      write_rows([&](int64_t r0, int64_t r1) {
        NormalizeWriter<scalar_t> writer(x, y, s, epilogue);
        plan.for_each_chunk_in_rows(r0, r1, [&](int64_t first, int64_t position, int64_t n) {
          writer.write(first, n, mean_of(0, position), mean_of(1, position), source_of(2, position),
                       source_of(3, position));
        });
      });
    };
    const std::array<const acc_t*, 4> arrays{p.mean.hi.data(), p.mean.lo.data(), p.scale.data(), p.shift.data()};
    const int64_t tiled = static_cast<int64_t>(p.scale.size());
    // normalize_run reads steps where it records no signs.
    const bool reads_steps = !epilogue.mask;
    with_row_sources<scalar_t>(arrays, tiled, s.channels, reads_steps, [&](const auto& source_of) {
      if (p.centered) {
        write_runs(source_of, source_of);
      } else {
        write_runs([](int, int64_t) { return Zero<acc_t>{}; }, source_of);
      }
    });
    return;
  }
  const PlanarPlan plan(s, sizeof(scalar_t));
  // In rows (see PlanarPlan::writes_rows) only where a run's scalar work is costly: narrowing, or
  // planes shorter than a vector, which affine_planes does not take. A group's rows lie a batch
  // stride apart, a stream each, where plane after plane is one stream through memory. On the AMD
  // EPYC VM, float32 evaluation at 32x2048x7x7 took 1.09 ms by position against 0.74 ms for
  // torch's (bfloat16: 1.6x faster than torch by position, 0.9x plane by plane); at 16x256x2x2,
  // 10 µs in rows against 26 µs plane by plane (torch's 17).
  constexpr int64_t V = Vectorized<acc_t>::size();
  const bool scalar_runs = !std::is_same_v<scalar_t, acc_t> || s.inner < V;
  if (scalar_runs && plan.writes_rows(kShortPlane, V)) {
    plan.for_each_group([&](int64_t c0, int64_t c1, bool /*next*/) {
      NormalizeWriter<scalar_t> writer(x, y, s, epilogue);
      write_planar_group(plan, /*rows=*/true, c0, c1, p, c0, writer, /*fetch_output=*/false);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainValues / s.inner);
  // Planes shorter than kMinSharedLinePlane write through the cache.
  const bool short_planes = s.inner * static_cast<int64_t>(sizeof(scalar_t)) < kMinSharedLinePlane;
  // Short planes without an epilogue as one stream (affine_planes), where a plane's own loop
  // costs as much as its values. Eval at 32x512x7x7 float32 1.03-1.06x over torch.nn's so,
  // against 0.97-0.99x plane by plane; 32x2048x7x7 1.03-1.04x against 0.98-1.02x; at 14x14 and
  // 28x28 (784 bytes a plane or more) within 1% of plane by plane (interleaved with torch.nn in
  // one process, one per build; Intel Xeon VM, 2 threads; no mean kept). Half and bfloat16
  // planes too, widened in registers, where the rows above leave them to a loop per plane: the
  // evaluation operator at 1x2048x7x7 bfloat16 took 29.0-29.3 µs so against 36.7-37.0 µs on one
  // thread (23.0-23.5 against 27.5-27.8 on two), float16 31.5-32.2 against 34.6-35.0, 3x300x7x7
  // bfloat16 11.9 against 15.0-16.6 (3 alternating process pairs, medians of 9; AMD EPYC Zen 4
  // VM). Ahead of the rows it was slower at 32x512x7x7 bfloat16 (133 against 107 µs on one
  // thread), so the rows keep the planes they write. Calls that keep some means apart too (2
  // alternating process pairs, medians of 7): float32 32x512x7x7 84 µs against 140-158 µs plane
  // by plane on one thread (52-54 against 77 on two), 1x2048x7x7 28.0-28.5 against 34-37 µs,
  // bfloat16 there 34.9-36.1 against 40.4-40.9 µs; the plain calls even (3 pairs, one thread).
  if (no_epilogue && short_planes && s.inner >= V) {
    const std::array<const acc_t*, 4> coefficients{p.scale.data(), p.shift.data(), p.mean.hi.data(),
                                                   p.mean.lo.data()};
    at::parallel_for(0, s.batch * s.channels, grain, [&](int64_t p0, int64_t p1) {
      if (p.centered) {
        affine_planes<true>(x, y, s.inner, s.channels, p0, p1, coefficients);
      } else {
        affine_planes<false>(x, y, s.inner, s.channels, p0, p1, coefficients);
      }
    });
    return;
  }
  at::parallel_for(0, s.batch * s.channels, grain, [&](int64_t p0, int64_t p1) {
    normalize_planes(x, y, s, p, epilogue, p0, p1, /*share_lines=*/!short_planes);
    fence_streamed_stores();
  });
}

std::vector<double> scale_by_invstd(const Shape& s, const double* weight, const double* invstd) {
  std::vector<double> scale(s.channels);
  for (const auto c : c10::irange(s.channels)) {
    scale[c] = (weight ? weight[c] : 1.0) * invstd[c];
  }
  return scale;
}

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
