// The fused epilogue of the normalize pass (residual add, activation, sign mask) and the gate
// that the backward puts on dy, as the CUDA kernels apply them (see ../activation.h).
#pragma once
#include "../activation.h"
#include "grid.cuh"

#include <ATen/OpMathType.h>

#include <cstdint>

namespace torch_bn::cuda {

// z = BN(x) + residual, output = act(z), mask bit = z > 0. A null residual or mask leaves that
// step out; no mask means the identity activation.
template <typename scalar_t>
struct DeviceEpilogue {
  const scalar_t* residual = nullptr;
  uint8_t* mask = nullptr;
  at::opmath_type<scalar_t> slope = 0;

  DeviceEpilogue() = default;
  explicit DeviceEpilogue(const Epilogue& e)
      : residual(static_cast<const scalar_t*>(e.residual)), mask(e.mask), slope(static_cast<at::opmath_type<scalar_t>>(e.slope)) {}
};

// dz = mask bit ? dy : slope * dy, the gradient through a fused activation; a null mask passes dy.
template <typename scalar_t>
struct DeviceGate {
  const uint8_t* mask = nullptr;
  at::opmath_type<scalar_t> slope = 0;

  DeviceGate() = default;
  explicit DeviceGate(const GradPrologue& p) : mask(p.mask), slope(static_cast<at::opmath_type<scalar_t>>(p.slope)) {}
};

// Writes the V sign bits of the i-th V-vector (elements V*i ...). With V == 8 the thread owns the
// whole byte; narrower vectors share a byte with other threads and OR their bits into its
// 32-bit word (OR is order-free, so the mask stays deterministic). The mask buffer is zeroed and
// padded to whole words by the caller.
template <int V>
__device__ __forceinline__ void write_sign_bits(uint8_t* mask, int64_t i, unsigned bits) {
  static_assert(32 % V == 0, "a vector's bits must not straddle a word");
  if constexpr (V == 8) {
    mask[i] = static_cast<uint8_t>(bits);
  } else {
    const int64_t e = i * V;
    atomicOr(reinterpret_cast<unsigned*>(mask) + (e >> 5), bits << (e & 31));
  }
}

// act(z) for ReLU (slope 0: max(z, 0), so that -inf gives 0; NaN stays NaN, as in torch) and
// leaky ReLU.
template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, acc_t slope) {
  if (z > acc_t(0)) {
    return z;
  }
  return slope == acc_t(0) ? (z != z ? z : acc_t(0)) : z * slope;
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void apply_epilogue(acc_t (&z)[V], const DeviceEpilogue<scalar_t>& e, int64_t i) {
  if (e.residual != nullptr) {
    acc_t r[V];
    load_vector<V>(e.residual, i, r);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      z[k] += r[k];
    }
  }
  if (e.mask != nullptr) {
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      bits |= static_cast<unsigned>(z[k] > acc_t(0)) << k;
      z[k] = activate(z[k], e.slope);
    }
    write_sign_bits<V>(e.mask, i, bits);
  }
}

// With slope 0 the gradient is selected, not multiplied, as torch's threshold_backward does.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void apply_gate(acc_t (&dy)[V], const DeviceGate<scalar_t>& g, int64_t i) {
  static_assert(8 % V == 0, "a vector's bits must lie in one byte");
  if (g.mask == nullptr) {
    return;
  }
  const int64_t e = i * V;
  const unsigned bits = g.mask[e >> 3] >> (e & 7);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (((bits >> k) & 1u) == 0) {
      dy[k] = g.slope == acc_t(0) ? acc_t(0) : dy[k] * g.slope;
    }
  }
}

} // namespace torch_bn::cuda
