// Plain BatchNorm is the fused operator with no residual and the identity activation. Every
// backend registers forward_train, forward_eval and backward through this, from its fused ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace torch_bn {

template <auto forward_train_act, auto forward_eval_act, auto backward_act>
void impl_plain_ops(torch::Library& m) {
  m.impl(
      "forward_train",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         double eps) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
        auto [output, mean, invstd, mask] = forward_train_act(input, weight, bias, std::nullopt, eps, "identity", 0.0);
        return {output, mean, invstd};
      });
  m.impl(
      "forward_eval",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         const at::Tensor& running_mean, const at::Tensor& running_var, double eps) -> at::Tensor {
        return std::get<0>(
            forward_eval_act(input, weight, bias, running_mean, running_var, std::nullopt, eps, "identity", 0.0));
      });
  m.impl(
      "backward",
      [](const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
         const at::Tensor& mean, const at::Tensor& invstd, bool training,
         std::array<bool, 3> output_mask) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
        auto [grad_input, grad_weight, grad_bias, grad_residual] =
            backward_act(grad_output, input, weight, mean, invstd, at::Tensor(), training, "identity", 0.0,
                         {output_mask[0], output_mask[1], output_mask[2], false});
        return {grad_input, grad_weight, grad_bias};
      });
}

} // namespace torch_bn
