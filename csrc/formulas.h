// The ops in differentiable ATen ops: their gradients' gradients, and the calls that the kernels'
// C++ autograd Functions cannot serve: arguments carrying forward-mode tangents
// (torch.autograd.forward_ad, torch.func.jvp), and torch.func's transforms.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_bn {

// torch_bn::forward_train: (output, mean, invstd), the statistics detached (they are not
// differentiable outputs) and of stats_type.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_formula(const at::Tensor& input,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     double eps);

// torch_bn::forward_eval.
at::Tensor forward_eval_formula(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                const at::Tensor& running_var, double eps);

// torch_bn::backward, mean and invstd taken as given (in training the statistics' own dependence
// on the input is the caller's to add). grad_weight is Σ dy·xhat, which needs no weight; it has
// the weight's dtype, or the input's without one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_formula(const at::Tensor& grad_output,
                                                                const at::Tensor& input,
                                                                const std::optional<at::Tensor>& weight,
                                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                                bool training);

// backward_formula in training with the batch statistics recomputed from the input (biased
// variance, as the forward normalizes with), so that a gradient of these gradients includes the
// statistics' dependence on the input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> training_backward_formula(const at::Tensor& grad_output,
                                                                         const at::Tensor& input,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         double eps);

} // namespace torch_bn
