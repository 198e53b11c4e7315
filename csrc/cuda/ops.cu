// CUDA implementations of the torch_bn operators: argument checks, device guard, layout and
// allocation here, as in cpu/ops.cpp; the passes in statistics.cu, normalize.cu and backward.cu.
// The plain operators are the identity, no-residual case of the fused ones.
#include "../running_stats.h"
#include "kernels.cuh"
#include "../op_checks.h"
#include "../plain_ops.h"
#include "../stats_type.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

namespace torch_bn::cuda {
namespace {

at::TensorOptions stats_options(const at::Tensor& input) {
  return input.options().dtype(stats_type(input));
}

// A zeroed sign mask of mask_bytes(numel) bytes whose storage is padded to whole 32-bit words,
// which the kernels may OR into; empty when the activation records none.
at::Tensor new_mask(const at::Tensor& x, const ActivationSpec& activation) {
  const int64_t bytes = activation.has_mask() ? mask_bytes(x.numel()) : 0;
  return at::zeros({(bytes + 3) / 4 * 4}, x.options().dtype(at::kByte)).narrow(0, 0, bytes);
}

// What both fused forwards set up: the input and residual in the kernel layout, the output and
// the sign mask.
struct FusedForward {
  ActivationSpec activation;
  KernelInput in;
  at::Tensor residual, output, mask;

  FusedForward(
      const at::Tensor& input, const std::optional<at::Tensor>& residual_arg, c10::string_view activation_name,
      double negative_slope)
      : activation(ActivationSpec::parse(activation_name, negative_slope)),
        in(kernel_input(input)),
        residual(kernel_residual(input, in.tensor, residual_arg)),
        output(at::empty_like(in.tensor)),
        mask(new_mask(in.tensor, activation)) {}

  Epilogue epilogue() const {
    return {residual.defined() ? residual.const_data_ptr() : nullptr,
            activation.has_mask() ? mask.mutable_data_ptr<uint8_t>() : nullptr, activation.slope()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train_act(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    double eps,
    c10::string_view activation_name,
    double negative_slope) {
  check_forward_train_args(input, weight, bias, eps);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const FusedForward f(input, residual, activation_name, negative_slope);
  const int64_t channels = f.in.shape.channels;
  if (f.in.tensor.numel() == 0) {
    // An empty batch has no statistics; report those of an all-zero channel.
    return {f.output, at::zeros({channels}, stats_options(input)),
            at::full({channels}, 1.0 / std::sqrt(eps), stats_options(input)), f.mask};
  }
  at::Tensor mean = at::empty({channels}, stats_options(input));
  at::Tensor invstd = at::empty({channels}, stats_options(input));
  normalize_with_batch_statistics(
      f.in.tensor, f.output, f.in.shape, ChannelInput(weight), ChannelInput(bias), eps, f.epilogue(), mean, invstd);
  return {f.output, mean, invstd, f.mask};
}

std::tuple<at::Tensor, at::Tensor> forward_eval_act(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& residual,
    double eps,
    c10::string_view activation_name,
    double negative_slope) {
  check_forward_eval_args(input, weight, bias, running_mean, running_var, eps);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const FusedForward f(input, residual, activation_name, negative_slope);
  const at::Tensor& x = f.in.tensor;
  if (x.numel() > 0) {
    const at::Tensor table = affine_coefficients(
        x.scalar_type(), x.options(), f.in.shape.channels, ChannelInput(running_mean), ChannelInput(weight),
        ChannelInput(bias), ChannelInput(running_var), Spread::kVariance, eps);
    affine(x, f.output, f.in.shape, table, GradPrologue{}, f.epilogue());
  }
  return {f.output, f.mask};
}

// A per-channel gradient in the parameters' dtype, or float32 where the kernels cannot write
// that dtype (float8 weights; backward_act converts the result).
at::Tensor empty_param_grad(const at::Tensor& input, int64_t channels, at::ScalarType param_type) {
  const at::ScalarType written = readable_on_device(param_type) ? param_type : at::kFloat;
  return at::empty({channels}, input.options().dtype(written));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_act(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& mask,
    bool training,
    c10::string_view activation_name,
    double negative_slope,
    std::array<bool, 4> output_mask) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  const auto activation = ActivationSpec::parse(activation_name, negative_slope);
  check_mask_arg(mask, input, activation);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto [x, shape] = kernel_input(input);
  const at::Tensor dy = with_layout_of(grad_output, x);
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : empty();
  at::Tensor grad_residual = output_mask[3] ? at::empty_like(x) : empty();
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
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
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  if (output_mask[1]) {
    grad_weight = empty_param_grad(input, shape.channels, param_type);
  }
  if (output_mask[2]) {
    grad_bias = empty_param_grad(input, shape.channels, param_type);
  }
  const GradPrologue prologue{activation.has_mask() ? mask.const_data_ptr<uint8_t>() : nullptr, activation.slope(),
                              output_mask[3] ? grad_residual.mutable_data_ptr() : nullptr};
  const ChannelInput weight_values(weight);
  const bool training_grad_input = training && output_mask[0];
  // The reduction pass also stores the residual's gradient.
  if (training_grad_input || output_mask[1] || output_mask[2] || output_mask[3]) {
    reduce_grad(
        dy, x, shape, ChannelInput(mean), ChannelInput(invstd), weight_values, prologue,
        training_grad_input ? grad_input : at::Tensor(), output_mask[1] ? grad_weight : at::Tensor(),
        output_mask[2] ? grad_bias : at::Tensor());
  }
  if (output_mask[0] && !training) {
    // Eval: dx = dz * weight * invstd does not depend on x.
    const at::Tensor table = affine_coefficients(
        x.scalar_type(), x.options(), shape.channels, ChannelInput(), weight_values, ChannelInput(),
        ChannelInput(invstd), Spread::kInvstd, 0.0);
    affine(dy, grad_input, shape, table, prologue);
  }
  return {grad_input, grad_weight.to(param_type), grad_bias.to(param_type), grad_residual};
}

} // namespace

TORCH_LIBRARY_IMPL(torch_bn, CUDA, m) {
  impl_plain_ops<&forward_train_act, &forward_eval_act, &backward_act>(m);
  m.impl("forward_train_act", &forward_train_act);
  m.impl("forward_eval_act", &forward_eval_act);
  m.impl("backward_act", &backward_act);
  // O(C) work in ATen ops, which run on the tensors' device.
  m.impl("update_running_stats", &update_running_stats);
}

} // namespace torch_bn::cuda
