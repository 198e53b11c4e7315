// Per-thread statistics and the block and warp reductions that combine them. Every reduction
// here merges in an order fixed by thread indices alone (no atomics), so the same input gives
// bitwise the same result on every run.
#pragma once
#include <cstdint>

namespace torch_bn::cuda {

// Count, mean and M2 = Σ(x - mean)² of some values.
template <typename T>
struct Welford {
  T mean;
  T m2;
  int64_t count;
};

// Chan et al.'s pairwise merge: exact in the sense that it only ever subtracts means, never
// forms Σx² - (Σx)²/n.
template <typename T>
__device__ __forceinline__ Welford<T> merge(const Welford<T>& a, const Welford<T>& b) {
  if (b.count == 0) {
    return a;
  }
  if (a.count == 0) {
    return b;
  }
  const int64_t count = a.count + b.count;
  const T b_share = static_cast<T>(b.count) / static_cast<T>(count);
  const T delta = b.mean - a.mean;
  return {a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * static_cast<T>(a.count) * b_share, count};
}

// One Welford accumulator per lane of a loaded vector. Every add() feeds all lanes, so they share
// one count and one reciprocal per vector.
template <typename T, int V>
struct WelfordLanes {
  using Lane = Welford<T>;
  static constexpr int kLanes = V;
  T mean[V] = {};
  T m2[V] = {};
  int64_t count = 0;

  __device__ __forceinline__ void add(const T (&value)[V]) {
    ++count;
    const T inverse = T(1) / static_cast<T>(count);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T delta = value[k] - mean[k];
      mean[k] += delta * inverse;
      m2[k] += delta * (value[k] - mean[k]);
    }
  }

  __device__ __forceinline__ Welford<T> lane(int k) const { return {mean[k], m2[k], count}; }
};

template <typename T, int V>
__device__ __forceinline__ WelfordLanes<T, V> merge(const WelfordLanes<T, V>& a, const WelfordLanes<T, V>& b) {
  WelfordLanes<T, V> out;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const Welford<T> lane = merge(a.lane(k), b.lane(k));
    out.mean[k] = lane.mean;
    out.m2[k] = lane.m2;
    out.count = lane.count;
  }
  return out;
}

// Σdy and Σdy·(x - mean): what the backward pass reduces.
template <typename T>
struct GradSums {
  T dy;
  T dot;
};

template <typename T>
__device__ __forceinline__ GradSums<T> merge(const GradSums<T>& a, const GradSums<T>& b) {
  return {a.dy + b.dy, a.dot + b.dot};
}

template <typename T, int V>
struct GradSumLanes {
  using Lane = GradSums<T>;
  static constexpr int kLanes = V;
  T dy[V] = {};
  T dot[V] = {};

  __device__ __forceinline__ void add(const T (&grad)[V], const T (&centered)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      dy[k] += grad[k];
      dot[k] += grad[k] * centered[k];
    }
  }

  __device__ __forceinline__ GradSums<T> lane(int k) const { return {dy[k], dot[k]}; }
};

template <typename T, int V>
__device__ __forceinline__ GradSumLanes<T, V> merge(const GradSumLanes<T, V>& a, const GradSumLanes<T, V>& b) {
  GradSumLanes<T, V> out;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    out.dy[k] = a.dy[k] + b.dy[k];
    out.dot[k] = a.dot[k] + b.dot[k];
  }
  return out;
}

// All lanes of a thread merged in lane order, for a layout whose lanes are one channel.
template <typename Lanes>
__device__ __forceinline__ typename Lanes::Lane fold_lanes(const Lanes& lanes) {
  typename Lanes::Lane total = lanes.lane(0);
#pragma unroll
  for (int k = 1; k < Lanes::kLanes; ++k) {
    total = merge(total, lanes.lane(k));
  }
  return total;
}

// Merges `value` over a group of `n` threads by a binary tree in shared memory; the thread with
// `index` i of the group keeps its value in slots[i * stride]. Every thread of the block must
// call this with the same `n` (it synchronizes the block). Returns the group's total.
template <typename T>
__device__ T tree_reduce(const T& value, T* slots, int index, int n, int stride) {
  slots[index * stride] = value;
  __syncthreads();
  int half = 1;
  while (half < n) {
    half *= 2;
  }
  for (half /= 2; half > 0; half /= 2) {
    if (index < half && index + half < n) {
      slots[index * stride] = merge(slots[index * stride], slots[(index + half) * stride]);
    }
    __syncthreads();
  }
  return slots[0];
}

// The sum over the 32 lanes of a warp, the same in every lane: x + y and y + x round alike, so
// both partners of each butterfly step hold identical bits.
__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

} // namespace torch_bn::cuda
