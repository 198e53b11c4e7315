// The activations fused into the normalize pass, and what a fused kernel adds to plain
// BatchNorm: z = BN(x) + residual, output = act(z), with the sign of z kept as a bit mask.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>

namespace torch_bn {

enum class Activation { Identity, Relu, LeakyRelu };

struct ActivationSpec {
  Activation kind = Activation::Identity;
  double negative_slope = 0.0;

  static ActivationSpec parse(c10::string_view name, double negative_slope) {
    if (name == "identity") {
      return {Activation::Identity, 0.0};
    }
    if (name == "relu") {
      return {Activation::Relu, 0.0};
    }
    if (name == "leaky_relu") {
      return {Activation::LeakyRelu, negative_slope};
    }
    TORCH_CHECK(false, "torch_bn: activation must be 'identity', 'relu' or 'leaky_relu', got '", std::string(name), "'");
  }

  // Identity needs no mask: its gradient passes through unchanged.
  bool has_mask() const { return kind != Activation::Identity; }
  // The gradient factor where z <= 0.
  double slope() const { return kind == Activation::LeakyRelu ? negative_slope : 0.0; }
};

// Bit e of a mask (LSB first within each byte) is z_e > 0, e being the element's offset in the
// input's memory order.
inline int64_t mask_bytes(int64_t numel) {
  return (numel + 7) / 8;
}

// Kernel-side view of the forward epilogue; `residual` has the input's dtype and strides.
struct Epilogue {
  const void* residual = nullptr;
  uint8_t* mask = nullptr;  // zero-filled; null when there is no activation
  double slope = 0.0;
};

// Kernel-side view of the backward prologue dz = dy * (mask ? 1 : slope).
struct GradPrologue {
  const uint8_t* mask = nullptr;  // null: dz = dy
  double slope = 0.0;
  void* grad_residual = nullptr;  // receives dz when non-null; the input's dtype and strides
};

} // namespace torch_bn
