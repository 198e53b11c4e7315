// The CUDA passes that ops.cu composes into the torch_bn operators. Each launches on the current
// stream of the current device (ops.cu sets the device guard) and takes tensors already checked
// and laid out by layout.h's kernel_input, with numel() > 0.
#pragma once
#include "../activation.h"
#include "../layout.h"
#include "channel_values.cuh"

#include <ATen/core/Tensor.h>

namespace torch_bn::cuda {

// Training forward: per-channel batch mean and biased variance of x, stored as mean and
// invstd = 1/sqrt(var + eps) (the statistics dtype), then y = (x - mean) * invstd * w + b and the
// epilogue. Reads x twice: once for the statistics, once to normalize.
void normalize_with_batch_statistics(
    const at::Tensor& x, const at::Tensor& y, const Shape& shape, const ChannelInput& weight,
    const ChannelInput& bias, double eps, const Epilogue& epilogue, const at::Tensor& mean,
    const at::Tensor& invstd);

// What `spread` holds in affine_coefficients.
enum class Spread { kVariance, kInvstd };

// A [4, C] table in the accumulation dtype of `input_dtype` for `affine`: y = (x - mean) * scale
// + bias with scale = weight / sqrt(var + eps) or weight * invstd. An absent mean or bias reads 0,
// an absent weight 1.
at::Tensor affine_coefficients(
    at::ScalarType input_dtype, const at::TensorOptions& options, int64_t channels,
    const ChannelInput& mean, const ChannelInput& weight, const ChannelInput& bias,
    const ChannelInput& spread, Spread spread_kind, double eps);

// out = epilogue((gate(in) - mean) * scale + shift) per channel, with a table from
// affine_coefficients; the gate's grad_residual is not written here. A mask the epilogue writes is
// zero-filled and padded to a multiple of 4 bytes.
void affine(
    const at::Tensor& in, const at::Tensor& out, const Shape& shape, const at::Tensor& table,
    const GradPrologue& gate = {}, const Epilogue& epilogue = {});

// With dz = dy gated by the prologue's mask: per-channel Σdz and Σdz·(x - mean) over one read of
// dy and x (storing dz as the prologue's grad_residual when that is non-null), then, each when
// defined: grad_weight = invstd · Σdz·(x - mean), grad_bias = Σdz, and the training-mode input
// gradient (a second read of dy and x). grad_weight and grad_bias are contiguous, of a dtype
// readable on the device.
void reduce_grad(
    const at::Tensor& dy, const at::Tensor& x, const Shape& shape, const ChannelInput& mean,
    const ChannelInput& invstd, const ChannelInput& weight, const GradPrologue& prologue,
    const at::Tensor& grad_input, const at::Tensor& grad_weight, const at::Tensor& grad_bias);

} // namespace torch_bn::cuda
