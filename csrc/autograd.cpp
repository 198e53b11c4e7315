// Autograd of the torch_bn operators, for every backend. Registered in C++ rather than with
// torch.library.register_autograd: a Python autograd kernel runs on every call, gradient or not,
// and that round trip through Python cost 15-40 µs per call on the CPU, more than the kernel of
// a small layer. Here a call that can need no gradient goes straight to the backend kernel.
#include "checks.h"
#include "cpu/channel_values.h"
#include "find_op.h"
#include "formulas.h"
#include "stats_type.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace torch_bn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;

// The ops as called from here. The *_kernel calls skip the Autograd key (this file is that
// key's kernels) and run the backend's; the *_dispatch calls go through the whole dispatcher, so
// that under create_graph=True the backward op records its own gradient.

std::tuple<Tensor, Tensor, Tensor> forward_train_kernel(const Tensor& input, const OptionalTensor& weight,
                                                        const OptionalTensor& bias, double eps) {
  static const auto op = find_op<decltype(forward_train_kernel)>("torch_bn::forward_train");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, eps);
}

Tensor forward_eval_kernel(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const Tensor& running_mean, const Tensor& running_var, double eps) {
  static const auto op = find_op<decltype(forward_eval_kernel)>("torch_bn::forward_eval");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, running_mean, running_var, eps);
}

std::tuple<Tensor, Tensor, Tensor> backward_dispatch(const Tensor& grad_output, const Tensor& input,
                                                     const OptionalTensor& weight, const Tensor& mean,
                                                     const Tensor& invstd, bool training,
                                                     std::array<bool, 3> output_mask) {
  static const auto op = find_op<decltype(backward_dispatch)>("torch_bn::backward");
  return op.call(grad_output, input, weight, mean, invstd, training, output_mask);
}

std::tuple<Tensor, Tensor, Tensor> backward_kernel(const Tensor& grad_output, const Tensor& input,
                                                   const OptionalTensor& weight, const Tensor& mean,
                                                   const Tensor& invstd, bool training,
                                                   std::array<bool, 3> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return backward_dispatch(grad_output, input, weight, mean, invstd, training, output_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train_act_kernel(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& residual,
    double eps, c10::string_view activation, double negative_slope) {
  static const auto op = find_op<decltype(forward_train_act_kernel)>("torch_bn::forward_train_act");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, residual, eps, activation, negative_slope);
}

std::tuple<Tensor, Tensor> forward_eval_act_kernel(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& running_mean,
    const Tensor& running_var, const OptionalTensor& residual, double eps, c10::string_view activation,
    double negative_slope) {
  static const auto op = find_op<decltype(forward_eval_act_kernel)>("torch_bn::forward_eval_act");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, running_mean, running_var, residual, eps, activation, negative_slope);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_act_kernel(
    const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
    const Tensor& invstd, const Tensor& mask, bool training, c10::string_view activation, double negative_slope,
    std::array<bool, 4> output_mask) {
  static const auto op = find_op<decltype(backward_act_kernel)>("torch_bn::backward_act");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_output, input, weight, mean, invstd, mask, training, activation, negative_slope, output_mask);
}

OptionalTensor optional(const Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// Whether an argument carries a forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp).
// torch's C++ Functions have no jvp, and the kernel alone would drop the tangent, a silent zero.
bool has_tangent(const Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

bool has_tangent(const OptionalTensor& t) {
  return t.has_value() && has_tangent(*t);
}

template <typename... Args>
bool any_tangent(const Args&... args) {
  return (has_tangent(args) || ...);
}

// Whether a call runs the ops' formulas in ATen ops (formulas.h), which propagate tangents and
// which torch.func transforms like any other ops: where an argument carries a tangent, or inside
// a torch.func transform (grad, vjp, jacrev), whose wrapped tensors torch's C++ Functions refuse.
// While a transform's layer is on functorch's stack, its back-mode key stays in the thread's
// included dispatch keys (functorch's setDynamicLayerFrontBackKeysIncluded). Under vmap alone
// this kernel is not reached: the Batched key's fallback runs the kernels sample by sample.
template <typename... Args>
bool needs_formula(const Args&... args) {
  return any_tangent(args...) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// The fused ops have no formula: their sign mask is an output that ATen ops do not produce.
void check_no_tangent(bool tangent) {
  TORCH_CHECK_NOT_IMPLEMENTED(!tangent,
                              "torch_bn: the fused BatchNorm-activation ops do not support forward-mode AD "
                              "(torch.func.jvp, torch.autograd.forward_ad); the plain BatchNorm layers do");
}

// What every forward sets on its node.
// - An absent optional tensor is not an input of a Function's node (it has no edge), so the
//   indices of needs_input_grad skip it. Forwards record which of their tensor arguments were
//   given; needs_input_grad(ctx) then answers per argument, in argument order.
// - Gradients of the outputs nobody differentiated (the statistics, the mask) stay undefined
//   rather than being materialized as zeros: the backward never reads them, and two zero
//   tensors cost as much as the rest of a small layer's backward node.
void set_up_node(AutogradContext* ctx, std::vector<bool> tensor_args_given) {
  ctx->saved_data["given"] = std::move(tensor_args_given);
  ctx->set_materialize_grads(false);
}

std::vector<bool> needs_input_grad(AutogradContext* ctx) {
  std::vector<bool> needs;
  size_t edge = 0;
  for (const bool is_given : ctx->saved_data["given"].toBoolList()) {
    needs.push_back(is_given && ctx->needs_input_grad(edge++));
  }
  return needs;
}

// (mean, invstd) that backward takes in evaluation: a copy of the running mean (a later in-place
// update of the buffer must not change a saved tensor) and 1/sqrt(running_var + eps). CPU
// tensors go through a loop over channels, in double as torch's evaluation backward computes
// invstd: the four ATen ops' dispatch cost more than a small layer's evaluation kernel.
std::pair<Tensor, Tensor> eval_statistics(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                                          double eps) {
  const auto dtype = stats_type(input);
  if (cpu::readable_outside_kernels(running_mean) && cpu::readable_outside_kernels(running_var)) {
    auto invstds = cpu::channel_values(running_var);
    for (auto& value : invstds) {
      value = 1.0 / std::sqrt(value + eps);
    }
    return {cpu::to_tensor(cpu::channel_values(running_mean), dtype), cpu::to_tensor(invstds, dtype)};
  }
  return {running_mean.to(dtype, /*non_blocking=*/false, /*copy=*/true),
          at::rsqrt(running_var.to(dtype, /*non_blocking=*/false, /*copy=*/true).add_(eps))};
}

// The gradients for (input, weight, bias), the first three tensor arguments, from the saved
// (input, weight, mean, invstd), through the backward op; undefined where not needed. Under
// create_graph=True in training they are built by training_backward_formula instead: the backward
// op's own gradient takes the saved statistics as constants, which in training they are not.
variable_list batch_norm_gradients(AutogradContext* ctx, const Tensor& grad_output, bool training) {
  const auto saved = ctx->get_saved_variables();
  const auto needs = needs_input_grad(ctx);
  const std::array<bool, 3> mask{needs[0], needs[1], needs[2]};
  if (!grad_output.defined() || (!mask[0] && !mask[1] && !mask[2])) {
    return {Tensor(), Tensor(), Tensor()};
  }
  auto [grad_input, grad_weight, grad_bias] =
      training && at::GradMode::is_enabled()
      ? training_backward_formula(grad_output, saved[0], optional(saved[1]), ctx->saved_data["eps"].toDouble())
      : backward_dispatch(grad_output, saved[0], optional(saved[1]), saved[2], saved[3], training, mask);
  return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor()};
}

// Gradients computed under create_graph=True that cannot be differentiated again, as with
// torch's @once_differentiable: they carry a node that raises if a later backward reaches it.
variable_list once_differentiable(variable_list grads) {
  if (!at::GradMode::is_enabled()) {
    return grads;
  }
  for (auto& grad : grads) {
    if (grad.defined()) {
      grad = grad.detach().requires_grad_(true);
    }
  }
  const auto error = std::make_shared<torch::autograd::DelayedError>(
      "torch_bn: the fused BatchNorm-activation ops cannot be differentiated twice", grads.size());
  return (*error)(std::move(grads));
}

// As batch_norm_gradients for the fused ops, from the saved (input, weight, mean, invstd, mask),
// plus the residual's gradient; `residual_arg` is the residual's index among the tensor arguments.
variable_list batch_norm_act_gradients(AutogradContext* ctx, const Tensor& grad_output, bool training,
                                       size_t residual_arg) {
  const auto saved = ctx->get_saved_variables();
  const auto needs = needs_input_grad(ctx);
  const std::array<bool, 4> mask{needs[0], needs[1], needs[2], needs[residual_arg]};
  if (!grad_output.defined() || (!mask[0] && !mask[1] && !mask[2] && !mask[3])) {
    return {Tensor(), Tensor(), Tensor(), Tensor()};
  }
  auto [grad_input, grad_weight, grad_bias, grad_residual] = backward_act_kernel(
      grad_output, saved[0], optional(saved[1]), saved[2], saved[3], saved[4], training,
      ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble(), mask);
  return once_differentiable({mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(),
                              mask[2] ? grad_bias : Tensor(), mask[3] ? grad_residual : Tensor()});
}

class ForwardTrain : public torch::autograd::Function<ForwardTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, double eps) {
    auto [output, mean, invstd] = forward_train_kernel(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    set_up_node(ctx, {true, given(weight), given(bias)});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, invstd});
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto result = batch_norm_gradients(ctx, grads[0], /*training=*/true);
    result.emplace_back();  // eps
    return result;
  }
};

class ForwardEval : public torch::autograd::Function<ForwardEval> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const Tensor& running_mean, const Tensor& running_var,
                               double eps) {
    Tensor output = forward_eval_kernel(input, weight, bias, running_mean, running_var, eps);
    auto [mean, invstd] = eval_statistics(input, running_mean, running_var, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd});
    set_up_node(ctx, {true, given(weight), given(bias), true, true});
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto result = batch_norm_gradients(ctx, grads[0], /*training=*/false);
    result.resize(6);  // running_mean, running_var, eps
    return result;
  }
};

// The backward op's own gradient (double backward): backward_formula differentiated at the
// saved inputs.
class Backward : public torch::autograd::Function<Backward> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input,
                               const OptionalTensor& weight, const Tensor& mean, const Tensor& invstd, bool training,
                               std::array<bool, 3> output_mask) {
    auto [grad_input, grad_weight, grad_bias] =
        backward_kernel(grad_output, input, weight, mean, invstd, training, output_mask);
    ctx->save_for_backward({grad_output, input, weight.value_or(Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["output_mask"] = std::vector<bool>(output_mask.begin(), output_mask.end());
    return {grad_input, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list output_grads) {
    const auto saved = ctx->get_saved_variables();
    const auto output_mask = ctx->saved_data["output_mask"].toBoolList();
    at::AutoGradMode enable_grad(true);
    variable_list leaves;
    for (const auto& t : saved) {
      leaves.push_back(t.defined() ? t.detach().requires_grad_(true) : Tensor());
    }
    const auto [grad_input, grad_weight, grad_bias] = backward_formula(
        leaves[0], leaves[1], optional(leaves[2]), leaves[3], leaves[4], ctx->saved_data["training"].toBool());
    const std::array<Tensor, 3> outputs{grad_input, leaves[2].defined() ? grad_weight : Tensor(), grad_bias};
    variable_list wanted_outputs, wanted_grads, wrt;
    for (const auto i : c10::irange(outputs.size())) {
      if (output_mask[i] && outputs[i].defined() && output_grads[i].defined()) {
        wanted_outputs.push_back(outputs[i]);
        wanted_grads.push_back(output_grads[i]);
      }
    }
    for (const auto& leaf : leaves) {
      if (leaf.defined()) {
        wrt.push_back(leaf);
      }
    }
    variable_list grads = wanted_outputs.empty()
        ? variable_list(wrt.size())
        : torch::autograd::grad(wanted_outputs, wrt, wanted_grads, /*retain_graph=*/std::nullopt,
                                /*create_graph=*/false, /*allow_unused=*/true);
    variable_list result;
    auto next = grads.begin();
    for (const auto& leaf : leaves) {
      result.push_back(leaf.defined() ? *next++ : Tensor());
    }
    result.resize(7);  // training, output_mask
    return result;
  }
};

class ForwardTrainAct : public torch::autograd::Function<ForwardTrainAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& residual, double eps,
                               c10::string_view activation, double negative_slope) {
    auto [output, mean, invstd, mask] =
        forward_train_act_kernel(input, weight, bias, residual, eps, activation,
                                 negative_slope);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd, mask});
    set_up_node(ctx, {true, given(weight), given(bias), given(residual)});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->mark_non_differentiable({mean, invstd, mask});
    return {output, mean, invstd, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto result = batch_norm_act_gradients(ctx, grads[0], /*training=*/true, /*residual_arg=*/3);
    result.resize(7);  // eps, activation, negative_slope
    return result;
  }
};

class ForwardEvalAct : public torch::autograd::Function<ForwardEvalAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const Tensor& running_mean, const Tensor& running_var,
                               const OptionalTensor& residual, double eps, c10::string_view activation,
                               double negative_slope) {
    auto [output, mask] = forward_eval_act_kernel(input, weight, bias, running_mean, running_var,
                                                  residual, eps, activation, negative_slope);
    auto [mean, invstd] = eval_statistics(input, running_mean, running_var, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, invstd, mask});
    set_up_node(ctx, {true, given(weight), given(bias), true, true, given(residual)});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->mark_non_differentiable({mask});
    return {output, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto act_grads = batch_norm_act_gradients(ctx, grads[0], /*training=*/false, /*residual_arg=*/5);
    variable_list result(9);  // ... running_mean, running_var, residual, eps, activation, negative_slope
    result[0] = act_grads[0];
    result[1] = act_grads[1];
    result[2] = act_grads[2];
    result[5] = act_grads[3];
    return result;
  }
};

// The Autograd kernels: the Function where a gradient can be asked for, else the kernel alone
// (no graph node, and in evaluation no statistics saved for a backward that cannot come).

std::tuple<Tensor, Tensor, Tensor> forward_train_autograd(const Tensor& input, const OptionalTensor& weight,
                                                          const OptionalTensor& bias, double eps) {
  if (needs_formula(input, weight, bias)) {
    return forward_train_formula(input, weight, bias, eps);
  }
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    return forward_train_kernel(input, weight, bias, eps);
  }
  const auto out = ForwardTrain::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor forward_eval_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const Tensor& running_mean, const Tensor& running_var, double eps) {
  if (needs_formula(input, weight, bias, running_mean, running_var)) {
    return forward_eval_formula(input, weight, bias, running_mean, running_var, eps);
  }
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    return forward_eval_kernel(input, weight, bias, running_mean, running_var, eps);
  }
  return ForwardEval::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

std::tuple<Tensor, Tensor, Tensor> backward_autograd(const Tensor& grad_output, const Tensor& input,
                                                     const OptionalTensor& weight, const Tensor& mean,
                                                     const Tensor& invstd, bool training,
                                                     std::array<bool, 3> output_mask) {
  if (needs_formula(grad_output, input, weight, mean, invstd)) {
    auto grads = backward_formula(grad_output, input, weight, mean, invstd, training);
    // An output not asked for is empty, as the kernels return it.
    const auto asked = [&](bool wanted, const Tensor& grad) { return wanted ? grad : grad.new_empty({0}); };
    return {asked(output_mask[0], std::get<0>(grads)), asked(output_mask[1], std::get<1>(grads)),
            asked(output_mask[2], std::get<2>(grads))};
  }
  if (!torch::autograd::compute_requires_grad(grad_output, input, weight, mean, invstd)) {
    return backward_kernel(grad_output, input, weight, mean, invstd, training, output_mask);
  }
  const auto out = Backward::apply(grad_output, input, weight, mean, invstd, training, output_mask);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train_act_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& residual,
    double eps, c10::string_view activation, double negative_slope) {
  check_no_tangent(any_tangent(input, weight, bias, residual));
  if (!torch::autograd::compute_requires_grad(input, weight, bias, residual)) {
    return forward_train_act_kernel(input, weight, bias, residual, eps, activation, negative_slope);
  }
  const auto out = ForwardTrainAct::apply(input, weight, bias, residual, eps,
                                          activation, negative_slope);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor> forward_eval_act_autograd(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& running_mean,
    const Tensor& running_var, const OptionalTensor& residual, double eps, c10::string_view activation,
    double negative_slope) {
  check_no_tangent(any_tangent(input, weight, bias, running_mean, running_var, residual));
  if (!torch::autograd::compute_requires_grad(input, weight, bias, residual)) {
    return forward_eval_act_kernel(input, weight, bias, running_mean, running_var, residual, eps, activation,
                                   negative_slope);
  }
  const auto out = ForwardEvalAct::apply(input, weight, bias, running_mean, running_var,
                                         residual, eps, activation, negative_slope);
  return {out[0], out[1]};
}

} // namespace

TORCH_LIBRARY_IMPL(torch_bn, Autograd, m) {
  m.impl("forward_train", &forward_train_autograd);
  m.impl("forward_eval", &forward_eval_autograd);
  m.impl("backward", &backward_autograd);
  m.impl("forward_train_act", &forward_train_act_autograd);
  m.impl("forward_eval_act", &forward_eval_act_autograd);
}

} // namespace torch_bn
