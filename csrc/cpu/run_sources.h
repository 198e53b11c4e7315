// What the loops read per channel (a planar run's one value, a row's per-channel values, the
// mean as hi + lo) and the running totals they add into.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "run_stores.h"
#include "vector_loads.h"

#include <ATen/cpu/vec/vec.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

template <typename acc_t>
inline acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (const acc_t lane : lanes) {
    total += lane;
  }
  return total;
}

// A per-channel parameter seen from a contiguous run of elements. In a planar (NCHW) run every
// element belongs to one channel (Uniform); in a row of a channels-last tensor element i
// belongs to channel i (PerChannel). Loops that store take these (and the dy sources below) by
// value: a callee's own copy cannot be aliased by its stores to float memory, so it stays in a
// register instead of being reloaded after every store. from(offset) is the parameter seen from
// the run's element `offset` on.
template <typename acc_t>
struct Uniform {
  acc_t value;
  Vectorized<acc_t> vec(int64_t /*i*/) const { return Vectorized<acc_t>(value); }
  acc_t operator[](int64_t /*i*/) const { return value; }
  Uniform from(int64_t /*offset*/) const { return *this; }
  const Uniform& parity(int /*h*/) const { return *this; }
};

template <typename acc_t>
struct PerChannel {
  const acc_t* values;
  Vectorized<acc_t> vec(int64_t i) const { return Vectorized<acc_t>::loadu(values + i); }
  acc_t operator[](int64_t i) const { return values[i]; }
  PerChannel from(int64_t offset) const { return {values + offset}; }
};

// A PerChannel whose runs may also be read a step at a time in load_step's lanes (channels-last
// bfloat16): `in_steps` holds the same values, each 2·V of them as their even-indexed ones, then
// their odd-indexed ones (in_step_lanes), so that parity(h) gives a step's even (h = 0) or odd
// (h = 1) values their coefficients with one load. A run starts at a multiple of 2·V channels.
template <typename acc_t>
struct PerChannelSteps {
  const acc_t* values;
  const acc_t* in_steps;
  Vectorized<acc_t> vec(int64_t i) const { return Vectorized<acc_t>::loadu(values + i); }
  acc_t operator[](int64_t i) const { return values[i]; }
  PerChannelSteps from(int64_t offset) const { return {values + offset, in_steps + offset}; }
  PerChannel<acc_t> parity(int h) const { return {in_steps + h * Vectorized<acc_t>::size()}; }
};

// `values` (n of them, a multiple of 2·V) into `out` in PerChannelSteps::in_steps's order.
template <typename acc_t>
void in_step_lanes(const acc_t* values, int64_t n, acc_t* out) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t step = 0; step < n; step += 2 * V) {
    for (int64_t lane = 0; lane < V; ++lane) {
      out[step + lane] = values[step + 2 * lane];
      out[step + V + lane] = values[step + 2 * lane + 1];
    }
  }
}

// Reductions run kUnroll vectors per step; a running total keeps one accumulator per slot, so
// the adds form kUnroll independent chains instead of one that waits on each add's latency.
constexpr int kUnroll = 4;

// Where a reduction's terms go: one running total of a planar run (all one channel). `slot` <
// kUnroll is the position of a vector within its step.
template <typename acc_t>
struct RunTotal {
  Vectorized<acc_t> lanes[kUnroll];
  acc_t tail = 0;
  RunTotal() : RunTotal(std::make_index_sequence<kUnroll>{}) {}
  void add(int slot, int64_t /*i*/, const Vectorized<acc_t>& v) { lanes[slot] += v; }
  void add(int64_t /*i*/, acc_t v) { tail += v; }
  void add(const RunTotal& other) {
    for (int slot = 0; slot < kUnroll; ++slot) {
      lanes[slot] += other.lanes[slot];
    }
    tail += other.tail;
  }
  acc_t total() const {
    Vectorized<acc_t> sum = lanes[0];
    for (int slot = 1; slot < kUnroll; ++slot) {
      sum += lanes[slot];
    }
    return horizontal_sum(sum) + tail;
  }

 private:
  // The lanes zeroed one by one: zeroed in a loop, GCC made the loop a memset (rep stos) of the
  // local totals of every run, whose stores the lanes' first loads then waited on. Backward at
  // 32x512x7x7 float32 took 0.40-0.59 ms so against 0.23-0.26 ms now (alternating builds,
  // against torch's in the same process: 0.57-0.71x of it before, 0.92-1.11x now).
  template <size_t... Slot>
  explicit RunTotal(std::index_sequence<Slot...>) : lanes{((void)Slot, Vectorized<acc_t>(acc_t(0)))...} {}
};

// n running totals (one per channel of a group), zeroed, in a plain byte buffer aligned by hand.
// A std::vector<RunTotal> allocates through the over-aligned operator new, which glibc serves
// with memalign past its per-thread cache. Two such vectors per group of channels made backward
// 2-8% slower at 32x128x28x28 float32 (otherwise the same loops, interleaved in one process, 1
// and 2 threads; as plain float vectors of the same bytes, no slower); this buffer instead:
// backward 1.03-1.05x at 32x128x28x28, 0.98-1.07x at 32x512x14x14.
template <typename acc_t>
class RunTotals {
 public:
  explicit RunTotals(int64_t n) : n_(n), bytes_(n * sizeof(RunTotal<acc_t>) + alignof(RunTotal<acc_t>)) {
    void* at = bytes_.data();
    size_t space = bytes_.size();
    first_ = static_cast<RunTotal<acc_t>*>(std::align(alignof(RunTotal<acc_t>), n * sizeof(RunTotal<acc_t>), at, space));
    reset();
  }
  RunTotals(const RunTotals&) = delete;
  RunTotals& operator=(const RunTotals&) = delete;

  RunTotal<acc_t>& operator[](int64_t i) { return first_[i]; }
  RunTotal<acc_t>* data() { return first_; }
  void reset() { std::uninitialized_fill_n(first_, n_, RunTotal<acc_t>()); }

 private:
  static_assert(std::is_trivially_destructible_v<RunTotal<acc_t>>, "the buffer is released without destructors");
  int64_t n_;
  std::vector<unsigned char> bytes_;
  RunTotal<acc_t>* first_;
};

// Calls vector_step(slot, i) on [0, n) kUnroll vectors at a time, then on the remaining whole
// vectors (slot 0), and returns where the scalar tail starts. Given a pair_step, kUnroll vectors
// at a time are pair_step(slot, i) on slots slot and slot + 1 instead: values i .. i + 2·V - 1,
// read in load_step's lanes.
template <typename acc_t, typename F, typename G = NoSteps>
inline int64_t for_each_vector(int64_t n, const F& vector_step, const G& pair_step = {}) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  static_assert(kUnroll % 2 == 0, "pair steps fill whole unrolled steps");
  int64_t i = 0;
  for (; i + kUnroll * V <= n; i += kUnroll * V) {
    for (int slot = 0; slot < kUnroll; slot += std::is_same_v<G, NoSteps> ? 1 : 2) {
      if constexpr (std::is_same_v<G, NoSteps>) {
        vector_step(slot, i + slot * V);
      } else {
        pair_step(slot, i + slot * V);
      }
    }
  }
  for (; i + V <= n; i += V) {
    vector_step(0, i);
  }
  return i;
}

// A mean of zero: `centered` leaves x as it is.
template <typename acc_t>
struct Zero {
  Zero from(int64_t /*offset*/) const { return *this; }
  const Zero& parity(int /*h*/) const { return *this; }
};

// Whether a per-channel source reads the same in every lane of a run (a planar run's channel),
// so that loops over it may read load_step's lanes.
template <typename P>
constexpr bool kSameInEveryLane = false;
template <typename acc_t>
constexpr bool kSameInEveryLane<Uniform<acc_t>> = true;
template <typename acc_t>
constexpr bool kSameInEveryLane<Zero<acc_t>> = true;

// Whether a per-channel source gives each of load_step's lanes its own channel's values
// (parity(h)), so that loops that write may read steps: those the same in every lane, and
// PerChannelSteps. The reductions of a run into one total take the former alone.
template <typename P>
constexpr bool kStepLanes = kSameInEveryLane<P>;
template <typename acc_t>
constexpr bool kStepLanes<PerChannelSteps<acc_t>> = true;

// The mean enters as hi + lo (two acc_t values whose sum is the double-precision mean), so
// (x - hi) - lo keeps the low bits that a float mean would drop: with mean 1e4 and std 1e-2
// those bits are the whole signal.
template <typename acc_t, typename P>
inline Vectorized<acc_t> centered(const Vectorized<acc_t>& x, const P& hi, const P& lo, int64_t i) {
  return (x - hi.vec(i)) - lo.vec(i);
}

template <typename acc_t, typename P>
inline acc_t centered(acc_t x, const P& hi, const P& lo, int64_t i) {
  return (x - hi[i]) - lo[i];
}

template <typename acc_t>
inline Vectorized<acc_t> centered(const Vectorized<acc_t>& x, const Zero<acc_t>&, const Zero<acc_t>&, int64_t) {
  return x;
}

template <typename acc_t>
inline acc_t centered(acc_t x, const Zero<acc_t>&, const Zero<acc_t>&, int64_t) {
  return x;
}

// f applied to vectors of the given values, lane 0's result: a value computed alone (a loop's
// scalar tail) rounds as the same value in a vector's lane does, so that no result depends on where
// a run or row starts and ends, which follows the thread count. A scalar formula of its own rounded
// differently: a (3, 5, 2, 2) float32 input gradient got other bits in rows narrower than a vector
// than in runs. The formulas given to it spell out their fused multiply-adds (at::vec::fmadd,
// fmsub), so that GCC, which fuses a·b + c where it chooses, has none of its own to fuse in one
// place and not in the other. Built with -ffp-contract=off instead, bfloat16 NCHW forward-train
// at 32x256x14x14 took about 1.15x as long (median of eight alternating process pairs), its
// statistics' squares no longer fused.
template <typename acc_t, typename F, typename... Values>
inline acc_t in_a_lane(const F& f, Values... values) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  f(Vectorized<acc_t>(static_cast<acc_t>(values))...).store(lanes);
  return lanes[0];
}

// a·b + c as at::vec::fmadd computes it (fused where the vector type fuses it).
inline constexpr auto fused_multiply_add = [](const auto& a, const auto& b, const auto& c) {
  return at::vec::fmadd(a, b, c);
};

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
