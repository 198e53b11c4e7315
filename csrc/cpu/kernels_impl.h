// The CPU kernels for both layouts, included once per CPU capability by kernels_*.cpp after
// that file has set CPU_CAPABILITY.
//
// Numerics: forward statistics come from one pass over memory, Σd and Σd² of d = x - shift with
// a shift near the mean, where the cancellation in Σd² - (Σd)²/n costs at most a bit; elsewhere
// from a second pass around the mean the first found, which also corrects that mean (see
// OnePassMoments, planar_moments, forward_train_rows). Sums run in the accumulation type over
// chunks of at most kChunk values and in double across chunks, so neither a large mean nor a
// long reduction costs precision. The pieces a value is summed in depend on the shape alone,
// never on the thread count (threads only decide which task handles a piece), and partial
// results are combined in a fixed order: the same input gives bitwise the same output on every
// run and with any number of threads.
//
// This file holds the entry points. The passes live in forward_train_pass.h, normalize_pass.h
// and backward_pass.h; the plans they cut their work by, in planar_plan.h and row_plan.h; their
// vectorized loops, in reductions.h, normalize_loops.h and grad_input_loops.h.
#pragma once
#include "../activation.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>

#include <cmath>
#include <vector>

// The pieces, in the order they build on each other: the loops, then the passes. It is also the
// order of their definitions before they were split into these files, and it matters beyond
// compiling: included in another order (each piece after its own includes), GCC compiled some
// of the NCHW write pass's functions differently in the AVX2 and AVX-512 builds. In this order
// the kernel objects disassemble as before the split.
#include "vector_loads.h"
#include "run_stores.h"
#include "run_sources.h"
#include "statistics_terms.h"
#include "fetch_ahead.h"
#include "reductions.h"
#include "grad_input_loops.h"
#include "fused_activation.h"
#include "normalize_loops.h"
#include "work_units.h"
#include "cache_policy.h"
#include "moments.h"
#include "planar_plan.h"
#include "channel_affine.h"
#include "row_plan.h"
#include "normalize_pass.h"
#include "forward_train_pass.h"
#include "backward_pass.h"

// The dtypes this build's entry points take: all floating types, or half and bfloat16 alone for
// a build that cpu_capability_for() picks only for those (TORCH_BN_REDUCED_PRECISION_ONLY).
#if defined(TORCH_BN_REDUCED_PRECISION_ONLY)
#define TORCH_BN_DISPATCH_DTYPES(TYPE, NAME, ...) AT_DISPATCH_REDUCED_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)
#else
#define TORCH_BN_DISPATCH_DTYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#endif

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

void forward_train(const at::Tensor& input, const at::Tensor& output, const Shape& shape, const double* weight,
                   const double* bias, double eps, const Epilogue& epilogue, double* mean, double* invstd) {
  TORCH_BN_DISPATCH_DTYPES(input.scalar_type(), "torch_bn_forward_train", [&] {
    const auto* x = input.const_data_ptr<scalar_t>();
    auto* y = output.mutable_data_ptr<scalar_t>();
    if (shape.rows) {
      forward_train_rows(x, y, shape, weight, bias, eps, epilogue, mean, invstd);
    } else {
      forward_train_planar(x, y, shape, weight, bias, eps, epilogue, mean, invstd);
    }
  });
}

namespace {
// y = act((x - mean) * scale + shift + residual) (a null mean or shift reads as zeros).
void normalize(const at::Tensor& input, const at::Tensor& output, const Shape& shape, const double* mean,
               const double* scale, const double* shift, const Epilogue& epilogue) {
  TORCH_BN_DISPATCH_DTYPES(input.scalar_type(), "torch_bn_normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t group_rows = shape.rows ? RowPlan(shape).group_rows : 1;
    normalize_impl(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), shape,
                   ChannelAffine<acc_t>(shape.channels, group_rows, mean, scale, shift), epilogue);
  });
}
} // namespace

// The scales are computed here rather than where the operator reads its arguments: this build
// divides and takes square roots a vector at a time, where the portable one (which compiles
// ops.cpp) takes two lanes at a time, 3.3 µs of the evaluation operator's 15 µs at 1x2048x1x1
// float32 against 1.4 µs here (one thread, AMD EPYC Zen 4 VM, perf).
void evaluate(const at::Tensor& input, const at::Tensor& output, const Shape& shape, const double* mean,
              const double* var, const double* weight, const double* bias, double eps, const Epilogue& epilogue) {
  std::vector<double> scale(shape.channels);
  for (const auto c : c10::irange(shape.channels)) {
    scale[c] = (weight ? weight[c] : 1.0) / std::sqrt(var[c] + eps);
  }
  normalize(input, output, shape, mean, scale.data(), bias, epilogue);
}

void backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grad_input,
              const Shape& shape, const double* mean, const double* invstd, const double* weight, bool training,
              const GradPrologue& prologue, double* sum_dy, double* sum_dy_xmu) {
  const bool plain_grad = prologue.mask == nullptr && prologue.grad_residual == nullptr;
  if (!training && plain_grad && sum_dy == nullptr) {
    // Eval with dx alone: dx = dy * weight * invstd reads neither x nor a mask.
    const auto scale = scale_by_invstd(shape, weight, invstd);
    normalize(grad_output, grad_input, shape, nullptr, scale.data(), nullptr, Epilogue{});
    return;
  }
  // The per-channel sums are needed for dx in training; otherwise they may not be asked for.
  std::vector<double> unused_sums;
  if (sum_dy == nullptr) {
    unused_sums.assign(2 * shape.channels, 0.0);
    sum_dy = unused_sums.data();
    sum_dy_xmu = unused_sums.data() + shape.channels;
  }
  TORCH_BN_DISPATCH_DTYPES(input.scalar_type(), "torch_bn_backward", [&] {
    const auto* dy = grad_output.const_data_ptr<scalar_t>();
    const auto* x = input.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.defined() ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    if (shape.rows) {
      backward_rows(dy, x, dx, shape, mean, invstd, weight, training, prologue, sum_dy, sum_dy_xmu);
    } else {
      backward_planar(dy, x, dx, shape, mean, invstd, weight, training, prologue, sum_dy, sum_dy_xmu);
    }
  });
}

void read_channel_values(const at::Tensor& values, double* out) {
  TORCH_BN_DISPATCH_DTYPES(values.scalar_type(), "torch_bn_read_channel_values", [&] {
    for_each_as_double(values.const_data_ptr<scalar_t>(), values.numel(), [&](int64_t c, double value) {
      out[c] = value;
    });
  });
}

void write_channel_values(const at::Tensor& values, const double* in) {
  TORCH_BN_DISPATCH_DTYPES(values.scalar_type(), "torch_bn_write_channel_values", [&] {
    auto* data = values.mutable_data_ptr<scalar_t>();
    for (const auto c : c10::irange(values.numel())) {
      data[c] = static_cast<scalar_t>(in[c]);
    }
  });
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
