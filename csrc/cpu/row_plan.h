// How a channels-last (rows) input is cut into blocks and groups of rows, and where the write
// loops read a run's per-channel values from.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "../layout.h"
#include "aligned_vector.h"
#include "run_sources.h"
#include "run_stores.h"
#include "vector_loads.h"
#include "work_units.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

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

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
