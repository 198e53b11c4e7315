// The running-statistics update, shared by every backend: it is O(C) work written with ATen
// tensor ops, which run wherever the tensors live, and as a plain loop for CPU tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace torch_bn {

void update_running_stats(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    std::optional<double> momentum,
    double eps,
    int64_t count,
    bool unbiased);

} // namespace torch_bn
