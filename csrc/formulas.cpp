#include "formulas.h"

#include "checks.h"
#include "stats_type.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

namespace torch_bn {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// Every dimension but the channels': what the statistics reduce over.
std::vector<int64_t> reduction_dims(const Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) {
    dims.push_back(d);
  }
  return dims;
}

// A per-channel tensor viewed to broadcast against the input, in the accumulation type.
Tensor per_channel(const Tensor& values, const Tensor& input) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = -1;
  return values.to(at::toOpMathType(input.scalar_type())).view(shape);
}

// (input - mean)·invstd·weight + bias, in the input's dtype.
Tensor normalize_formula(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const Tensor& mean, const Tensor& invstd) {
  Tensor output = (input.to(at::toOpMathType(input.scalar_type())) - per_channel(mean, input)) *
      per_channel(invstd, input);
  if (given(weight)) {
    output = output * per_channel(*weight, input);
  }
  if (given(bias)) {
    output = output + per_channel(*bias, input);
  }
  return output.to(input.scalar_type());
}

// The biased batch statistics, in the accumulation type and differentiable.
std::pair<Tensor, Tensor> batch_statistics(const Tensor& input, double eps) {
  const auto dims = reduction_dims(input);
  const Tensor x = input.to(at::toOpMathType(input.scalar_type()));
  return {x.mean(dims), at::rsqrt(x.var(dims, /*unbiased=*/false) + eps)};
}

} // namespace

std::tuple<Tensor, Tensor, Tensor> forward_train_formula(const Tensor& input, const OptionalTensor& weight,
                                                         const OptionalTensor& bias, double eps) {
  const auto [mean, invstd] = batch_statistics(input, eps);
  return {normalize_formula(input, weight, bias, mean, invstd), mean.detach().to(stats_type(input)),
          invstd.detach().to(stats_type(input))};
}

Tensor forward_eval_formula(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                            const Tensor& running_mean, const Tensor& running_var, double eps) {
  return normalize_formula(input, weight, bias, running_mean, at::rsqrt(per_channel(running_var, input) + eps));
}

std::tuple<Tensor, Tensor, Tensor> backward_formula(const Tensor& grad_output, const Tensor& input,
                                                    const OptionalTensor& weight, const Tensor& mean,
                                                    const Tensor& invstd, bool training) {
  const auto dims = reduction_dims(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  const bool has_weight = given(weight);
  const Tensor dy = grad_output.to(acc);
  const Tensor inv = per_channel(invstd, input);
  const Tensor xhat = (input.to(acc) - per_channel(mean, input)) * inv;
  const Tensor scale = has_weight ? inv * per_channel(*weight, input) : inv;
  const Tensor grad_input = training
      ? scale * (dy - dy.mean(dims, /*keepdim=*/true) - xhat * (dy * xhat).mean(dims, /*keepdim=*/true))
      : dy * scale;
  const auto param_type = has_weight ? weight->scalar_type() : input.scalar_type();
  return {grad_input.to(input.scalar_type()), (dy * xhat).sum(dims).to(param_type), dy.sum(dims).to(param_type)};
}

std::tuple<Tensor, Tensor, Tensor> training_backward_formula(const Tensor& grad_output, const Tensor& input,
                                                             const OptionalTensor& weight, double eps) {
  const auto [mean, invstd] = batch_statistics(input, eps);
  return backward_formula(grad_output, input, weight, mean, invstd, /*training=*/true);
}

TORCH_LIBRARY_IMPL(torch_bn, CompositeImplicitAutograd, m) {
  m.impl("backward_formula", &backward_formula);
  m.impl("training_backward_formula", &training_backward_formula);
}

} // namespace torch_bn
