// The CPU kernels' entry points, built once per CPU capability (kernels_default.cpp,
// kernels_avx2.cpp) and picked at run time by `dispatch`.
#pragma once
#include "../layout.h"

#include <ATen/core/Tensor.h>

namespace torch_bn::cpu {

// Per-channel arrays are double: they are O(C) and carry the statistics at full precision
// between the kernels.
#define TORCH_BN_DECLARE_CPU_KERNELS(capability)                                              \
  namespace capability {                                                                      \
  /* Batch mean and biased variance of every channel, then y = (x-mean)*invstd*w + b. */     \
  void forward_train(                                                                         \
      const at::Tensor& input, const at::Tensor& output, const Shape& shape,                  \
      const double* weight, const double* bias, double eps, double* mean, double* invstd);    \
  /* y = (x - mean) * scale + shift with given per-channel mean, scale and shift. */          \
  void normalize(                                                                             \
      const at::Tensor& input, const at::Tensor& output, const Shape& shape,                  \
      const double* mean, const double* scale, const double* shift);                          \
  /* Per-channel Σdy and Σdy(x-mean) into sum_dy/sum_dy_xmu when they are non-null, and the  \
     input gradient when grad_input is defined. */                                            \
  void backward(                                                                              \
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grad_input,   \
      const Shape& shape, const double* mean, const double* invstd, const double* weight,     \
      bool training, double* sum_dy, double* sum_dy_xmu);                                     \
  }

TORCH_BN_DECLARE_CPU_KERNELS(DEFAULT)
TORCH_BN_DECLARE_CPU_KERNELS(AVX2)
#undef TORCH_BN_DECLARE_CPU_KERNELS

// Calls the AVX2 build of a kernel when the CPU has AVX2 and FMA, else the portable one.
bool cpu_has_avx2();
#define TORCH_BN_CPU_DISPATCH(kernel, ...)                        \
  (::torch_bn::cpu::cpu_has_avx2() ? ::torch_bn::cpu::AVX2::kernel(__VA_ARGS__) \
                                   : ::torch_bn::cpu::DEFAULT::kernel(__VA_ARGS__))

} // namespace torch_bn::cpu
