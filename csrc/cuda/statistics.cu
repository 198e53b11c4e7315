// Training forward: batch statistics in one read of x, then the normalize pass (normalize.cu).
//
// Numerics: each thread runs Welford's update on x - shift, the shift being one element of the
// channel, so a large mean does not swamp the float32 terms; threads merge with Chan's pairwise
// update in a fixed tree, each block writes (count, mean in double, M2) per channel, and a
// per-channel kernel merges the blocks in split order in double. The mean reaches the
// normalize pass as hi + lo (channel_values.cuh).
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

enum StatField { kMean, kM2, kCount, kStatFields };

template <typename scalar_t, typename Grid>
__global__ void __launch_bounds__(kThreads) welford_kernel(const Grid g, const scalar_t* __restrict__ x, const Partials out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Grid::kVec;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t shift[V] = {};
  WelfordLanes<acc_t, V> lanes;
  if (g.active()) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      shift[k] = static_cast<acc_t>(x[g.shift_element(k)]);
    }
    g.for_each_vector([&](int64_t i) {
      acc_t values[V];
      load_vector<V>(x, i, values);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        values[k] -= shift[k];
      }
      lanes.add(values);
    });
  }
  g.reduce(lanes, smem, [&](int k, int64_t c, const Welford<acc_t>& total) {
    const int64_t s = g.split();
    out.at(kMean, s, c) = static_cast<double>(shift[k]) + static_cast<double>(total.mean);
    out.at(kM2, s, c) = static_cast<double>(total.m2);
    out.at(kCount, s, c) = static_cast<double>(total.count);
  });
}

// Merges the splits of each channel (means relative to split 0's, so the sums stay small) and
// writes the statistics and the normalize pass's coefficients.
template <typename acc_t>
__global__ void merge_statistics_kernel(
    const Partials p, double eps, const ChannelValues weight, const ChannelValues bias,
    acc_t* __restrict__ mean_out, acc_t* __restrict__ invstd_out, const AffineTable<acc_t> table) {
  const int64_t c = merge_channel();
  if (c >= p.channels) {
    return;  // the whole warp: one channel per warp
  }
  const double reference = p.at(kMean, 0, c);
  double count = 0;
  double offset = 0;
  for (int64_t s = threadIdx.x; s < p.splits; s += 32) {
    const double n = p.at(kCount, s, c);
    count += n;
    offset += n * (p.at(kMean, s, c) - reference);
  }
  count = warp_sum(count);
  const double mean = reference + warp_sum(offset) / count;
  double m2 = 0;
  for (int64_t s = threadIdx.x; s < p.splits; s += 32) {
    const double delta = p.at(kMean, s, c) - mean;
    m2 += p.at(kM2, s, c) + p.at(kCount, s, c) * delta * delta;
  }
  m2 = warp_sum(m2);
  if (threadIdx.x == 0) {
    const double invstd = 1.0 / ::sqrt(m2 / count + eps);
    mean_out[c] = static_cast<acc_t>(mean);
    invstd_out[c] = static_cast<acc_t>(invstd);
    const MeanSplit<acc_t> m = split_mean<acc_t>(mean);
    table.hi[c] = m.hi;
    table.lo[c] = m.lo;
    table.scale[c] = static_cast<acc_t>(weight.value_or(c, 1.0) * invstd);
    table.shift[c] = static_cast<acc_t>(bias.value_or(c, 0.0));
  }
}

} // namespace

void normalize_with_batch_statistics(
    const at::Tensor& x, const at::Tensor& y, const Shape& shape, const ChannelInput& weight,
    const ChannelInput& bias, double eps, const Epilogue& epilogue, const at::Tensor& mean,
    const at::Tensor& invstd) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_bn_forward_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const at::Tensor table = at::empty({4, shape.channels}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    with_grid<scalar_t>(shape, {x_data}, [&](const auto& g) {
      using Grid = std::decay_t<decltype(g)>;
      const at::Tensor storage = empty_partials(x, kStatFields, g.splits(), shape.channels);
      const Partials partials = partials_view(storage);
      const size_t smem = Grid::template shared_bytes<WelfordLanes<acc_t, Grid::kVec>>(g.block);
      welford_kernel<scalar_t, Grid><<<g.grid, g.block, smem, stream>>>(g, x_data, partials);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_statistics_kernel<acc_t><<<merge_grid(shape.channels), merge_block(), 0, stream>>>(
          partials, eps, weight.view, bias.view, mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
          affine_table<acc_t>(table));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    affine(x, y, shape, table, GradPrologue{}, epilogue);
  });
}

} // namespace torch_bn::cuda
