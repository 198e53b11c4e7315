// Per-channel CPU tensors read into and written from doubles element by element. They are O(C),
// and an ATen op's dispatch (to(kDouble), at::tensor) costs more than the whole copy. The copy
// runs in the kernels' build for the CPU (kernels.h): the portable build, which compiles the
// operators, converts half in software, 8 µs of the evaluation operator's 21 µs at 1x2048x1x1
// float16 (four tensors of 2048 values; one thread, AMD EPYC Zen 4 VM, perf).
#pragma once
#include "kernels.h"

#include <ATen/ATen.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <optional>
#include <vector>

namespace torch_bn::cpu {

// Whether t's values can be read here, outside a backend kernel (in an autograd kernel): a plain
// dense CPU tensor and no TorchDispatchMode. A fake or functional tensor, a batched one (vmap) or
// a conjugate view has other dispatch keys, and a mode (make_fx's tracing) would not see the
// read, so those go through ATen ops.
inline bool readable_outside_kernels(const at::Tensor& t) {
  constexpr c10::DispatchKeySet plain_cpu({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                           c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});
  return plain_cpu.isSupersetOf(t.key_set()) && !c10::impl::dispatch_mode_enabled();
}

inline std::vector<double> channel_values(const at::Tensor& t) {
  const at::Tensor values = t.contiguous();
  std::vector<double> out(values.numel());
  TORCH_BN_CPU_DISPATCH(read_channel_values, values, out.data());
  return out;
}

// An absent tensor reads as no values.
inline std::vector<double> channel_values(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? channel_values(*t) : std::vector<double>{};
}

// Writes `values` into the contiguous tensor `t`, rounding to its dtype.
inline void store_channel_values(const at::Tensor& t, const std::vector<double>& values) {
  TORCH_BN_CPU_DISPATCH(write_channel_values, t, values.data());
}

inline at::Tensor to_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  store_channel_values(out, values);
  return out;
}

} // namespace torch_bn::cpu
