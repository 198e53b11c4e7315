// Per-channel CPU tensors read into and written from doubles element by element. They are O(C),
// and an ATen op's dispatch (to(kDouble), at::tensor) costs more than the whole copy.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/irange.h>

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "torch_bn_channel_values", [&] {
    const auto* data = values.const_data_ptr<scalar_t>();
    for (const auto c : c10::irange(values.numel())) {
      out[c] = static_cast<double>(data[c]);
    }
  });
  return out;
}

// An absent tensor reads as no values.
inline std::vector<double> channel_values(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? channel_values(*t) : std::vector<double>{};
}

// Writes `values` into the contiguous tensor `t`, rounding to its dtype.
inline void store_channel_values(const at::Tensor& t, const std::vector<double>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "torch_bn_store_channel_values", [&] {
    auto* data = t.mutable_data_ptr<scalar_t>();
    for (const auto c : c10::irange(t.numel())) {
      data[c] = static_cast<scalar_t>(values[c]);
    }
  });
}

inline at::Tensor to_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  store_channel_values(out, values);
  return out;
}

} // namespace torch_bn::cpu
