// Backward's write loops: the input gradient in training and in evaluation.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "run_sources.h"
#include "run_stores.h"

#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

// dx = dy · k: the input gradient in evaluation, where the statistics are constants (x is not
// read, so a NaN in x does not reach dx, as in torch).
template <typename acc_t, typename D, typename T, typename P>
inline void scale_by(D dy, T* dx, int64_t n, bool stream, P k) {
  write_run<acc_t>(
      dx, n, stream, [=](int64_t i) { return dy.vec(i) * k.vec(i); }, [&](int64_t i) { return acc_t(dy[i] * k[i]); });
}

// Training-mode input gradient: dx = dy·k1 - ((x - mean)·k2 + k3), with per-channel
// k1 = weight·invstd, k2 = k1·invstd²·Σdy(x-mean)/n, k3 = k1·Σdy/n, in two fused multiply-adds.
template <typename acc_t, typename D, typename T, typename M, typename P>
inline void grad_input(D dy, const T* x, T* dx, int64_t n, bool stream, M hi, M lo, P k1, P k2, P k3) {
  // dy·k1 - (d·k2 + k3) from (dy, d = x - mean, k1, k2, k3).
  constexpr auto formula = [](const auto& g, const auto& d, const auto& a, const auto& b, const auto& c) {
    return at::vec::fmsub(g, a, at::vec::fmadd(d, b, c));
  };
  const auto vector_value = [=](int64_t i) {
    return formula(dy.vec(i), centered(load<acc_t>(x + i), hi, lo, i), k1.vec(i), k2.vec(i), k3.vec(i));
  };
  const auto scalar_value = [&](int64_t i) {
    return in_a_lane<acc_t>(formula, dy[i], centered(static_cast<acc_t>(x[i]), hi, lo, i), k1[i], k2[i], k3[i]);
  };
  if constexpr (kParitySteps<T> && D::kSteps && kStepLanes<M> && kStepLanes<P>) {
    // The formula on each half of the step, in the step's own loop: a helper shared with
    // vector_value made GCC stop inlining float32's write pass into its planar loop (a call per
    // plane), which takes no steps.
    write_run<acc_t>(dx, n, stream, vector_value, scalar_value, [=](int64_t i) {
      const auto g = dy.step(i);
      const auto x_values = load_step<acc_t>(x + i);
      std::array<Vectorized<acc_t>, 2> out;
      for (int half = 0; half < 2; ++half) {
        out[half] = formula(g[half], centered(x_values[half], hi.parity(half), lo.parity(half), i),
                            k1.parity(half).vec(i), k2.parity(half).vec(i), k3.parity(half).vec(i));
      }
      return out;
    });
  } else {
    write_run<acc_t>(dx, n, stream, vector_value, scalar_value);
  }
}

// The input gradient of a run in either mode: grad_input in training, scale_by in evaluation
// (where x, the mean, k2 and k3 are not read).
template <typename acc_t, typename D, typename T, typename M, typename P>
C10_ALWAYS_INLINE void write_input_grad(bool training, D dy, const T* x, T* dx, int64_t n, bool stream, M hi, M lo,
                                        P k1, P k2, P k3) {
  if (training) {
    grad_input<acc_t>(dy, x, dx, n, stream, hi, lo, k1, k2, k3);
  } else {
    scale_by<acc_t>(dy, dx, n, stream, k1);
  }
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
