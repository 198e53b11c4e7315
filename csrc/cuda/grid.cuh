// How the kernels cover an input: which thread reads which vectors of which channels, and how a
// block combines its threads' statistics. One grid type per layout (see layout.h's Shape); the
// kernels are written once against this interface:
//
//   kVec                  values per load: 16 bytes (8 values where a kernel writes a sign mask),
//                         or 1 where the layout or the alignment forbids vectors
//   active()              whether this thread owns channels (the rows grid pads the last tile)
//   channel(k)            the channel of lane k of this thread's vectors
//   shift_element(k)      an element of lane k's channel, to shift that lane's sums by
//   split()               this block's piece of each channel, indexing partial results
//   for_each_vector(f)    calls f(i) for the i-th kVec-vector of every load of this thread
//   reduce(lanes, smem, store)   combines the per-lane statistics of the threads that share
//                         channels and calls store(k, channel, total) once per channel
//
// Blocks split each channel into at most about kTargetBlocks / channels pieces, so that few
// channels still fill the GPU. The split depends on the shape and vector width only, never on
// the device, so one build gives bitwise the same results on any GPU it runs on.
#pragma once
#include "../layout.h"
#include "reduce.cuh"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace torch_bn::cuda {

constexpr int kThreads = 256;
// About two waves of 256-thread blocks on a 132-SM H100 (8 resident blocks per SM).
constexpr int64_t kTargetBlocks = 2048;
// Enough loads per thread to amortize a block's setup and its partial result.
constexpr int64_t kMinVecsPerThread = 8;
// A block of the rows layout writes one partial per channel of its tile (24 bytes): cover enough
// rows that this stays a few percent of what the block reads.
constexpr int64_t kMinRowsPerSplit = 256;

inline int64_t div_up(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t pow2_floor(int64_t n) {
  int64_t p = 1;
  while (p * 2 <= n) {
    p *= 2;
  }
  return p;
}

inline int64_t pow2_ceil(int64_t n) {
  int64_t p = 1;
  while (p < n) {
    p *= 2;
  }
  return p;
}

// kVec values loaded or stored with one 16-byte (or narrower) access.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vector {
  scalar_t value[V];
};

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vector(const scalar_t* __restrict__ data, int64_t i, acc_t (&out)[V]) {
  const Vector<scalar_t, V> v = reinterpret_cast<const Vector<scalar_t, V>*>(data)[i];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    out[k] = static_cast<acc_t>(v.value[k]);
  }
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vector(scalar_t* __restrict__ data, int64_t i, const acc_t (&in)[V]) {
  Vector<scalar_t, V> v;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    v.value[k] = static_cast<scalar_t>(in[k]);
  }
  reinterpret_cast<Vector<scalar_t, V>*>(data)[i] = v;
}

// Planar layout (NCHW): block (c, batch split, inner split) reads channel c's planes
// [planes_per_split * blockIdx.y, ...) and, in each, the vectors [vecs_per_split * blockIdx.z, ...);
// threadIdx.x walks a plane, threadIdx.y walks planes. All lanes of a thread are channel c.
template <int V>
struct PlanarGrid {
  static constexpr int kVec = V;
  int64_t batch, channels, inner, planes_per_split, vecs_per_split;
  dim3 grid, block;

  explicit PlanarGrid(const Shape& s) : batch(s.batch), channels(s.channels), inner(s.inner) {
    const int64_t plane_vecs = inner / V;
    const int64_t tx = pow2_floor(std::min<int64_t>(plane_vecs, kThreads));
    const int64_t wanted = div_up(kTargetBlocks, channels);
    const int64_t useful = div_up(batch * plane_vecs, kThreads * kMinVecsPerThread);
    const int64_t splits = std::max<int64_t>(1, std::min(wanted, useful));
    planes_per_split = div_up(batch, std::min(batch, splits));
    const int64_t batch_splits = div_up(batch, planes_per_split);
    vecs_per_split = div_up(div_up(plane_vecs, div_up(splits, batch_splits)), tx) * tx;
    const int64_t inner_splits = div_up(plane_vecs, vecs_per_split);
    // Small planes: several planes per block, but no more thread rows than planes.
    const int64_t ty = std::min(kThreads / tx, pow2_ceil(planes_per_split));
    TORCH_CHECK(channels <= INT32_MAX, "torch_bn: too many channels for the CUDA kernels: ", channels);
    grid = dim3(static_cast<unsigned>(channels), static_cast<unsigned>(batch_splits),
                static_cast<unsigned>(inner_splits));
    block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  }

  int64_t splits() const { return static_cast<int64_t>(grid.y) * grid.z; }

  template <typename Lanes>
  static size_t shared_bytes(const dim3& block) {
    return sizeof(typename Lanes::Lane) * block.x * block.y;
  }

  __device__ __forceinline__ bool active() const { return true; }
  __device__ __forceinline__ int64_t channel(int /*lane*/) const { return blockIdx.x; }
  // Every lane of a planar thread is one channel, so all share one shift: its first element.
  __device__ __forceinline__ int64_t shift_element(int /*lane*/) const { return blockIdx.x * inner; }
  __device__ __forceinline__ int64_t split() const { return static_cast<int64_t>(blockIdx.y) * gridDim.z + blockIdx.z; }

  template <typename F>
  __device__ __forceinline__ void for_each_vector(const F& f) const {
    const int64_t plane_vecs = inner / V;
    const int64_t b0 = blockIdx.y * planes_per_split;
    const int64_t b1 = std::min(batch, b0 + planes_per_split);
    const int64_t v0 = blockIdx.z * vecs_per_split;
    const int64_t v1 = std::min(plane_vecs, v0 + vecs_per_split);
    for (int64_t b = b0 + threadIdx.y; b < b1; b += blockDim.y) {
      const int64_t plane = (b * channels + blockIdx.x) * plane_vecs;
      // Unrolled so that several independent loads are in flight per thread.
#pragma unroll 4
      for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
        f(plane + v);
      }
    }
  }

  template <typename Lanes, typename Store>
  __device__ __forceinline__ void reduce(const Lanes& lanes, void* smem, const Store& store) const {
    using Lane = typename Lanes::Lane;
    const int index = threadIdx.y * blockDim.x + threadIdx.x;
    const Lane total = tree_reduce(fold_lanes(lanes), static_cast<Lane*>(smem), index, blockDim.x * blockDim.y, 1);
    if (index == 0) {
      store(0, channel(0), total);
    }
  }
};

// Rows layout (NHWC and (N, C)): block (channel tile, row split) reads the rows
// [rows_per_split * blockIdx.y, ...); threadIdx.x picks a vector of channels in the tile,
// threadIdx.y walks rows. Lane k of a thread is channel kVec * (its channel vector) + k.
template <int V>
struct RowsGrid {
  static constexpr int kVec = V;
  int64_t rows, channels, rows_per_split;
  dim3 grid, block;

  explicit RowsGrid(const Shape& s) : rows(s.count()), channels(s.channels) {
    const int64_t channel_vecs = channels / V;
    const int64_t tiles = div_up(channel_vecs, kThreads);
    const int64_t tx = div_up(channel_vecs, tiles);
    const int64_t wanted = div_up(kTargetBlocks, tiles);
    const int64_t useful = div_up(rows, std::max(kMinRowsPerSplit, kThreads / tx * kMinVecsPerThread));
    const int64_t splits = std::max<int64_t>(1, std::min(wanted, useful));
    rows_per_split = div_up(rows, splits);
    const int64_t ty = std::min(std::max<int64_t>(1, kThreads / tx), rows_per_split);
    TORCH_CHECK(tiles <= INT32_MAX, "torch_bn: too many channels for the CUDA kernels: ", channels);
    grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(div_up(rows, rows_per_split)));
    block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  }

  int64_t splits() const { return grid.y; }

  template <typename Lanes>
  static size_t shared_bytes(const dim3& block) {
    return sizeof(Lanes) * block.x * block.y;
  }

  __device__ __forceinline__ int64_t channel_vec() const {
    return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  }
  __device__ __forceinline__ bool active() const { return channel_vec() < channels / V; }
  __device__ __forceinline__ int64_t channel(int lane) const { return channel_vec() * V + lane; }
  // Each lane is its own channel, shifted by that channel's value in the first row.
  __device__ __forceinline__ int64_t shift_element(int lane) const { return channel(lane); }
  __device__ __forceinline__ int64_t split() const { return blockIdx.y; }

  template <typename F>
  __device__ __forceinline__ void for_each_vector(const F& f) const {
    if (!active()) {
      return;
    }
    const int64_t row_vecs = channels / V;
    const int64_t cv = channel_vec();
    const int64_t r0 = blockIdx.y * rows_per_split;
    const int64_t r1 = std::min(rows, r0 + rows_per_split);
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      f(r * row_vecs + cv);
    }
  }

  template <typename Lanes, typename Store>
  __device__ __forceinline__ void reduce(const Lanes& lanes, void* smem, const Store& store) const {
    // A column of threads (same threadIdx.x) shares channels: merge down each column.
    const Lanes total = tree_reduce(lanes, static_cast<Lanes*>(smem) + threadIdx.x, threadIdx.y, blockDim.y, blockDim.x);
    if (threadIdx.y == 0 && active()) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        store(k, channel(k), total.lane(k));
      }
    }
  }
};

// The per-channel values of this thread's lanes.
template <typename Grid, typename T>
__device__ __forceinline__ void gather_channels(const Grid& g, const T* per_channel, T (&lanes)[Grid::kVec]) {
#pragma unroll
  for (int k = 0; k < Grid::kVec; ++k) {
    lanes[k] = per_channel[g.channel(k)];
  }
}

// Calls f(grid) with the grid of `shape`, loading kVec values at a time (16 bytes by default)
// when such vectors stay inside a plane (planar) or a row (rows) and every pointer is aligned to
// them; else one value at a time.
template <typename scalar_t, int kVec = 16 / sizeof(scalar_t), typename F>
void with_grid(const Shape& shape, std::initializer_list<const void*> pointers, const F& f) {
  bool vectorized = (shape.rows ? shape.channels : shape.inner) % kVec == 0;
  for (const void* p : pointers) {
    vectorized = vectorized && reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(scalar_t)) == 0;
  }
  if (shape.rows) {
    vectorized ? f(RowsGrid<kVec>(shape)) : f(RowsGrid<1>(shape));
  } else {
    vectorized ? f(PlanarGrid<kVec>(shape)) : f(PlanarGrid<1>(shape));
  }
}

} // namespace torch_bn::cuda
