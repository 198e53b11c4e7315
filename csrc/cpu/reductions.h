// The statistics passes' loops: sums of a term over runs, rows and columns, in the accumulation
// type, with fixed orders of adds.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "aligned_vector.h"
#include "fetch_ahead.h"
#include "run_sources.h"
#include "statistics_terms.h"
#include "vector_loads.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

// The reductions below sum into local totals and write them out at the end: a RunTotal's lanes
// then stay in registers through the run. Added to in place, they would be stored after every
// step, since a vector type may alias the float input read between steps.

// Σ term(x, a, b) over a run, the term's k-th sum (see as_sums) added to out[k] at the end. The
// run's totals start from zero in registers: copying two running totals in and out was a block
// move per run, a third of forward-train's statistics time at 14x14.
template <typename acc_t, typename T, typename Term, typename P>
inline void reduce_terms(const T* x, int64_t n, const Term& term, const P& a, const P& b, RunTotal<acc_t>* out,
                         const FetchAhead& ahead = {}) {
  constexpr size_t K = sum_count<acc_t, Term>;
  RunTotal<acc_t> total[K];
  const auto vector_step = [&](int slot, int64_t j) {
    if (slot == 0) {
      ahead.step<acc_t>(j);
    }
    const auto terms = as_sums(term(load<acc_t>(x + j), a, b, j));
    for (size_t k = 0; k < K; ++k) {
      total[k].add(slot, j, terms[k]);
    }
  };
  int64_t i = 0;
  if constexpr (kParitySteps<T> && kSameInEveryLane<P>) {
    i = for_each_vector<acc_t>(n, vector_step, [&](int slot, int64_t j) {
      if (slot == 0) {
        ahead.step<acc_t>(j);
      }
      const auto x_values = load_step<acc_t>(x + j);
      for (int half = 0; half < 2; ++half) {
        const auto terms = as_sums(term(x_values[half], a, b, j));
        for (size_t k = 0; k < K; ++k) {
          total[k].add(slot + half, j, terms[k]);
        }
      }
    });
  } else {
    i = for_each_vector<acc_t>(n, vector_step);
  }
  for (; i < n; ++i) {
    const auto terms = as_sums(term(static_cast<acc_t>(x[i]), a, b, i));
    for (size_t k = 0; k < K; ++k) {
      total[k].add(i, terms[k]);
    }
  }
  for (size_t k = 0; k < K; ++k) {
    out[k].add(total[k]);
  }
}

// Σ dy and Σ dy·(x - mean): everything backward needs from a pass over x and dy, added to sum and
// dot. `dy` is a source (Values, SignGated): dy[i] and dy.vec(i) are its values in the
// accumulation type. As in reduce_terms the run's totals start from zero in registers: copied
// in, the totals were moved in halves and read back whole, a store-forwarding stall per run
// (backward 5-15% slower at 7x7 and 14x14, even at 28x28; interleaved A/B, 2 threads).
template <typename acc_t, typename D, typename T, typename P>
inline void reduce_dy_dot(const D& dy, const T* x, int64_t n, const P& hi, const P& lo, RunTotal<acc_t>& sum,
                          RunTotal<acc_t>& dot, const FetchAhead& ahead = {}) {
  using Vec = Vectorized<acc_t>;
  RunTotal<acc_t> sum_total, dot_total;
  const auto vector_step = [&](int slot, int64_t j) {
    if (slot == 0) {
      ahead.step<acc_t>(j);
    }
    const Vec g = dy.vec(j);
    sum_total.add(slot, j, g);
    dot_total.add(slot, j, g * centered(load<acc_t>(x + j), hi, lo, j));
  };
  int64_t i = 0;
  if constexpr (kParitySteps<T> && D::kSteps && kSameInEveryLane<P>) {
    i = for_each_vector<acc_t>(n, vector_step, [&](int slot, int64_t j) {
      if (slot == 0) {
        ahead.step<acc_t>(j);
      }
      const auto g = dy.step(j);
      const auto x_values = load_step<acc_t>(x + j);
      for (int half = 0; half < 2; ++half) {
        sum_total.add(slot + half, j, g[half]);
        dot_total.add(slot + half, j, g[half] * centered(x_values[half], hi, lo, j));
      }
    });
  } else {
    i = for_each_vector<acc_t>(n, vector_step);
  }
  for (; i < n; ++i) {
    const acc_t g = dy[i];
    sum_total.add(i, g);
    dot_total.add(i, acc_t(g * centered(static_cast<acc_t>(x[i]), hi, lo, i)));
  }
  sum.add(sum_total);
  dot.add(dot_total);
}

// Σ dy and Σ dy·(x - mean) of one channel, carried from plane to plane (see carry_dy_dot).
template <typename acc_t>
struct DyDotCarry {
  Vectorized<acc_t> sum0 = Vectorized<acc_t>(acc_t(0)), sum1 = Vectorized<acc_t>(acc_t(0));
  Vectorized<acc_t> dot0 = Vectorized<acc_t>(acc_t(0)), dot1 = Vectorized<acc_t>(acc_t(0));
  acc_t sum_tail = 0, dot_tail = 0;
  acc_t sum() const { return horizontal_sum(sum0 + sum1) + sum_tail; }
  acc_t dot() const { return horizontal_sum(dot0 + dot1) + dot_tail; }
};

// `carry` plus a run's Σ dy and Σ dy·(x - mean), dy a source as in reduce_dy_dot: two vectors at
// a time, then one, then scalars. The carry comes in and goes out by value, so that a loop over a
// channel's short planes keeps it in registers from plane to plane, where reduce_dy_dot's
// RunTotal, added to in memory, costs a load and a store of kUnroll vectors per run.
template <typename acc_t, typename D, typename T, typename P>
inline DyDotCarry<acc_t> carry_dy_dot(DyDotCarry<acc_t> carry, const D& dy, const T* x, int64_t n, const P& hi,
                                      const P& lo) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec g0 = dy.vec(i);
    const Vec g1 = dy.vec(i + V);
    carry.sum0 += g0;
    carry.sum1 += g1;
    carry.dot0 = at::vec::fmadd(g0, centered(load<acc_t>(x + i), hi, lo, i), carry.dot0);
    carry.dot1 = at::vec::fmadd(g1, centered(load<acc_t>(x + i + V), hi, lo, i + V), carry.dot1);
  }
  if (i + V <= n) {
    const Vec g = dy.vec(i);
    carry.sum0 += g;
    carry.dot0 = at::vec::fmadd(g, centered(load<acc_t>(x + i), hi, lo, i), carry.dot0);
    i += V;
  }
  for (; i < n; ++i) {
    const acc_t g = dy[i];
    carry.sum_tail += g;
    carry.dot_tail += g * centered(static_cast<acc_t>(x[i]), hi, lo, i);
  }
  return carry;
}

// The same per column over `rows` rows of `width` columns, row r starting at r·stride (a
// channels-last group of rows, or a piece of one row; the rows of an NCHW group by position),
// added to sum[c] and dot[c]: dy, hi and lo are seen from the group's start, column c of row r at
// r·stride + c. kRows rows at a time, each vector of columns summed down them in registers, and
// then the next: the sums are loaded and stored once per kRows rows, and added in row order
// whatever kRows is. Adjacent rows one at a time, in memory order: strips of columns summed down
// the rows in registers took twice as long from L3 or memory (2 threads, 32x128x28x28 and
// 32x128x56x56 float32 on the AMD EPYC VM), and two or four rows at a time 1.5-1.7x as long
// (32x128x28x28, 1 thread, AMD EPYC Zen 4 VM): the rows of a strip are each a new line. Rows a
// batch stride apart by position, four at a time (see sum_dy_dot_by_position).
template <int kRows, typename acc_t, typename D, typename T, typename P>
TORCH_BN_FLATTEN inline void reduce_dy_dot_rows(const D& dy, const T* x, int64_t rows, int64_t width, int64_t stride,
                                                const P& hi, const P& lo, acc_t* sum, acc_t* dot) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  // Rows [r0, r0 + count) added in.
  const auto add_rows = [&](auto count, int64_t r0) {
    constexpr int K = decltype(count)::value;
    int64_t c = 0;
    for (; c + V <= width; c += V) {
      Vec sum_c = Vec::loadu(sum + c), dot_c = Vec::loadu(dot + c);
      for (int k = 0; k < K; ++k) {
        const int64_t row = (r0 + k) * stride;
        const Vec g = dy.vec(row + c);
        sum_c = sum_c + g;
        dot_c = at::vec::fmadd(g, centered(load<acc_t>(x + row + c), hi, lo, c), dot_c);
      }
      sum_c.store(sum + c);
      dot_c.store(dot + c);
    }
    for (; c < width; ++c) {
      for (int k = 0; k < K; ++k) {
        const int64_t row = (r0 + k) * stride;
        // Column c's sums do not depend on whether it is in a vector (see in_a_lane).
        const acc_t g = dy[row + c];
        sum[c] += g;
        dot[c] = in_a_lane<acc_t>(fused_multiply_add, g, centered(static_cast<acc_t>(x[row + c]), hi, lo, c), dot[c]);
      }
    }
  };
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    add_rows(std::integral_constant<int, kRows>{}, r);
  }
  for (; r < rows; ++r) {
    add_rows(std::integral_constant<int, 1>{}, r);
  }
}

// Per-column sums over `rows` rows of C columns of x, row r starting at r·stride (a channels-last
// block, whose columns are its channels, or the short planes of an NCHW group), a strip of columns
// at a time: the strip's totals stay in registers down a group of rows, where adding each row
// into per-column totals in memory would load and store them for every vector. A group is a few
// KiB of consecutive rows, so that its rows, read strip by strip, are a handful of streams (a wide
// row read down a whole block would be a stream per row and miss L1). For every column c and
// each sum k of the term (see as_sums), total[k·C + c] = Σ_r term(x at r·stride + c, a, b, c)[k],
// summed in row order in the accumulation type over pieces of `piece_rows` rows (at most
// kChunk), and in double across pieces. The hardware prefetchers do not follow the strip order:
// with `fetch_ahead`, each strip fetches its columns of the next group's rows while it sums this
// group's, for a pass whose rows come from memory.
// `by_rows` walks narrow rows from memory instead (see forward_train_rows): groups of two rows,
// one vector of columns at a time, so that x is read in memory order and the totals are loaded
// and stored once per two rows; with `fetch_ahead` each group fetches the rows kRowWalkFetchBytes
// ahead. The sums are the same, added in the same order.
template <typename acc_t, typename T, typename Term, typename P>
TORCH_BN_FLATTEN inline void reduce_columns(const T* x, int64_t rows, int64_t C, int64_t stride, const Term& term,
                                            const P& a, const P& b, double* total, bool fetch_ahead,
                                            bool by_rows = false, int64_t piece_rows = kChunk) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int K = static_cast<int>(sum_count<acc_t, Term>);
  // Vectors per strip: their K totals and the terms' operands fit in 16 registers.
  constexpr int kStrip = 4;
  constexpr int64_t kGroupValues = 4096;
  constexpr int64_t kRowWalkGroup = 2;
  // 512 bytes to 8 KiB were alike on the AMD EPYC Zen 3 VM. On the Zen 4 VM, whose memory
  // delivers twice as fast, 2 KiB left the walk waiting on its loads (perf: half the samples on
  // the load of x, and the prefetches stalling as well): forward-train 1.18x faster at
  // 32x64x112x112 with 8 KiB, 1.25x at 32x256x56x56 and 32x128x56x56; 16 KiB alike, 32 KiB no
  // better (operators, three alternating rounds of processes, medians of 7 interleaved rounds).
  constexpr int64_t kRowWalkFetchBytes = 8192;
  const int64_t group_rows = by_rows ? kRowWalkGroup : std::max<int64_t>(8, kGroupValues / C);
  const int64_t row_bytes = stride * static_cast<int64_t>(sizeof(T));
  AlignedVector<acc_t> sums(K * C);
  std::fill(total, total + K * C, 0.0);
  for (int64_t p0 = 0; p0 < rows; p0 += piece_rows) {
    const int64_t p1 = std::min(rows, p0 + piece_rows);
    std::fill(sums.begin(), sums.end(), acc_t(0));
    for (int64_t r0 = p0; r0 < p1; r0 += group_rows) {
      const int64_t r1 = std::min(p1, r0 + group_rows);
      if (by_rows && fetch_ahead) {
        prefetch_lines(reinterpret_cast<uintptr_t>(x + r0 * stride) + kRowWalkFetchBytes, (r1 - r0) * row_bytes);
      }
      // Adds rows [r0, r1) of the `width` vectors of columns from c into sums.
      const auto add_strip = [&](auto width, int64_t c) {
        constexpr int W = decltype(width)::value;
        Vec strip[W][K];
        for (int w = 0; w < W; ++w) {
          for (int k = 0; k < K; ++k) {
            strip[w][k] = Vec::loadu(sums.data() + k * C + c + w * V);
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * stride + c;
          if (fetch_ahead && !by_rows) {
            // Past the last group the address lies beyond x (see prefetch_lines).
            prefetch_lines(reinterpret_cast<uintptr_t>(row) + group_rows * row_bytes,
                           W * V * static_cast<int64_t>(sizeof(T)));
          }
          for (int w = 0; w < W; ++w) {
            const auto terms = as_sums(term(load<acc_t>(row + w * V), a, b, c + w * V));
            for (int k = 0; k < K; ++k) {
              strip[w][k] += terms[k];
            }
          }
        }
        for (int w = 0; w < W; ++w) {
          for (int k = 0; k < K; ++k) {
            strip[w][k].store(sums.data() + k * C + c + w * V);
          }
        }
      };
      int64_t c = 0;
      for (; !by_rows && c + kStrip * V <= C; c += kStrip * V) {
        add_strip(std::integral_constant<int, kStrip>{}, c);
      }
      for (; c + V <= C; c += V) {
        add_strip(std::integral_constant<int, 1>{}, c);
      }
      for (; c < C; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto terms = as_sums(term(static_cast<acc_t>(x[r * stride + c]), a, b, c));
          for (int k = 0; k < K; ++k) {
            sums[k * C + c] += terms[k];
          }
        }
      }
    }
    for (const auto i : c10::irange(K * C)) {
      total[i] += static_cast<double>(sums[i]);
    }
  }
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
