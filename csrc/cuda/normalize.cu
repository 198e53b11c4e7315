// The per-channel affine pass, out = ((in - hi) - lo) * scale + shift: the normalize step of both
// forwards (with the fused epilogue) and the evaluation-mode input gradient (in = dy gated by a
// fused activation's mask, hi = lo = shift = 0).
#include "activation.cuh"
#include "grid.cuh"
#include "kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace torch_bn::cuda {
namespace {

template <typename scalar_t, typename Grid>
__global__ void __launch_bounds__(kThreads) affine_kernel(
    const Grid g, const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
    const AffineTable<at::opmath_type<scalar_t>> table, const DeviceGate<scalar_t> gate,
    const DeviceEpilogue<scalar_t> epilogue) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Grid::kVec;
  if (!g.active()) {
    return;
  }
  acc_t hi[V], lo[V], scale[V], shift[V];
  gather_channels(g, table.hi, hi);
  gather_channels(g, table.lo, lo);
  gather_channels(g, table.scale, scale);
  gather_channels(g, table.shift, shift);
  g.for_each_vector([&](int64_t i) {
    acc_t values[V];
    load_vector<V>(in, i, values);
    apply_gate<V>(values, gate, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      values[k] = ((values[k] - hi[k]) - lo[k]) * scale[k] + shift[k];
    }
    apply_epilogue<V>(values, epilogue, i);
    store_vector<V>(out, i, values);
  });
}

template <typename acc_t>
__global__ void affine_coefficients_kernel(
    int64_t channels, const ChannelValues mean, const ChannelValues weight, const ChannelValues bias,
    const ChannelValues spread, Spread spread_kind, double eps, const AffineTable<acc_t> table) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  const double w = weight.value_or(c, 1.0);
  const double scale = spread_kind == Spread::kVariance ? w / ::sqrt(spread[c] + eps) : w * spread[c];
  const MeanSplit<acc_t> m = split_mean<acc_t>(mean.value_or(c, 0.0));
  table.hi[c] = m.hi;
  table.lo[c] = m.lo;
  table.scale[c] = static_cast<acc_t>(scale);
  table.shift[c] = static_cast<acc_t>(bias.value_or(c, 0.0));
}

} // namespace

at::Tensor affine_coefficients(
    at::ScalarType input_dtype, const at::TensorOptions& options, int64_t channels,
    const ChannelInput& mean, const ChannelInput& weight, const ChannelInput& bias,
    const ChannelInput& spread, Spread spread_kind, double eps) {
  const at::ScalarType acc_dtype = at::toOpMathType(input_dtype);
  const at::Tensor table = at::empty({4, channels}, options.dtype(acc_dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int threads = 128;
  const dim3 blocks(static_cast<unsigned>((channels + threads - 1) / threads));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "torch_bn_affine_coefficients_cuda", [&] {
    affine_coefficients_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        channels, mean.view, weight.view, bias.view, spread.view, spread_kind, eps, affine_table<scalar_t>(table));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return table;
}

void affine(
    const at::Tensor& in, const at::Tensor& out, const Shape& shape, const at::Tensor& table,
    const GradPrologue& gate, const Epilogue& epilogue) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "torch_bn_affine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in_data = in.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const auto launch = [&](const auto& g) {
      using Grid = std::decay_t<decltype(g)>;
      affine_kernel<scalar_t, Grid><<<g.grid, g.block, 0, stream>>>(
          g, in_data, out_data, affine_table<acc_t>(table), DeviceGate<scalar_t>(gate), DeviceEpilogue<scalar_t>(epilogue));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const std::initializer_list<const void*> pointers{in_data, out_data, epilogue.residual};
    if (epilogue.mask != nullptr) {
      // Vectors of 8 values own whole bytes of the sign mask: no atomics.
      with_grid<scalar_t, 8>(shape, pointers, launch);
    } else {
      with_grid<scalar_t>(shape, pointers, launch);
    }
  });
}

} // namespace torch_bn::cuda
