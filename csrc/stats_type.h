// The dtype of the per-channel batch statistics (mean, invstd) that the forward ops return and
// the backward ops take.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace torch_bn {

// float64 on the CPU, where the kernels compute the statistics in double: rounded to float32,
// the mean of x = 1e4 + 1e-2·N(0, 1) moved x - mean by up to 5e-4, a twentieth of a standard
// deviation (grad_weight 4% off a float64 reference), and invstd lost the running variance
// where it is small next to eps (28% off at a standard deviation of 1e-6 and eps 1e-5). On CUDA
// the kernels keep statistics in the accumulation type: float32, float64 for float64 input.
inline at::ScalarType stats_type(const at::Tensor& input) {
  return input.is_cpu() ? at::kDouble : at::toOpMathType(input.scalar_type());
}

} // namespace torch_bn
