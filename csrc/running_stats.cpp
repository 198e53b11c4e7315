#include "running_stats.h"

#include "checks.h"
#include "cpu/channel_values.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace torch_bn {

namespace {

// torch's (1 - factor)·running + factor·batch. As running + (batch - running)·factor, a factor of 1
// (momentum 1, or the first batch of a cumulative average) returned the batch value with the
// running one's rounding error: a variance of 1e-12 blended over 1.0 came out 4e-5 off.
double blend(double running, double batch, double factor) {
  return running * (1.0 - factor) + batch * factor;
}

// The update below as a loop over channels, for CPU tensors: each ATen op's dispatch costs more
// than the whole update of a small layer. The same formulas, in double.
void blend_on_cpu(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    double factor,
    double eps,
    double correction) {
  auto running_means = cpu::channel_values(running_mean);
  auto running_vars = cpu::channel_values(running_var);
  const auto means = cpu::channel_values(mean);
  const auto invstds = cpu::channel_values(invstd);
  for (const auto c : c10::irange(static_cast<int64_t>(means.size()))) {
    // 1/invstd² by a product: std::pow costs more than the rest of the update together.
    const double batch_var = std::max(1.0 / (invstds[c] * invstds[c]) - eps, 0.0) * correction;
    running_means[c] = blend(running_means[c], means[c], factor);
    running_vars[c] = blend(running_vars[c], batch_var, factor);
  }
  cpu::store_channel_values(running_mean, running_means);
  cpu::store_channel_values(running_var, running_vars);
}

// num_batches_tracked += 1. A CPU int64 counter (torch's) is incremented through its data, as
// blend_on_cpu writes the statistics, and its version bumped as add_ would: add_'s dispatch costs
// more than the rest of a small layer's update.
void count_batch(const at::Tensor& num_batches_tracked) {
  if (num_batches_tracked.is_cpu() && num_batches_tracked.scalar_type() == at::kLong) {
    *num_batches_tracked.mutable_data_ptr<int64_t>() += 1;
    num_batches_tracked.unsafeGetTensorImpl()->bump_version();
  } else {
    num_batches_tracked.add_(1);
  }
}

} // namespace

void update_running_stats(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    std::optional<double> momentum,
    double eps,
    int64_t count,
    bool unbiased) {
  // Everything is checked before anything is written.
  const int64_t channels = running_mean.numel();
  check_per_channel(channels, running_mean.device(), running_mean, "running_mean");
  check_per_channel(channels, running_mean.device(), running_var, "running_var");
  check_per_channel(channels, running_mean.device(), mean, "mean");
  check_per_channel(channels, running_mean.device(), invstd, "invstd");
  check_eps(eps, /*training=*/true);
  TORCH_CHECK(count >= 0, "torch_bn: count must be non-negative, got ", count);
  TORCH_CHECK(
      !unbiased || count != 1,
      "torch_bn: an unbiased running variance needs more than one value per channel");
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (tracked) {
    TORCH_CHECK(
        num_batches_tracked->numel() == 1 && !at::isFloatingType(num_batches_tracked->scalar_type()),
        "torch_bn: num_batches_tracked must be a one-element integer tensor");
  }
  TORCH_CHECK(
      momentum.has_value() || tracked,
      "torch_bn: momentum=None (a cumulative average) needs num_batches_tracked");

  if (tracked) {
    count_batch(*num_batches_tracked);
  }
  // An empty batch counts as a batch (as in torch) but carries no statistics.
  if (count == 0) {
    return;
  }
  const double correction = unbiased ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  if (running_mean.is_cpu() && running_mean.is_contiguous() && running_var.is_contiguous()) {
    const double factor = momentum.has_value() ? *momentum : 1.0 / num_batches_tracked->item<double>();
    blend_on_cpu(running_mean, running_var, mean, invstd, factor, eps, correction);
    return;
  }
  const auto f64 = running_mean.options().dtype(at::kDouble);
  const at::Tensor factor = momentum.has_value()
      ? at::scalar_tensor(*momentum, f64)
      : at::reciprocal(num_batches_tracked->to(f64).reshape({}));
  // The biased variance is recovered from invstd in double: 1/invstd² - eps.
  const at::Tensor batch_var = invstd.to(f64).pow(-2).sub_(eps).clamp_min_(0).mul_(correction);
  // As blend() above.
  const auto blend_into = [&](const at::Tensor& running, const at::Tensor& batch) {
    running.copy_(running.to(f64) * (1 - factor) + batch.to(f64) * factor);
  };
  blend_into(running_mean, mean);
  blend_into(running_var, batch_var);
}

} // namespace torch_bn
