// CPU implementations of the torch_bn operators: argument checks, layout and allocation here;
// the loops behind kernels.h, in kernels_impl.h and the headers it includes.
#include "../activation.h"
#include "../layout.h"
#include "../op_checks.h"
#include "../plain_ops.h"
#include "../running_stats.h"
#include "../stats_type.h"
#include "channel_values.h"
#include "kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

namespace torch_bn {

namespace cpu {
namespace {
CpuCapability detect_cpu_capability() {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string requested = cap ? cap : "";
  if (avx512 && requested != "avx2" && requested != "default") {
    return CpuCapability::AVX512;
  }
  if (avx2 && requested != "default") {
    return CpuCapability::AVX2;
  }
#endif
  return CpuCapability::DEFAULT;
}
} // namespace

CpuCapability cpu_capability_for(at::ScalarType dtype) {
  static const CpuCapability best = detect_cpu_capability();
  const bool reduced_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  return best == CpuCapability::AVX512 && !reduced_precision ? CpuCapability::AVX2 : best;
}
} // namespace cpu

namespace {

using cpu::channel_values;
using cpu::to_tensor;

const double* data_or_null(const std::vector<double>& v) {
  return v.empty() ? nullptr : v.data();
}

// Zero-filled for an activation that keeps a sign mask (the kernels OR its bits in); otherwise
// empty, since even zeroing no bytes is one op dispatch more per call.
at::Tensor new_mask(const at::Tensor& x, const ActivationSpec& activation) {
  const auto options = x.options().dtype(at::kByte);
  return activation.has_mask() ? at::zeros({mask_bytes(x.numel())}, options) : at::empty({0}, options);
}

Epilogue epilogue_of(const at::Tensor& residual, const at::Tensor& mask, const ActivationSpec& activation) {
  return {residual.defined() ? residual.const_data_ptr() : nullptr,
          activation.has_mask() ? mask.mutable_data_ptr<uint8_t>() : nullptr, activation.slope()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train_act(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    double eps,
    c10::string_view activation_name,
    double negative_slope) {
  check_forward_train_args(input, weight, bias, eps);
  const auto activation = ActivationSpec::parse(activation_name, negative_slope);
  const auto [x, shape] = kernel_input(input);
  const at::Tensor r = kernel_residual(input, x, residual);
  at::Tensor output = at::empty_like(x);
  at::Tensor mask = new_mask(x, activation);
  // An empty batch has no statistics; report those of an all-zero channel.
  std::vector<double> mean(shape.channels, 0.0), invstd(shape.channels, 1.0 / std::sqrt(eps));
  if (x.numel() > 0) {
    const auto w = channel_values(weight);
    const auto b = channel_values(bias);
    TORCH_BN_CPU_DISPATCH(forward_train, x, output, shape, data_or_null(w), data_or_null(b), eps,
                          epilogue_of(r, mask, activation), mean.data(), invstd.data());
  }
  return {output, to_tensor(mean, stats_type(input)), to_tensor(invstd, stats_type(input)), mask};
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
  const auto activation = ActivationSpec::parse(activation_name, negative_slope);
  const auto [x, shape] = kernel_input(input);
  const at::Tensor r = kernel_residual(input, x, residual);
  at::Tensor output = at::empty_like(x);
  at::Tensor mask = new_mask(x, activation);
  if (x.numel() > 0) {
    const auto mean = channel_values(running_mean);
    const auto var = channel_values(running_var);
    TORCH_BN_CPU_DISPATCH(evaluate, x, output, shape, mean.data(), var.data(), data_or_null(channel_values(weight)),
                          data_or_null(channel_values(bias)), eps, epilogue_of(r, mask, activation));
  }
  return {output, mask};
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
  const auto [x, shape] = kernel_input(input);
  const at::Tensor dy = with_layout_of(grad_output, x);
  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_residual = output_mask[3] ? at::empty_like(x) : at::Tensor();
  const bool need_sums = (training && output_mask[0]) || output_mask[1] || output_mask[2];
  std::vector<double> sum_dy(shape.channels, 0.0), sum_dy_xmu(shape.channels, 0.0);
  const auto mean_values = channel_values(mean);
  const auto invstd_values = channel_values(invstd);
  if (x.numel() > 0 && (need_sums || output_mask[0] || output_mask[3])) {
    const auto w = channel_values(weight);
    const GradPrologue prologue{activation.has_mask() ? mask.const_data_ptr<uint8_t>() : nullptr, activation.slope(),
                                grad_residual.defined() ? grad_residual.mutable_data_ptr() : nullptr};
    TORCH_BN_CPU_DISPATCH(backward, dy, x, grad_input, shape, mean_values.data(), invstd_values.data(),
                          data_or_null(w), training, prologue, need_sums ? sum_dy.data() : nullptr,
                          need_sums ? sum_dy_xmu.data() : nullptr);
  }
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  const auto empty = [&](at::ScalarType dtype) { return at::empty({0}, input.options().dtype(dtype)); };
  const auto grad_weight_of = [&] {
    // dweight = Σ dz·xhat = invstd · Σ dz·(x - mean)
    std::vector<double> dw(shape.channels);
    for (const auto c : c10::irange(shape.channels)) {
      dw[c] = invstd_values[c] * sum_dy_xmu[c];
    }
    return to_tensor(dw, param_type);
  };
  return {grad_input.defined() ? grad_input : empty(input.scalar_type()),
          output_mask[1] ? grad_weight_of() : empty(param_type),
          output_mask[2] ? to_tensor(sum_dy, param_type) : empty(param_type),
          grad_residual.defined() ? grad_residual : empty(input.scalar_type())};
}

} // namespace

TORCH_LIBRARY_IMPL(torch_bn, CPU, m) {
  impl_plain_ops<&forward_train_act, &forward_eval_act, &backward_act>(m);
  m.impl("forward_train_act", &forward_train_act);
  m.impl("forward_eval_act", &forward_eval_act);
  m.impl("backward_act", &backward_act);
  m.impl("update_running_stats", &update_running_stats);
}

} // namespace torch_bn
