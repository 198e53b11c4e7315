// Argument checks of each operator as a whole, and the fused ops' extra tensors laid out for the
// kernels. Shared by every backend, one function per operator so that a backend cannot skip one.
#pragma once
#include "activation.h"
#include "checks.h"
#include "layout.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_bn {

inline void check_forward_train_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  check_input(input);
  check_per_channel(input, weight, "weight");
  check_per_channel(input, bias, "bias");
  check_eps(eps, /*training=*/true);
}

inline void check_forward_eval_args(
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
}

inline void check_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd) {
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
}

// The sign mask a fused forward returned, as its backward needs it.
inline void check_mask_arg(const at::Tensor& mask, const at::Tensor& input, const ActivationSpec& activation) {
  if (!activation.has_mask()) {
    return;
  }
  TORCH_CHECK(
      mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == mask_bytes(input.numel()) &&
          mask.is_contiguous() && mask.device() == input.device(),
      "torch_bn: mask must be the uint8 tensor of ", mask_bytes(input.numel()),
      " bytes that the forward returned, got ", mask.scalar_type(), " of shape ", mask.sizes());
}

// The residual of a fused forward in the kernel layout of the input `x` (copied only when its
// strides differ), or an undefined tensor.
inline at::Tensor kernel_residual(const at::Tensor& input, const at::Tensor& x, const std::optional<at::Tensor>& residual) {
  if (!residual.has_value() || !residual->defined()) {
    return {};
  }
  TORCH_CHECK(
      residual->sizes() == input.sizes(),
      "torch_bn: residual of shape ", residual->sizes(), " does not match input of shape ", input.sizes());
  TORCH_CHECK(
      residual->scalar_type() == input.scalar_type() && residual->device() == input.device(),
      "torch_bn: residual must have the input's dtype and device, got ", residual->scalar_type(), " on ",
      residual->device());
  return with_layout_of(*residual, x);
}

} // namespace torch_bn
