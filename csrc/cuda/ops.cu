// CUDA implementations of the torch_bn operators: argument checks, device guard, layout and
// allocation here, as in cpu/ops.cpp; the passes in statistics.cu, normalize.cu and backward.cu.
#include "../checks.h"
#include "../layout.h"
#include "../running_stats.h"
#include "kernels.cuh"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

namespace torch_bn::cuda {
namespace {

// Statistics are float32 for reduced-precision and float32 input, float64 for float64.
at::TensorOptions stats_options(const at::Tensor& input) {
  return input.options().dtype(at::toOpMathType(input.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  check_input(input);
  check_per_channel(input, weight, "weight");
  check_per_channel(input, bias, "bias");
  check_eps(eps, /*training=*/true);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto [x, shape] = kernel_input(input);
  at::Tensor output = at::empty_like(x);
  if (x.numel() == 0) {
    // An empty batch has no statistics; report those of an all-zero channel.
    return {output, at::zeros({shape.channels}, stats_options(input)),
            at::full({shape.channels}, 1.0 / std::sqrt(eps), stats_options(input))};
  }
  at::Tensor mean = at::empty({shape.channels}, stats_options(input));
  at::Tensor invstd = at::empty({shape.channels}, stats_options(input));
  normalize_with_batch_statistics(x, output, shape, ChannelInput(weight), ChannelInput(bias), eps, mean, invstd);
  return {output, mean, invstd};
}

at::Tensor forward_eval(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  check_input(input);
  check_per_channel(input, weight, "weight");
  check_per_channel(input, bias, "bias");
  check_per_channel(input, running_mean, "running_mean");
  check_per_channel(input, running_var, "running_var");
  check_eps(eps, /*training=*/false);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto [x, shape] = kernel_input(input);
  at::Tensor output = at::empty_like(x);
  if (x.numel() > 0) {
    const at::Tensor table = affine_coefficients(
        x.scalar_type(), x.options(), shape.channels, ChannelInput(running_mean), ChannelInput(weight),
        ChannelInput(bias), ChannelInput(running_var), Spread::kVariance, eps);
    affine(x, output, shape, table);
  }
  return output;
}

// A per-channel gradient in the parameters' dtype, or float32 where the kernels cannot write
// that dtype (float8 weights; backward converts the result).
at::Tensor empty_param_grad(const at::Tensor& input, int64_t channels, at::ScalarType param_type) {
  const at::ScalarType written = readable_on_device(param_type) ? param_type : at::kFloat;
  return at::empty({channels}, input.options().dtype(written));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool training,
    std::array<bool, 3> output_mask) {
  check_input(input);
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(),
      "torch_bn: grad_output of shape ", grad_output.sizes(), " does not match input of shape ", input.sizes());
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
      "torch_bn: grad_output must have the input's dtype and device");
  check_per_channel(input, weight, "weight");
  check_per_channel(input, mean, "mean");
  check_per_channel(input, invstd, "invstd");
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto [x, shape] = kernel_input(input);
  const at::Tensor dy = with_layout_of(grad_output, x);
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, input.options().dtype(param_type));
  at::Tensor grad_bias = at::empty({0}, input.options().dtype(param_type));
  if (x.numel() == 0) {
    // No values: the sums, and so both parameter gradients, are zero.
    if (output_mask[1]) {
      grad_weight = at::zeros({shape.channels}, input.options().dtype(param_type));
    }
    if (output_mask[2]) {
      grad_bias = at::zeros({shape.channels}, input.options().dtype(param_type));
    }
    return {grad_input, grad_weight, grad_bias};
  }
  if (output_mask[1]) {
    grad_weight = empty_param_grad(input, shape.channels, param_type);
  }
  if (output_mask[2]) {
    grad_bias = empty_param_grad(input, shape.channels, param_type);
  }
  const ChannelInput weight_values(weight);
  const bool training_grad_input = training && output_mask[0];
  if (training_grad_input || output_mask[1] || output_mask[2]) {
    reduce_grad(
        dy, x, shape, ChannelInput(mean), ChannelInput(invstd), weight_values,
        training_grad_input ? grad_input : at::Tensor(), output_mask[1] ? grad_weight : at::Tensor(),
        output_mask[2] ? grad_bias : at::Tensor());
  }
  if (output_mask[0] && !training) {
    // Eval: dx = dy * weight * invstd does not depend on x.
    const at::Tensor table = affine_coefficients(
        x.scalar_type(), x.options(), shape.channels, ChannelInput(), weight_values, ChannelInput(),
        ChannelInput(invstd), Spread::kInvstd, 0.0);
    affine(dy, grad_input, shape, table);
  }
  return {grad_input, grad_weight.to(param_type), grad_bias.to(param_type)};
}

} // namespace

TORCH_LIBRARY_IMPL(torch_bn, CUDA, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward", &backward);
  // O(C) work in ATen ops, which run on the tensors' device.
  m.impl("update_running_stats", &update_running_stats);
}

} // namespace torch_bn::cuda
