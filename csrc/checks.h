// Argument checks shared by every backend. Each op validates all of its arguments before it
// writes anything, so a rejected call leaves running statistics untouched.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

namespace torch_bn {

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK(
      input.dim() >= 2,
      "torch_bn: expected input of at least 2 dimensions (N, C, ...), got ", input.dim(), "D input");
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      "torch_bn: expected a floating-point input, got ", input.scalar_type());
}

// Whether an optional tensor argument was passed: present and defined.
inline bool given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// A per-channel tensor (weight, bias, running or saved statistics) must hold one value per
// channel and live on the input's device. Sizes are read as SymInts, so that the check also runs
// on the symbolic shapes of a composite op being traced (forward_train_update).
inline void check_per_channel(const c10::SymInt& channels, at::Device device, const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.dim() == 1 && t.sym_numel() == channels,
      "torch_bn: ", name, " should contain ", channels, " elements (one per channel), got shape ",
      t.sym_sizes());
  TORCH_CHECK(t.device() == device, "torch_bn: ", name, " is on ", t.device(), " but expected ", device);
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      "torch_bn: ", name, " must be floating point, got ", t.scalar_type());
}

inline void check_per_channel(const at::Tensor& input, const at::Tensor& t, const char* name) {
  check_per_channel(input.sym_size(1), input.device(), t, name);
}

inline void check_per_channel(
    const at::Tensor& input,
    const std::optional<at::Tensor>& t,
    const char* name) {
  if (given(t)) {
    check_per_channel(input, *t, name);
  }
}

// A ValueError in Python, as torch.nn.functional.batch_norm raises.
inline void check_eps(double eps, bool training) {
  if (training) {
    TORCH_CHECK_VALUE(eps > 0, "torch_bn: eps must be positive in training, got ", eps);
  } else {
    TORCH_CHECK_VALUE(eps >= 0, "torch_bn: eps must be non-negative, got ", eps);
  }
}

} // namespace torch_bn
