// The CPU kernels for both layouts, included once per CPU capability by kernels_*.cpp after
// that file has set CPU_CAPABILITY.
//
// Numerics: forward statistics come from one pass over memory, Σd and Σd² of d = x - shift with
// a shift near the mean, where the cancellation in Σd² - (Σd)²/n costs at most a bit; elsewhere
// from a second pass around the mean the first found, which also corrects that mean (see
// OnePassMoments, planar_moments, forward_train_rows). Sums run in the accumulation type over
// chunks of at most kChunk values and in double across chunks, so neither a large mean nor a
// long reduction costs precision. The pieces a value is summed in depend on the shape alone,
// never on the thread count (threads only decide which task handles a piece), and partial
// results are combined in a fixed order: the same input gives bitwise the same output on every
// run and with any number of threads.
#pragma once
#include "../activation.h"
#include "batch_norm_loops.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

// The dtypes this build's entry points take: all floating types, or half and bfloat16 alone for
// a build that cpu_capability_for() picks only for those (TORCH_BN_REDUCED_PRECISION_ONLY).
#if defined(TORCH_BN_REDUCED_PRECISION_ONLY)
#define TORCH_BN_DISPATCH_DTYPES(TYPE, NAME, ...) AT_DISPATCH_REDUCED_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)
#else
#define TORCH_BN_DISPATCH_DTYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#endif

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Channels-last passes work on blocks of rows of about this many values, which stay in L2, and
// of no fewer than kMinBlockRows rows (a statistics block leaves O(C) doubles behind):
// forward-train's write pass walks them most recent first, after its statistics, which sum a
// channel in the accumulation type over pieces of as many rows.
constexpr int64_t kBlockValues = 32768;
constexpr int64_t kMinBlockRows = 64;
// Forward-train's channels-last statistics take blocks of up to this many values, pieces of a
// kBlockValues block each: a block costs O(C) work in double (its moments, its far columns and the
// merge, which runs on one thread), and the float sums stay as short as before. Against blocks of
// kBlockValues (operators, medians of 11-21 interleaved rounds in one process, 2-3 processes, AMD
// EPYC Zen 4 VM, 2 threads), float32 forward-train 1.15-1.36x as fast at 32x512x14x14, 1.12-1.23x
// at the other 7x7 to 28x28 shapes but 32x128x28x28 (0.97-1.10x), and 0.97-1.10x at 56x56 and
// 112x112; bfloat16 1.14-1.33x (32x128x28x28 0.97x). A block's second pass over its far columns
// (see forward_train_rows) then reads from L3 or memory, not L2: on inputs whose every block is far
// (a mean drifting across the batch) forward-train was 0.9x as fast at 32x64x56x56 and
// 32x256x56x56, even at 32x128x28x28 and 1.2x faster at 32x512x14x14.
constexpr int64_t kStatsBlockValues = 1 << 20;
// Channels-last backward's statistics are one pass, whose blocks only fix the order of the sums,
// and each block costs fresh totals and their move into doubles: it takes blocks of up to this
// many values, as many as keep a channel's total in the accumulation type to kChunk rows (as
// reduce_columns's pieces are), and never fewer than kBlockValues. Against kBlockValues
// (operators, medians of 15 interleaved rounds in one process, two processes, AMD EPYC Zen 4
// VM, 2 threads): the statistics 0.58-0.73 -> 0.45-0.65 ms at 32x512x14x14, 0.44-0.48 -> 0.40
// ms at 32x128x28x28, 1.03-1.10 -> 0.93-1.01 ms at 32x2048x7x7, 1.05-1.06 -> 0.99-1.00 ms at
// 32x64x56x56; the whole backward 1-11% faster at those shapes and at 32x512x7x7.
constexpr int64_t kGradBlockValues = 262144;
// The block count is a multiple of this, see RowPlan.
constexpr int64_t kBlockCountMultiple = 4;
// Rows whose mean shifts the channels-last statistics (see forward_train_rows), and values
// whose mean shifts an NCHW channel's first chunk (see planar_moments).
constexpr int64_t kShiftRows = 16;
constexpr int64_t kShiftValues = 64;
// Channels-last rows of at most this many bytes are summed in memory order where x comes from
// memory (see forward_train_rows).
constexpr int64_t kMaxRowWalkBytes = 1024;
// Rows are processed several at a time, so that per-run overhead is paid per kilo-value.
constexpr int64_t kMinGroupValues = 1024;
// Values per task for at::parallel_for in the element-wise passes.
constexpr int64_t kGrainValues = 32768;
// NCHW planes of fewer values are summed and written by position when the batch has at least
// kMinPositionRows rows (see PlanarPlan::by_position).
constexpr int64_t kShortPlane = 64;
constexpr int64_t kMinPositionRows = 24;
// NCHW planes of fewer than kShortPlane values in a batch of at least this many rows (any batch,
// where a plane is shorter than a vector, but in float32 backward) are written a row of their
// group at a time (see PlanarPlan::writes_rows); backward's input gradient only where a plane is
// under this many vectors.
constexpr int64_t kMinRowWriteBatch = 4;
constexpr int64_t kRowGradVectors = 4;
// NCHW planes shorter than this many bytes are written through the cache even where the output
// would stream (see streams_output). In evaluation, streamed (SharedLineStores) at 32x2048x7x7
// float32 (196-byte planes) was 0.8-0.95x as fast as through the cache, at 32x1024x14x14
// bfloat16 (392 bytes) 0.7x, at 32x1024x14x14 float32 (784 bytes) 1.15-1.3x faster
// (interleaved old/new processes on the AMD EPYC VM, 2 threads).
constexpr int64_t kMinSharedLinePlane = 512;
// What a pass may move and still find in the last-level cache (see cache_bytes): three quarters
// of the L3, which a VM's two cores share with the rest of the chip, and at most
// kMaxCacheBytes. A pass whose inputs and outputs together reach it writes its outputs with
// non-temporal stores (see RunStores, streams_output).
constexpr int64_t kMaxCacheBytes = 48 << 20;
// Where the L3's size is unknown: that of the AMD EPYC VMs the bound was first measured on.
constexpr int64_t kDefaultL3Bytes = 32 << 20;

// The bound is 24 MiB on the AMD EPYC VMs (32 MiB L3). The Intel Xeon VM reports a 480 MiB L3
// but does not get to keep that much: float32 NCHW passes over 12.8 MB tensors were 1.02-1.3x
// faster written through the cache (forward-train and forward+backward at 32x128x28x28,
// 32x512x14x14 and 32x2048x7x7; evaluation even), forward+backward over 25.7 MB tensors (77 MB
// moved) 1.34-1.54x faster streamed (32x64x56x56, 32x256x28x28, 32x1024x14x14), hence the
// 48 MiB cap (medians of 5-7 rounds interleaved with torch.nn, one process per bound).
// Later the same day a 24 MiB cap, streaming those 12.8 MB passes, made module forward+backward
// 1.05-1.5x faster (32x128x28x28 NCHW 1.54-1.68x -> 2.28-2.34x over torch.nn): a loop of it
// moves x, y, dy and dx (51 MB), more than either pass, and nothing reads y or dx. The training
// step, where the next layer reads them, was slower so, 1.12-1.13x over torch.nn against
// 1.14-1.17x (5 runs of each cap in alternating processes), and what the step loses is what
// users train with: the cap stays.
// The L3 is glibc's sysconf figure, which on one AMD EPYC (Zen 3) VM was 256 MiB, the socket's,
// where Linux's sysfs reported each core complex's 32 MiB: there the bound is 48 MiB too. On that
// VM 24 MiB streamed the forward passes over 12.8 MB tensors too: NCHW evaluation at
// 32x128x28x28 0.77x as fast as torch.nn's, against 1.16-1.43x with 48 MiB; 32 MiB, streaming
// only the backward passes over them, was a little ahead of 48 MiB in channels-last and even
// elsewhere (float32 geometric means over torch.nn, 2 alternating benchmark runs of each:
// channels-last forward+backward 1.23-1.30x against 1.19-1.23x, the training step 1.16-1.19x
// against 1.15-1.19x). Two runs on one VM whose speed moves by tens of percent between runs do
// not settle a bound the other VMs measured, so what glibc reports stays the source. Two more
// pairs on that VM later (2026-12-06) bore it out: 32 MiB took channels-last backward to
// 1.20x over torch.nn from 1.10x and forward+backward to 1.25-1.26x from 1.17-1.18x, in the
// benchmark's loops, which read the same x and dy call after call, but the training step, whose
// next layer reads dx, fell to 1.10-1.15x from 1.15-1.17x.
// TORCH_BN_STREAM_BYTES, read once, sets the bound in bytes instead: for inputs sized around a
// known bound (the tests of the streamed passes), and for measuring another bound on a new
// machine without rebuilding.
int64_t cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* chosen = std::getenv("TORCH_BN_STREAM_BYTES")) {
      // The whole value, digits only: atoll would read "24MiB" as 24 bytes.
      char* end = nullptr;
      errno = 0;
      const long long value = std::strtoll(chosen, &end, 10);
      TORCH_CHECK(end != chosen && *end == '\0' && errno == 0 && value > 0,
                  "TORCH_BN_STREAM_BYTES must be a positive number of bytes, got '", chosen, "'");
      return static_cast<int64_t>(value);
    }
    int64_t l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return std::min<int64_t>((l3 > 0 ? l3 : kDefaultL3Bytes) / 4 * 3, kMaxCacheBytes);
  }();
  return bytes;
}

// Whether a streamed pass fetches the next group while it writes (see
// PlanarPlan::next_group_distance): on AMD CPUs, where that was measured faster, and nowhere
// else. TORCH_BN_FETCH_NEXT_GROUP ("0" or "1"), read once, decides instead: for the tests, which
// run the fetching path on any machine, and for measuring it on a new machine without
// rebuilding.
bool fetches_next_group() {
  static const bool fetches = [] {
    if (const char* chosen = std::getenv("TORCH_BN_FETCH_NEXT_GROUP")) {
      TORCH_CHECK(std::strcmp(chosen, "0") == 0 || std::strcmp(chosen, "1") == 0,
                  "TORCH_BN_FETCH_NEXT_GROUP must be 0 or 1, got '", chosen, "'");
      return chosen[0] == '1';
    }
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_is("amd") != 0;
#else
    return false;
#endif
  }();
  return fetches;
}

int64_t div_up(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The bytes of `tensors` tensors of shape `s`, values of `value_bytes` each.
int64_t pass_bytes(const Shape& s, int64_t value_bytes, int64_t tensors) {
  return tensors * s.count() * s.channels * value_bytes;
}

// Whether a pass that reads and writes `tensors` tensors of shape `s` (values of `value_bytes`
// each: x and y, a fused residual, dy and the gradients) writes its outputs past the cache:
// written through it, they would evict the inputs, and each line would be read before it is
// written. Below that size what is written stays in the cache for the layer that reads it next.
// Streamed against cached at 12.8 MB float32 (interleaved A/B on the AMD EPYC VM, 2 threads):
// backward (x, dy and dx: 38.4 MB) 1.3-1.4x faster at 28x28, 1.1-1.3x at 14x14 and 1.04-1.1x at
// 7x7 (56x56 even), the forward with a residual 1.2-1.5x (NCHW 14x14 even). The plain forward
// (x and y: 25.6 MB, under the whole L3 but over the bound) streams since the bound came down
// from 32 MiB: forward-train 1.3-2.4x faster (NCHW 28x28 and 14x14 the most, 7x7 1.05-1.3x;
// channels-last 1.2-1.4x), evaluation 1.6-1.8x at NCHW 28x28 and 1.2-1.7x channels-last (NCHW
// 14x14 and 7x7, whose runs are not whole lines, even), module forward+backward 1.06-1.33x,
// bfloat16 at 12.8 MB forward-train 1.1-1.5x and evaluation 1.04-1.11x (NCHW 32x64x56x56
// 0.87x); the training step even (1.10x and 1.11x over torch.nn against 1.12x and 1.11x, 40
// interleaved steps). At a 16 MiB bound backward at 6.4 MB (19.2 MB moved) streamed too and was
// 0.88x as fast. NCHW planes of kShortPlane values or more (shorter ones may be written by
// position) but fewer than kMinSharedLinePlane bytes go through the cache whatever the size, as
// evaluation's do: streamed, forward-train and backward stage them a few lines at a time
// (StagedStores), and at 32x1024x14x14 bfloat16 (392-byte planes) the speedup over torch's
// backward was 1.09x so against 1.19x not streamed, module forward+backward 1.03x against 1.17x,
// forward-train even (medians of 5 interleaved old/new process pairs, 2 threads).
bool streams_output(const Shape& s, int64_t value_bytes, int64_t tensors) {
  const bool short_planes = !s.rows && s.inner >= kShortPlane && s.inner * value_bytes < kMinSharedLinePlane;
  return !short_planes && pass_bytes(s, value_bytes, tensors) >= cache_bytes();
}

// Whether what a pass moves reaches half the bound of streams_output, so that its inputs were
// evicted since the call before and come from memory. Below that, a loop's inputs and outputs
// stay in the cache, and fetching them ahead only costs.
bool moves_past_cache(const Shape& s, int64_t value_bytes, int64_t tensors) {
  return pass_bytes(s, value_bytes, tensors) >= cache_bytes() / 2;
}

// Whether a training pass fetches its output ahead for writing (fetch_next_batch_for_write):
// where it writes through the cache (not streams_output) and moves_past_cache. Module
// forward+backward at 32x512x7x7 float32 (13 MB of x, y, dy and dx) took 0.67 ms with the fetch
// against 0.62 ms.
bool fetches_output_ahead(const Shape& s, int64_t value_bytes, int64_t tensors) {
  return !streams_output(s, value_bytes, tensors) && moves_past_cache(s, value_bytes, tensors);
}

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

// Calls f(offset, length) on consecutive pieces of at most kChunk values of [0, n).
template <typename F>
void for_each_chunk(int64_t n, const F& f) {
  for (int64_t offset = 0; offset < n; offset += kChunk) {
    f(offset, std::min(kChunk, n - offset));
  }
}

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

// How the rows layout is cut: groups of rows processed as one run, blocks of groups reduced
// together.
struct RowPlan {
  int64_t rows, channels, group_rows, num_groups, num_blocks;

  // Blocks of whole groups, their sizes within a group of each other and their count a multiple
  // of kBlockCountMultiple (or every group a block), so that two or four threads get equal
  // shares; the count depends on the shape alone, so the sums do not depend on the thread count.
  // Blocks of a fixed size left 24.5 of them at 32x2048x7x7 and 32x512x7x7, 13 on one of two
  // threads.
  explicit RowPlan(const Shape& s, int64_t block_values = kBlockValues) : rows(s.count()), channels(s.channels) {
    group_rows = std::max<int64_t>(1, kMinGroupValues / channels);
    num_groups = div_up(rows, group_rows);
    const int64_t blocks =
        div_up(div_up(rows, wanted_rows(channels, block_values)), kBlockCountMultiple) * kBlockCountMultiple;
    num_blocks = std::min(num_groups, blocks);
  }

  // The rows a block of `block_values` values is made of, before the count is rounded.
  static int64_t wanted_rows(int64_t channels, int64_t block_values) {
    return std::max(kMinBlockRows, block_values / channels);
  }

  int64_t block_start(int64_t block) const { return std::min(rows, block * num_groups / num_blocks * group_rows); }

  int64_t block_end(int64_t block) const { return block_start(block + 1); }

  int64_t rows_in(int64_t block) const { return block_end(block) - block_start(block); }

  // Calls f(first_value, position, length) on the groups of rows of a block, chunk by chunk,
  // with `position` the offset inside the group (the index into tiled per-channel arrays).
  template <typename F>
  void for_each_chunk_in(int64_t block, const F& f) const {
    for_each_chunk_in_rows(block_start(block), block_end(block), f);
  }

  // The same on rows [r0, r1), r0 the first row of a group.
  template <typename F>
  void for_each_chunk_in_rows(int64_t r0, int64_t r1, const F& f) const {
    for (int64_t r = r0; r < r1; r += group_rows) {
      const int64_t length = std::min(group_rows, r1 - r) * channels;
      for_each_chunk(length, [&](int64_t position, int64_t n) { f(r * channels + position, position, n); });
    }
  }
};

// Calls f(block) on every block in parallel. Tasks get the same ranges whenever the block count
// is the same; with `recent_first` each task walks its range backwards, so that after a pass
// that walked it forwards, the blocks still in this core's cache are used first.
template <typename F>
void for_each_block(int64_t num_blocks, bool recent_first, const F& f) {
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = 0; i < b1 - b0; ++i) {
      f(recent_first ? b1 - 1 - i : b0 + i);
    }
    fence_streamed_stores();
  });
}

// Per-channel arrays that one loop reads and adds into, zero-filled, in one buffer: each lies
// 128 bytes further past a 4 KiB boundary than the one before, so that no two are a multiple of
// 4 KiB apart, as separate vectors of 1024 floats can be; there a load from one may wait on a
// store just made to the other, their address bits below 4 KiB matching (4K aliasing).
template <typename acc_t>
class ChannelArrays {
 public:
  ChannelArrays(int64_t channels, int count)
      : stride_(div_up(channels, kPage) * kPage + kSkew), values_(stride_ * count, acc_t(0)) {}
  acc_t* operator[](int k) { return values_.data() + k * stride_; }

 private:
  static constexpr int64_t kPage = 4096 / sizeof(acc_t);
  static constexpr int64_t kSkew = 128 / sizeof(acc_t);
  int64_t stride_;
  AlignedVector<acc_t> values_;
};

// Calls use(source_of), source_of(k, position) the per-channel source of arrays[k] (n values
// each, per-channel values tiled over rows of C channels) for a run of the rows layout at
// `position`. Where the caller's write loops will read steps (`reads_steps`: not where they
// record signs or gate dy by them), read bfloat16 steps (kParitySteps) and every run starts at a
// multiple of 2·V channels (C a multiple of 2·V; runs start at multiples of kChunk in a group of
// rows), PerChannelSteps, whose step-lane copies are made here: a step then widens its 2·V
// values with a shift and a mask and narrows them with one blend, where two vectors of 8 take
// two lane-crossing widenings, a pack and a permute. Elsewhere PerChannel. bfloat16
// channels-last over torch.nn, geometric means of the 12 ResNet-50 shapes, 3 alternating
// old/new process pairs (AMD EPYC Zen 3 VM, 2 threads): evaluation 1.23x -> 1.29x, backward
// 1.38x -> 1.49x, forward-train 1.58x -> 1.63x, forward+backward 1.43x -> 1.47x; outputs
// bitwise as before.
template <typename scalar_t, size_t K, typename F>
void with_row_sources(const std::array<const at::opmath_type<scalar_t>*, K>& arrays, int64_t n, int64_t C,
                      bool reads_steps, const F& use) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kParitySteps<scalar_t>) {
    constexpr int64_t kStepValues = 2 * Vectorized<acc_t>::size();
    static_assert(kChunk % kStepValues == 0, "runs start at multiples of a step");
    if (reads_steps && C % kStepValues == 0) {
      ChannelArrays<acc_t> in_steps(n, static_cast<int>(K));
      for (const auto k : c10::irange(K)) {
        in_step_lanes(arrays[k], n, in_steps[static_cast<int>(k)]);
      }
      use([&](int k, int64_t position) {
        return PerChannelSteps<acc_t>{arrays[k] + position, in_steps[k] + position};
      });
      return;
    }
  }
  use([&](int k, int64_t position) { return PerChannel<acc_t>{arrays[k] + position}; });
}

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

  // Calls use(dz) with the run's dz as a source for the loops, read and gated in registers; on
  // the pass that stores the residual's gradient, a chunk of dz gathered into a buffer first.
  // Returns what use returns.
  template <typename F>
  auto read(int64_t first, int64_t n, bool store_residual_grad, const F& use) {
    if (store_residual_grad && grad_residual) {
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
  // No mean kept apart from the shift and no epilogue: y = x · scale + shift. Only float and
  // double values have loops of their own for it (the `if constexpr` blocks below).
  const bool plain = !p.centered && !epilogue.residual && !epilogue.mask;
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
  // Short float planes without an epilogue or a kept mean as one stream (affine_planes), where a
  // plane's own loop costs as much as its values. Eval at 32x512x7x7 float32 1.03-1.06x over
  // torch.nn's so, against 0.97-0.99x plane by plane; 32x2048x7x7 1.03-1.04x against 0.98-1.02x;
  // at 14x14 and 28x28 (784 bytes a plane or more) within 1% of plane by plane (interleaved
  // with torch.nn in one process, one per build; Intel Xeon VM, 2 threads).
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (plain && short_planes && s.inner >= V) {
      at::parallel_for(0, s.batch * s.channels, grain, [&](int64_t p0, int64_t p1) {
        affine_planes(x, y, s.inner, s.channels, p0, p1, p.scale.data(), p.shift.data());
      });
      return;
    }
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
  for (const auto i : c10::irange(n)) {
    sum += static_cast<double>(run[i]);
  }
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
    for (const auto c : c10::irange(C)) {
      sum[c] += static_cast<double>(row[c]);
    }
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
  plan.for_each_chunk_range([&](int64_t b0, int64_t b1, int64_t /*offset: 0*/, int64_t /*length: inner*/) {
    std::fill(sums.begin(), sums.end(), acc_t(0));
    std::fill(dots.begin(), dots.end(), acc_t(0));
    for (const auto b : c10::irange(b0, b1)) {
      const int64_t row = plan.plane(b, c0);
      next_row.fetch(row, width);
      for_each_chunk(width, [&](int64_t at, int64_t n) {
        grad.read(row + at, n, /*store_residual_grad=*/true, [&](const auto& dz) {
          reduce_dy_dot_rows<acc_t>(dz, x + row + at, 1, n, PerChannel<acc_t>{hi_at.data() + at},
                                    PerChannel<acc_t>{lo_at.data() + at}, sums.data() + at, dots.data() + at);
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
          if (training) {
            grad_input<acc_t>(dz, x + first, dx + first, inner, /*stream=*/false, h, l, Uniform<acc_t>{k1},
                              Uniform<acc_t>{k2}, Uniform<acc_t>{k3});
          } else {
            scale_by<acc_t>(dz, dx + first, inner, /*stream=*/false, Uniform<acc_t>{k1});
          }
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
                  if (training) {
                    grad_input<acc_t>(dz, x + first, out.values, len, out.stream, hi_of.from(offset),
                                      lo_of.from(offset), view(0).from(offset), view(1).from(offset),
                                      view(2).from(offset));
                  } else {
                    scale_by<acc_t>(dz, out.values, len, out.stream, view(0).from(offset));
                  }
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
        reduce_dy_dot_rows<acc_t>(dz, x + first, n / width, width, of(0, position), of(1, position), sums + position,
                                  dots + position);
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
            if (training) {
              grad_input<acc_t>(dz, x + row, dx + row, width, grad.stream, mean_of(0, position), mean_of(1, position),
                                coefficient_of(2, position), coefficient_of(3, position),
                                coefficient_of(4, position));
            } else {
              scale_by<acc_t>(dz, dx + row, width, grad.stream, coefficient_of(2, position));
            }
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

void forward_train(const at::Tensor& input, const at::Tensor& output, const Shape& shape, const double* weight,
                   const double* bias, double eps, const Epilogue& epilogue, double* mean, double* invstd) {
  TORCH_BN_DISPATCH_DTYPES(input.scalar_type(), "torch_bn_forward_train", [&] {
    const auto* x = input.const_data_ptr<scalar_t>();
    auto* y = output.mutable_data_ptr<scalar_t>();
    if (shape.rows) {
      forward_train_rows(x, y, shape, weight, bias, eps, epilogue, mean, invstd);
    } else {
      forward_train_planar(x, y, shape, weight, bias, eps, epilogue, mean, invstd);
    }
  });
}

void normalize(const at::Tensor& input, const at::Tensor& output, const Shape& shape, const double* mean,
               const double* scale, const double* shift, const Epilogue& epilogue) {
  TORCH_BN_DISPATCH_DTYPES(input.scalar_type(), "torch_bn_normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t group_rows = shape.rows ? RowPlan(shape).group_rows : 1;
    normalize_impl(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), shape,
                   ChannelAffine<acc_t>(shape.channels, group_rows, mean, scale, shift), epilogue);
  });
}

void backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grad_input,
              const Shape& shape, const double* mean, const double* invstd, const double* weight, bool training,
              const GradPrologue& prologue, double* sum_dy, double* sum_dy_xmu) {
  const bool plain_grad = prologue.mask == nullptr && prologue.grad_residual == nullptr;
  if (!training && plain_grad && sum_dy == nullptr) {
    // Eval with dx alone: dx = dy * weight * invstd reads neither x nor a mask.
    const auto scale = scale_by_invstd(shape, weight, invstd);
    normalize(grad_output, grad_input, shape, nullptr, scale.data(), nullptr, Epilogue{});
    return;
  }
  // The per-channel sums are needed for dx in training; otherwise they may not be asked for.
  std::vector<double> unused_sums;
  if (sum_dy == nullptr) {
    unused_sums.assign(2 * shape.channels, 0.0);
    sum_dy = unused_sums.data();
    sum_dy_xmu = unused_sums.data() + shape.channels;
  }
  TORCH_BN_DISPATCH_DTYPES(input.scalar_type(), "torch_bn_backward", [&] {
    const auto* dy = grad_output.const_data_ptr<scalar_t>();
    const auto* x = input.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.defined() ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    if (shape.rows) {
      backward_rows(dy, x, dx, shape, mean, invstd, weight, training, prologue, sum_dy, sum_dy_xmu);
    } else {
      backward_planar(dy, x, dx, shape, mean, invstd, weight, training, prologue, sum_dy, sum_dy_xmu);
    }
  });
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
