// Backward: per-channel Σdz and Σdz·(x - mean) in one read of dy and x (dz: dy gated by a fused
// activation's mask), merged per channel into grad_weight, grad_bias and the coefficients of the
// training-mode input gradient, which a second read of dy and x then applies.
#include "activation.cuh"
#include "grid.cuh"
#include "kernels.cuh"
#include "partials.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace torch_bn::cuda {
namespace {

enum SumField { kSumDy, kSumDot, kSumFields };

template <typename scalar_t, typename Grid>
__global__ void __launch_bounds__(kThreads) grad_sums_kernel(
    const Grid g, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const ChannelValues mean,
    const DeviceGate<scalar_t> gate, scalar_t* __restrict__ grad_residual, const Partials out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Grid::kVec;
  extern __shared__ __align__(16) unsigned char smem[];
  GradSumLanes<acc_t, V> lanes;
  if (g.active()) {
    acc_t hi[V], lo[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const MeanSplit<acc_t> m = split_mean<acc_t>(mean[g.channel(k)]);
      hi[k] = m.hi;
      lo[k] = m.lo;
    }
    g.for_each_vector([&](int64_t i) {
      acc_t grad[V], centered[V];
      load_vector<V>(dy, i, grad);
      apply_gate<V>(grad, gate, i);
      if (grad_residual != nullptr) {
        store_vector<V>(grad_residual, i, grad);
      }
      load_vector<V>(x, i, centered);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        centered[k] = (centered[k] - hi[k]) - lo[k];
      }
      lanes.add(grad, centered);
    });
  }
  g.reduce(lanes, smem, [&](int /*lane*/, int64_t c, const GradSums<acc_t>& total) {
    out.at(kSumDy, g.split(), c) = static_cast<double>(total.dy);
    out.at(kSumDot, g.split(), c) = static_cast<double>(total.dot);
  });
}

// Sums the splits of each channel in a fixed order and writes what was asked for: grad_weight and
// grad_bias (null data when not) and the input-gradient table (null rows when not).
template <typename acc_t>
__global__ void merge_grad_kernel(
    const Partials p, double count, const ChannelValues mean, const ChannelValues invstd,
    const ChannelValues weight, const ChannelOutput grad_weight, const ChannelOutput grad_bias,
    const GradTable<acc_t> table) {
  const int64_t c = merge_channel();
  if (c >= p.channels) {
    return;  // the whole warp: one channel per warp
  }
  double sum_dy = 0;
  double sum_dot = 0;
  for (int64_t s = threadIdx.x; s < p.splits; s += 32) {
    sum_dy += p.at(kSumDy, s, c);
    sum_dot += p.at(kSumDot, s, c);
  }
  sum_dy = warp_sum(sum_dy);
  sum_dot = warp_sum(sum_dot);
  if (threadIdx.x != 0) {
    return;
  }
  const double inv = invstd[c];
  if (grad_weight.data != nullptr) {
    grad_weight.set(c, inv * sum_dot);
  }
  if (grad_bias.data != nullptr) {
    grad_bias.set(c, sum_dy);
  }
  if (table.hi != nullptr) {
    // dx = dy·k1 - (x - mean)·k2 - k3 with k1 = w·invstd, k2 = k1·invstd²·Σdy(x-mean)/n and
    // k3 = k1·Σdy/n: the formula of the CPU kernels.
    const double k1 = weight.value_or(c, 1.0) * inv;
    const MeanSplit<acc_t> m = split_mean<acc_t>(mean[c]);
    table.hi[c] = m.hi;
    table.lo[c] = m.lo;
    table.k1[c] = static_cast<acc_t>(k1);
    table.k2[c] = static_cast<acc_t>(k1 * inv * inv * sum_dot / count);
    table.k3[c] = static_cast<acc_t>(k1 * sum_dy / count);
  }
}

template <typename scalar_t, typename Grid>
__global__ void __launch_bounds__(kThreads) grad_input_kernel(
    const Grid g, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
    const GradTable<at::opmath_type<scalar_t>> table, const DeviceGate<scalar_t> gate) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Grid::kVec;
  if (!g.active()) {
    return;
  }
  acc_t hi[V], lo[V], k1[V], k2[V], k3[V];
  gather_channels(g, table.hi, hi);
  gather_channels(g, table.lo, lo);
  gather_channels(g, table.k1, k1);
  gather_channels(g, table.k2, k2);
  gather_channels(g, table.k3, k3);
  g.for_each_vector([&](int64_t i) {
    acc_t grad[V], values[V];
    load_vector<V>(dy, i, grad);
    apply_gate<V>(grad, gate, i);
    load_vector<V>(x, i, values);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      values[k] = grad[k] * k1[k] - ((values[k] - hi[k]) - lo[k]) * k2[k] - k3[k];
    }
    store_vector<V>(dx, i, values);
  });
}

ChannelOutput channel_output(const at::Tensor& t) {
  return t.defined() ? ChannelOutput{t.mutable_data_ptr(), t.scalar_type()} : ChannelOutput{};
}

} // namespace

void reduce_grad(
    const at::Tensor& dy, const at::Tensor& x, const Shape& shape, const ChannelInput& mean,
    const ChannelInput& invstd, const ChannelInput& weight, const GradPrologue& prologue,
    const at::Tensor& grad_input, const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_bn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    auto* grad_residual = static_cast<scalar_t*>(prologue.grad_residual);
    const DeviceGate<scalar_t> gate(prologue);
    at::Tensor table;
    GradTable<acc_t> table_view{};
    if (grad_input.defined()) {
      table = at::empty({5, shape.channels}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      table_view = grad_table<acc_t>(table);
    }
    with_grid<scalar_t>(shape, {dy_data, x_data, grad_residual}, [&](const auto& g) {
      using Grid = std::decay_t<decltype(g)>;
      const at::Tensor storage = empty_partials(x, kSumFields, g.splits(), shape.channels);
      const Partials partials = partials_view(storage);
      const size_t smem = Grid::template shared_bytes<GradSumLanes<acc_t, Grid::kVec>>(g.block);
      grad_sums_kernel<scalar_t, Grid><<<g.grid, g.block, smem, stream>>>(
          g, dy_data, x_data, mean.view, gate, grad_residual, partials);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_grad_kernel<acc_t><<<merge_grid(shape.channels), merge_block(), 0, stream>>>(
          partials, static_cast<double>(shape.count()), mean.view, invstd.view, weight.view,
          channel_output(grad_weight), channel_output(grad_bias), table_view);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!grad_input.defined()) {
      return;
    }
    scalar_t* dx_data = grad_input.mutable_data_ptr<scalar_t>();
    with_grid<scalar_t>(shape, {dy_data, x_data, dx_data}, [&](const auto& g) {
      using Grid = std::decay_t<decltype(g)>;
      grad_input_kernel<scalar_t, Grid><<<g.grid, g.block, 0, stream>>>(g, dy_data, x_data, dx_data, table_view, gate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

} // namespace torch_bn::cuda
