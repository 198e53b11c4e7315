// Per-channel tensors as the kernels see them: parameters and statistics of any floating dtype
// read as double, and the tables of per-channel coefficients that the element-wise passes use.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>

namespace torch_bn::cuda {

inline bool readable_on_device(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A 1-D tensor of one value per channel (weight, bias, running or saved statistics), in any of the
// four dtypes readable_on_device and any stride; a null `data` stands for an absent tensor.
struct ChannelValues {
  const void* data = nullptr;
  int64_t stride = 0;
  at::ScalarType dtype = at::kDouble;

  __device__ __forceinline__ double operator[](int64_t c) const {
    const int64_t i = c * stride;
    switch (dtype) {
      case at::kFloat:
        return static_cast<const float*>(data)[i];
      case at::kHalf:
        return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      case at::kBFloat16:
        return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
      default:
        return static_cast<const double*>(data)[i];
    }
  }

  __device__ __forceinline__ double value_or(int64_t c, double absent) const {
    return data == nullptr ? absent : (*this)[c];
  }
};

// A per-channel tensor the kernels can read, and the ChannelValues view of it. Dtypes the kernels
// do not read (float8 parameters) are converted to float32 first, as the CPU kernels convert
// everything to double.
struct ChannelInput {
  at::Tensor tensor;
  ChannelValues view;

  // An absent tensor.
  ChannelInput() = default;
  explicit ChannelInput(const at::Tensor& t)
      : tensor(t.defined() && !readable_on_device(t.scalar_type()) ? t.to(at::kFloat) : t) {
    if (tensor.defined()) {
      view = {tensor.const_data_ptr(), tensor.stride(0), tensor.scalar_type()};
    }
  }
  explicit ChannelInput(const std::optional<at::Tensor>& t) : ChannelInput(t.value_or(at::Tensor())) {}
};

// A freshly allocated contiguous per-channel output in one of the readable dtypes.
struct ChannelOutput {
  void* data = nullptr;
  at::ScalarType dtype = at::kDouble;

  __device__ __forceinline__ void set(int64_t c, double value) const {
    switch (dtype) {
      case at::kFloat:
        static_cast<float*>(data)[c] = static_cast<float>(value);
        return;
      case at::kHalf:
        static_cast<c10::Half*>(data)[c] = static_cast<c10::Half>(static_cast<float>(value));
        return;
      case at::kBFloat16:
        static_cast<c10::BFloat16*>(data)[c] = static_cast<c10::BFloat16>(static_cast<float>(value));
        return;
      default:
        static_cast<double*>(data)[c] = value;
    }
  }
};

// The double-precision mean as hi + lo in the accumulation type: (x - hi) - lo keeps the low bits
// that a float mean would drop (with mean 1e4 and std 1e-2 those bits are the whole signal).
template <typename acc_t>
struct MeanSplit {
  acc_t hi;
  acc_t lo;
};

template <typename acc_t>
__device__ __forceinline__ MeanSplit<acc_t> split_mean(double mean) {
  const acc_t hi = static_cast<acc_t>(mean);
  return {hi, static_cast<acc_t>(mean - static_cast<double>(hi))};
}

// y = ((x - hi) - lo) * scale + shift, per channel: rows of a [4, C] tensor of acc_t.
template <typename acc_t>
struct AffineTable {
  acc_t* hi;
  acc_t* lo;
  acc_t* scale;
  acc_t* shift;
};

// Training-mode input gradient dx = dy * k1 - ((x - hi) - lo) * k2 - k3: rows of a [5, C] tensor.
template <typename acc_t>
struct GradTable {
  acc_t* hi;
  acc_t* lo;
  acc_t* k1;
  acc_t* k2;
  acc_t* k3;
};

template <typename acc_t>
AffineTable<acc_t> affine_table(const at::Tensor& t) {
  acc_t* p = t.mutable_data_ptr<acc_t>();
  const int64_t c = t.size(1);
  return {p, p + c, p + 2 * c, p + 3 * c};
}

template <typename acc_t>
GradTable<acc_t> grad_table(const at::Tensor& t) {
  acc_t* p = t.mutable_data_ptr<acc_t>();
  const int64_t c = t.size(1);
  return {p, p + c, p + 2 * c, p + 3 * c, p + 4 * c};
}

} // namespace torch_bn::cuda
