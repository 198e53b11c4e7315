// The units the CPU kernels cut their work into: blocks of channels-last rows, groups of NCHW
// planes, chunks of a sum in the accumulation type, tasks for at::parallel_for.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "vector_loads.h"

#include <algorithm>
#include <cstdint>

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

int64_t div_up(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Calls f(offset, length) on consecutive pieces of at most kChunk values of [0, n).
template <typename F>
void for_each_chunk(int64_t n, const F& f) {
  for (int64_t offset = 0; offset < n; offset += kChunk) {
    f(offset, std::min(kChunk, n - offset));
  }
}

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
