// The CPU kernels' entry points, built once per CPU capability (kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp) and picked at run time by TORCH_BN_CPU_DISPATCH.
#pragma once
#include "../activation.h"
#include "../layout.h"

#include <ATen/core/Tensor.h>

namespace torch_bn::cpu {

// Per-channel arrays are double: they are O(C) and carry the statistics at full precision
// between the kernels.
#define TORCH_BN_DECLARE_CPU_KERNELS(capability)                                              \
  namespace capability {                                                                      \
  /* Batch mean and biased variance of every channel, then                                    \
     y = act((x - mean) * invstd * w + b + residual) as the epilogue asks. */                 \
  void forward_train(                                                                         \
      const at::Tensor& input, const at::Tensor& output, const Shape& shape,                  \
      const double* weight, const double* bias, double eps, const Epilogue& epilogue,         \
      double* mean, double* invstd);                                                          \
  /* y = act((x - mean) / sqrt(var + eps) * weight + bias + residual) with given per-channel  \
     mean and variance (a null weight reads as ones, a null bias as zeros). */                \
  void evaluate(                                                                              \
      const at::Tensor& input, const at::Tensor& output, const Shape& shape,                  \
      const double* mean, const double* var, const double* weight, const double* bias,        \
      double eps, const Epilogue& epilogue);                                                  \
  /* With dz = the prologue's gating of dy: per-channel Σdz and Σdz(x-mean) into              \
     sum_dy/sum_dy_xmu when they are non-null, and the input gradient when grad_input is      \
     defined. */                                                                              \
  void backward(                                                                              \
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grad_input,   \
      const Shape& shape, const double* mean, const double* invstd, const double* weight,     \
      bool training, const GradPrologue& prologue, double* sum_dy, double* sum_dy_xmu);      \
  /* The contiguous per-channel tensor `values` as doubles, and doubles rounded into it,     \
     with this build's conversions (F16C's for half, where the build has them). */             \
  void read_channel_values(const at::Tensor& values, double* out);                            \
  void write_channel_values(const at::Tensor& values, const double* in);                      \
  }

TORCH_BN_DECLARE_CPU_KERNELS(DEFAULT)
TORCH_BN_DECLARE_CPU_KERNELS(AVX2)
TORCH_BN_DECLARE_CPU_KERNELS(AVX512)
#undef TORCH_BN_DECLARE_CPU_KERNELS

enum class CpuCapability { DEFAULT, AVX2, AVX512 };

// The build that runs a kernel on `dtype`: the best the CPU has, capped as torch caps its own
// kernels by the environment variable ATEN_CPU_CAPABILITY ("default", "avx2", "avx512"), read
// once. AVX-512 is for half and bfloat16 alone: float and double loops are bound by memory, and
// there the 512-bit build measured no faster in training and slower in evaluation (float32
// NCHW (32,256,14,14) eval 0.74x of torch against 0.94x with AVX2, 2 threads).
CpuCapability cpu_capability_for(at::ScalarType dtype);

#define TORCH_BN_CPU_DISPATCH(kernel, input, ...)                                                  \
  [&] {                                                                                            \
    switch (::torch_bn::cpu::cpu_capability_for((input).scalar_type())) {                          \
      case ::torch_bn::cpu::CpuCapability::AVX512:                                                 \
        return ::torch_bn::cpu::AVX512::kernel(input, __VA_ARGS__);                                \
      case ::torch_bn::cpu::CpuCapability::AVX2:                                                   \
        return ::torch_bn::cpu::AVX2::kernel(input, __VA_ARGS__);                                  \
      default:                                                                                     \
        return ::torch_bn::cpu::DEFAULT::kernel(input, __VA_ARGS__);                               \
    }                                                                                              \
  }()

} // namespace torch_bn::cpu
