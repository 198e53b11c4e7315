// The two memory layouts the kernels read in place, and how an input is mapped onto one.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace torch_bn {

// An input of batch x channels x inner values. Planar: each (n, c) owns a contiguous run of
// `inner` values (NCHW, NCL). Rows: each of the batch*inner rows holds the `channels` values of
// one position (NHWC, NDHWC, or a 2-d (N, C) input).
struct Shape {
  int64_t batch;
  int64_t channels;
  int64_t inner;
  bool rows;
  // Values per channel: the n of the statistics.
  int64_t count() const { return batch * inner; }
};

// The input itself when it is contiguous or channels-last dense; otherwise a contiguous copy.
// Outputs are allocated with empty_like(tensor), so they keep the input's memory format.
struct KernelInput {
  at::Tensor tensor;
  Shape shape;
};

inline KernelInput kernel_input(const at::Tensor& input) {
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t inner = channels == 0 || batch == 0 ? 0 : input.numel() / (batch * channels);
  const bool channels_last = (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                             (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  // With one value per (n, c) both layouts coincide; rows vectorize across channels.
  if (input.is_contiguous()) {
    return {input, {batch, channels, inner, inner == 1}};
  }
  if (channels_last) {
    return {input, {batch, channels, inner, true}};
  }
  return {input.contiguous(), {batch, channels, inner, inner == 1}};
}

// `t` with exactly the strides of `like` (a dense tensor of the same sizes), copying if needed.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) {
    return t;
  }
  return at::empty_like(like).copy_(t);
}

} // namespace torch_bn
