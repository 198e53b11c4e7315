// The per-block results of a reduction pass: one double per (field, split, channel), written by
// the reduction kernel and merged per channel, in split order, by a small second kernel with one
// warp per channel.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

namespace torch_bn::cuda {

struct Partials {
  double* data;
  int64_t splits;
  int64_t channels;

  __device__ __forceinline__ double& at(int field, int64_t split, int64_t channel) const {
    return data[(field * splits + split) * channels + channel];
  }
};

// An uninitialized [fields, splits, channels] buffer on `like`'s device: the reduction kernel
// writes every slot before the merge reads it.
inline at::Tensor empty_partials(const at::Tensor& like, int fields, int64_t splits, int64_t channels) {
  return at::empty({fields, splits, channels}, like.options().dtype(at::kDouble));
}

inline Partials partials_view(const at::Tensor& storage) {
  return {storage.mutable_data_ptr<double>(), storage.size(1), storage.size(2)};
}

// The merging kernels run one warp per channel, kMergeWarps channels per block.
constexpr int kMergeWarps = 8;

inline dim3 merge_grid(int64_t channels) {
  return dim3(static_cast<unsigned>((channels + kMergeWarps - 1) / kMergeWarps));
}

inline dim3 merge_block() {
  return dim3(32, kMergeWarps);
}

// The channel of this warp in a merging kernel.
__device__ __forceinline__ int64_t merge_channel() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}

} // namespace torch_bn::cuda
