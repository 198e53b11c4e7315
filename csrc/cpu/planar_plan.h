// How an NCHW (planar) input is cut into groups of channels, chunks and runs.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "../layout.h"
#include "aligned_vector.h"
#include "cache_policy.h"
#include "run_sources.h"
#include "run_stores.h"
#include "work_units.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Per-channel values each repeated `inner` times: the value at every position of a planar
// group's row (see PlanarPlan::by_position).
template <typename acc_t>
AlignedVector<acc_t> spread(const acc_t* values, int64_t channels, int64_t inner) {
  AlignedVector<acc_t> out(channels * inner);
  for (const auto i : c10::irange(channels)) {
    std::fill(out.begin() + i * inner, out.begin() + (i + 1) * inner, values[i]);
  }
  return out;
}

// Adds each channel's positions, per_position[i·inner + p], into per_channel[i] in position order
// (the inverse of spread), position by position across the channels: each channel's adds still
// run in order, but the channels' chains overlap. Channel by channel, every add waited on the one
// before: forward-train at 32x512x7x7 and 32x2048x7x7 was 6-8% slower so in bfloat16, 3-14% in
// float32 (interleaved A/B, 2 threads).
template <typename T>
void add_positions(const T* per_position, int64_t channels, int64_t inner, double* per_channel) {
  for (const auto position : c10::irange(inner)) {
    for (const auto i : c10::irange(channels)) {
      per_channel[i] += static_cast<double>(per_position[i * inner + position]);
    }
  }
}

// How the planar layout (N, C, inner) is cut. Consecutive channels form a group, whose planes
// are contiguous batch by batch: a group is read in memory order (a channel's planes alone lie
// a batch stride apart, a few cache lines each when small, and would each cost a memory latency),
// and is small enough to stay in L2 from the statistics pass to the pass that writes it.
// A channel's sums run in the accumulation type over chunks of at most kChunk of its values (a
// piece of one plane, or whole planes of consecutive batches) and are merged in double; the
// chunks depend on the shape alone, so every channel is computed alike whatever the grouping.
struct PlanarPlan {
  // Bytes of input a group may span: a quarter of a 1 MiB L2, leaving room for what is written.
  static constexpr int64_t kGroupBytes = 256 * 1024;
  // Groups per thread, so that a thread count that does not divide the groups idles little.
  static constexpr int64_t kGroupsPerThread = 4;
  // Groups at least, by position.
  static constexpr int64_t kPositionGroups = 16;
  // Input bytes of a group's planes in one batch, at most, whose statistics fetch the next
  // batch's planes ahead (see fetch_distance).
  static constexpr int64_t kFetchAheadBytes = 32 * 1024;

  const Shape& s;
  int64_t bytes_per_value;
  int64_t group;

  // `bytes_per_value`: the input bytes read per value of x (x, or x and dy).
  PlanarPlan(const Shape& s, int64_t bytes_per_value) : s(s), bytes_per_value(bytes_per_value) {
    const int64_t channel_bytes = std::max<int64_t>(1, s.batch * s.inner * bytes_per_value);
    // By position, kPositionGroups groups whatever the thread count: a group's width decides which
    // positions fall in a loop's scalar tail, whose rounding differed from the lanes' in backward's
    // sums before in_a_lane. Not measured against groups per thread since.
    const int64_t tasks = by_position() ? kPositionGroups : kGroupsPerThread * at::get_num_threads();
    // An input too small to be split among threads (see for_each_group) is cut only to fit L2:
    // each group sets up its own coefficients and buffers (a dozen allocations), which at a few
    // values per channel cost more than the channel's values. Module forward+backward on 1
    // thread, 2x4x2x2 and 4x16x3x3: 64-65 and 67-68 µs as one group, 67-68 and 71-73 µs in
    // groups of one channel (torch.nn's 51-55 µs). By position too, where a plane costs its
    // values alone (the rule still follows the shape, not the thread count). Operators on the
    // AMD EPYC Zen 4 VM, 2 threads, as one group against kPositionGroups groups (medians of 9
    // interleaved rounds): 24x40x3x3 float32 forward-train 9.1-9.6 against 23.4-23.9 µs (torch's
    // 19.3-19.5), backward 9.9-10.0 against 22.0-22.6 µs (torch's 12.4-12.5); 32x16x4x4
    // forward-train 8.3-8.5 against 30.7-31.4 µs, backward 9.4-9.5 against 26.5-32.0 µs (torch's
    // 16.5-16.9 and 8.3-8.5); in bfloat16 evaluation 5.4 against 13.3 µs (torch's 7.0). Where a
    // group still held at least kGrainValues values, fewer groups were mixed: 32x64x6x6
    // backward 0.88x as fast in 2 groups, 24x256x7x7 0.79x in 8.
    const bool one_task = s.channels * (by_position() ? s.batch * s.inner : plane_work()) < kGrainValues;
    const int64_t most = one_task ? s.channels : std::max<int64_t>(1, s.channels / tasks);
    group = std::clamp<int64_t>(kGroupBytes / channel_bytes, 1, most);
  }

  // A plane's work in for_each_group's units: a plane costs at least what a short plane does
  // (its run's overhead).
  int64_t plane_work() const { return s.batch * std::max(s.inner, kShortPlane); }

  int64_t plane(int64_t b, int64_t c) const { return (b * s.channels + c) * s.inner; }

  // How many values ahead a statistics pass fetches while it sums a run, or 0: where runs are
  // whole planes and a group's planes of one batch are at most kFetchAheadBytes, the same
  // position in the next batch's plane, the run read after this batch's. Each such stretch is a
  // new stream to the hardware prefetchers, a few KiB each, which they learn too late.
  // Interleaved A/B on the AMD EPYC VM (2 threads): forward-train 1.17-1.23x faster at
  // 32x64x56x56 float32 (12.5 KiB planes), 1.3x in bfloat16, backward 1.2-1.3x in bfloat16 and
  // 1.15x at 32x128x28x28 float32. Float32 backward at 56x56 (25 KiB per batch) was even or up
  // to 5% slower while the lines went into L1, and 1.12-1.24x faster into L2 (prefetch_lines),
  // at 32x64, 32x128 and 32x256x56x56. Planes of kChunk values or more are read a chunk at a
  // time, mostly contiguous runs.
  int64_t fetch_distance() const {
    const bool whole_planes = s.inner < kChunk && !by_position();
    return whole_planes && group * s.inner * bytes_per_value <= kFetchAheadBytes ? s.channels * s.inner : 0;
  }

  // Planes so short (7x7) that a run per plane would be a few vectors and a scalar tail. A
  // group's planes of one batch are contiguous, so the group is handled as rows (one per batch)
  // of positions (channel, offset in plane): the statistics sum each position down the chunk's
  // rows (in the accumulation type) and then a channel's positions (in double), and the
  // element-wise passes write a row at a time. Forward-train at 32x512x7x7 and 32x2048x7x7 is
  // 8-16% faster so (bfloat16 17%), bfloat16 evaluation 25% (float32 even); at 14x14 it was
  // 22% slower, per-position coefficients costing a load each where a plane's run broadcasts
  // them. Each pass of a group first spreads its per-channel values to positions, a row's
  // width each, which only enough rows pay for: at 1x2048x7x7 forward-train took 0.44 ms so
  // against 0.12 ms by runs, and runs stayed faster up to a batch of 16 but were even or
  // slower from 24 (interleaved A/B, float32 and bfloat16).
  bool by_position() const { return s.inner < kShortPlane && s.batch >= kMinPositionRows; }

  // Planes of at most kShortPlane values not summed by position: backward's statistics read a
  // channel's planes one after another and carry its totals in registers (sum_dy_dot_by_channel),
  // where a run per plane in memory order added its totals into the channel's in memory, a load
  // and a store of kUnroll vectors per total and plane. Operators against torch's (medians of 9
  // interleaved rounds, AMD EPYC Zen 4 VM): the statistics on 1 thread at 16x512x4x4 float32 85
  // -> 45 µs (torch's 42), 8x1024x3x3 88 -> 46 µs (45), 8x256x7x7 40 -> 24 µs (23), 8x64x8x8 14
  // -> 10 µs (9); the whole backward on 2 threads 1.2-1.3x faster at those shapes and at
  // 16x512x7x7 and 8x2048x7x7, 1.12x at 128x256x8x8 (8.4 MB), even at 256x256x8x8, bfloat16
  // 1.25-1.3x at 7x7. Planes of 14x14 and more, whose runs a pass from memory fetches ahead,
  // were up to 0.7x as fast so (16x1024x14x14, 32x128x28x28: 12.8 MB). Where the input gradient
  // is then written plane by plane through the cache, it follows each channel's sums
  // (backward_by_channel).
  bool channel_by_channel() const { return s.inner <= kShortPlane && !by_position(); }

  // Whether a write pass takes a group a row at a time (for_each_group_write), as by position,
  // where planes hold fewer than `plane_bound` values (at most kShortPlane) and a batch has
  // kMinRowWriteBatch rows or more, whatever the statistics pass does. A plane's run costs a run's
  // setup, which at a few vectors a plane is as much as its values, where a row is one run; but the
  // group's per-channel values are then spread to positions, each a load per vector where a run
  // broadcasts it, and the spreading costs as many stores as a row has values. Operators, medians
  // of 9 interleaved rounds (AMD EPYC Zen 4 VM, 2 threads), rows against runs: forward-train
  // float32 16x512x4x4 157 -> 63 µs (torch's 151), 8x1024x3x3 135 -> 67 µs (115), 16x256x5x5 91 ->
  // 49 µs, 16x512x7x7 222 -> 162 µs, 8x2048x7x7 310 -> 277 µs, 4x512x4x4 39 -> 29 µs; bfloat16
  // 8x512x7x7 158 -> 105 µs (107), 16x512x4x4 148 -> 73 µs (81); but 1x2048x7x7 99 -> 113 µs and
  // 2x512x7x7 37 -> 39 µs. Backward, float32: 16x512x4x4 58 -> 46 µs (torch's 42), 16x256x5x5 43 ->
  // 36 µs, 16x128x4x4 31 -> 25 µs, but at 7x7 even with means folded and 0.84x as fast with means
  // kept (16x512x7x7, 5 coefficients a vector), 0.96x at 16x256x6x6; bfloat16 (vectors of 16
  // values) 1.2-1.4x faster at 4x4 to 7x7. Planes shorter than a vector, whose runs are all scalar
  // tails, gain most. A row's width follows the thread count, and a row narrower than a vector (one
  // channel's) is a scalar tail too, whose values round as in a lane (in_a_lane), so that no result
  // follows the thread count. An experimental build that chose per call: float32 (AVX2) 16x256x2x2
  // forward-train 60 -> 27 µs (torch's 35), evaluation 26 -> 10 µs (17); bfloat16 (AVX-512)
  // 8x1024x3x3 forward-train 161 -> 82 µs (136), evaluation 63 -> 20 µs (25), backward 134 -> 75
  // µs (219). Planes shorter than `all_tail_below` (a vector, where the caller's runs would be all
  // scalar tail) take rows from a batch of 1: bfloat16 2x512x3x3 evaluation 33 -> 21 µs (torch's
  // 24), forward-train 69 -> 57 µs, backward 55 -> 47 µs; 1x512x3x3 evaluation 22 -> 18 µs (20);
  // float32 2x1024x2x2 evaluation 32 -> 21 µs (21), forward-train 44 -> 35 µs. Not float32
  // backward, whose tails have no narrowing to save: 1x2048x2x2 52 -> 64 µs, 2x64x2x2 7.4 -> 7.9 µs.
  bool writes_rows(int64_t plane_bound, int64_t all_tail_below = 0) const {
    const int64_t min_batch = s.inner < all_tail_below ? 1 : kMinRowWriteBatch;
    return by_position() || (s.batch >= min_batch && s.inner < std::min(plane_bound, kShortPlane));
  }

  // Calls f(c0, c1, next) on every group of channels [c0, c1), in parallel where the work is
  // worth kGrainValues values or more: waking the other threads costs more than a small input's
  // whole pass. `next`: whether the same task handles the next group, a whole one, right after
  // this one.
  template <typename F>
  void for_each_group(const F& f) const {
    const int64_t group_work = group * plane_work();
    const int64_t grain = std::max<int64_t>(1, kGrainValues / group_work);
    at::parallel_for(0, div_up(s.channels, group), grain, [&](int64_t g0, int64_t g1) {
      for (const auto g : c10::irange(g0, g1)) {
        f(g * group, std::min(s.channels, (g + 1) * group), g + 1 < g1 && (g + 2) * group <= s.channels);
      }
      fence_streamed_stores();
    });
  }

  // How many values ahead the write pass of a group fetches (see write_fetching_ahead), or 0:
  // where the tensors a pass moves outgrow the cache (`streamed`, see streams_output) and the
  // task goes on to the `next` group, the same place in that group, which the statistics read
  // next. The memory then reads while the core writes from cache, where the two took turns.
  // Interleaved A/B on the AMD EPYC VM (2 threads), fetching against not: float32
  // forward-train 1.02-1.32x faster at 32x{64,128,256}x56x56, 32x512x28x28, 32x1024x14x14 and
  // 32x64x112x112; backward 1.08-1.24x at 28x28, 14x14 and 7x7, even to 1.08x at 56x56, where
  // one channel's x and dy (800 KiB) and the next's hardly fit in L2 together; module
  // forward+backward 1.06-1.15x; training step 1.12x -> 1.15x over torch.nn. bfloat16: forward
  // 0.97-1.04x, backward 1.09-1.10x at 28x28 and 14x14 but 0.90-0.94x at 32x64x56x56, module
  // forward+backward 1.07-1.08x (0.92x at 32x64x56x56). The forward with a residual, float32:
  // 1.05-1.12x, 0.96x at 32x2048x7x7. Where x stays in the cache and the pass does not stream,
  // fetching was 0.84-0.88x at 6.4 MB float32 forward-train and 0.91-1.02x at 12.8 MB (before
  // such passes streamed, see streams_output), the statistics reading from the cache anyway.
  // On the Intel Xeon VM (2 MiB L2) fetching was slower at every streamed float32 shape, hence
  // AMD alone (fetches_next_group). Not fetching there: 32x64x112x112 forward-train 7.63 ->
  // 6.48 ms, backward 17.1 -> 13.9 ms, forward+backward 26.7 -> 21.8 ms; at 32x128x56x56,
  // 32x256x28x28 and 32x512x28x28 each mode 1.09-1.14x faster; 32x1024x14x14 1.01-1.07x;
  // 32x256x56x56 even (backward 0.98x); bfloat16 forward+backward 1.02-1.09x; the training step
  // even (156.0 and 157.7 ms against 157.4 and 156.5 ms; medians of 7 rounds, or of 20 and 30
  // steps, toggled in one process).
  int64_t next_group_distance(int64_t c0, int64_t c1, bool next, bool streamed) const {
    return next && streamed && fetches_next_group() ? (c1 - c0) * s.inner : 0;
  }

  // Calls f(b0, b1, offset, length) on the chunks in order: values [offset, offset + length) of
  // the planes of batches [b0, b1).
  template <typename F>
  void for_each_chunk_range(const F& f) const {
    if (s.inner >= kChunk) {
      for (const auto b : c10::irange(s.batch)) {
        for_each_chunk(s.inner, [&](int64_t offset, int64_t length) { f(b, b + 1, offset, length); });
      }
      return;
    }
    const int64_t planes = kChunk / s.inner;
    for (int64_t b = 0; b < s.batch; b += planes) {
      f(b, std::min(s.batch, b + planes), int64_t{0}, s.inner);
    }
  }

  // Calls f(c - c0, first, length) on the runs of channels [c0, c1) in one chunk range, in
  // memory order.
  template <typename F>
  void for_each_run(int64_t c0, int64_t c1, int64_t b0, int64_t b1, int64_t offset, int64_t length, const F& f) const {
    for (const auto b : c10::irange(b0, b1)) {
      for (const auto c : c10::irange(c0, c1)) {
        f(c - c0, plane(b, c) + offset, length);
      }
    }
  }

  // Calls write(first, n, view) on runs covering the group in memory order, view(k) being the
  // run's source (Uniform or PerChannel) of the per-channel values[k][i] of channel c0 + i: a
  // run is a plane, or with `rows` (see writes_rows) a row of the group.
  template <typename acc_t, size_t K, typename Write>
  void for_each_group_write(bool rows, int64_t c0, int64_t c1, const std::array<const acc_t*, K>& values,
                            const Write& write) const {
    if (rows) {
      std::array<AlignedVector<acc_t>, K> at_position;
      for (const auto k : c10::irange(K)) {
        at_position[k] = spread(values[k], c1 - c0, s.inner);
      }
      const auto view = [&](int k) { return PerChannel<acc_t>{at_position[k].data()}; };
      for (const auto b : c10::irange(s.batch)) {
        write(plane(b, c0), (c1 - c0) * s.inner, view);
      }
      return;
    }
    for_each_chunk_range([&](int64_t b0, int64_t b1, int64_t offset, int64_t length) {
      for_each_run(c0, c1, b0, b1, offset, length, [&](int64_t i, int64_t first, int64_t n) {
        write(first, n, [&](int k) { return Uniform<acc_t>{values[k][i]}; });
      });
    });
  }

  // for_each_group_write of `values` after the group's mean, hi + lo, where `centered`:
  // write(first, n, hi_of, lo_of, view) gets the mean's sources and view(k) for values[k].
  // Folded means (not centered) are Zero and not passed at all: by position they would be
  // spread to zeros read for nothing.
  template <typename acc_t, size_t K, typename Write>
  void for_each_group_write_centered(bool rows, int64_t c0, int64_t c1, bool centered, const acc_t* hi,
                                     const acc_t* lo, const std::array<const acc_t*, K>& values,
                                     const Write& write) const {
    if (!centered) {
      for_each_group_write(rows, c0, c1, values, [&](int64_t first, int64_t n, const auto& view) {
        write(first, n, Zero<acc_t>{}, Zero<acc_t>{}, view);
      });
      return;
    }
    std::array<const acc_t*, K + 2> with_mean{hi, lo};
    std::copy(values.begin(), values.end(), with_mean.begin() + 2);
    for_each_group_write(rows, c0, c1, with_mean, [&](int64_t first, int64_t n, const auto& view) {
      write(first, n, view(0), view(1), [&](int k) { return view(k + 2); });
    });
  }
};

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
