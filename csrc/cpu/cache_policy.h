// Where the CPU kernels' passes find their data: the bound past which a pass streams its
// outputs past the cache, and when a pass fetches ahead.
// Included once per CPU capability through kernels_impl.h, inside that build's namespace (see
// kernels_*.cpp).
#pragma once
#include "../layout.h"
#include "work_units.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// What a pass may move and still find in the last-level cache (see cache_bytes): three quarters
// of the L3, which a VM's two cores share with the rest of the chip, and at most
// max_cache_bytes(). A pass whose inputs and outputs together reach it writes its outputs with
// non-temporal stores (see RunStores, streams_output).
// Where the L3's size is unknown: that of the AMD EPYC VMs the bound was first measured on.
constexpr int64_t kDefaultL3Bytes = 32 << 20;

// The bound is 24 MiB on the AMD EPYC VMs (32 MiB L3). The Intel Xeon VM reports a 480 MiB L3
// but does not get to keep that much: float32 NCHW passes over 12.8 MB tensors were 1.02-1.3x
// faster written through the cache (forward-train and forward+backward at 32x128x28x28,
// 32x512x14x14 and 32x2048x7x7; evaluation even), forward+backward over 25.7 MB tensors (77 MB
// moved) 1.34-1.54x faster streamed (32x64x56x56, 32x256x28x28, 32x1024x14x14), hence the
// 48 MiB cap (medians of 5-7 rounds interleaved with torch.nn, one process per bound).
// Later the same day a 24 MiB cap, streaming those 12.8 MB passes, made module forward+backward
// 1.05-1.5x faster (32x128x28x28 NCHW 1.54-1.68x -> 2.28-2.34x over torch.nn): a loop of it
// moves x, y, dy and dx (51 MB), more than either pass, and nothing reads y or dx. The training
// step, where the next layer reads them, was slower so, 1.12-1.13x over torch.nn against
// 1.14-1.17x (5 runs of each cap in alternating processes), and what the step loses is what
// users train with: the cap stays.
// The L3 is glibc's sysconf figure, which on one AMD EPYC (Zen 3) VM was 256 MiB, the socket's,
// where Linux's sysfs reported each core complex's 32 MiB: there the bound is 48 MiB too. On that
// VM 24 MiB streamed the forward passes over 12.8 MB tensors too: NCHW evaluation at
// 32x128x28x28 0.77x as fast as torch.nn's, against 1.16-1.43x with 48 MiB; 32 MiB, streaming
// only the backward passes over them, was a little ahead of 48 MiB in channels-last and even
// elsewhere (float32 geometric means over torch.nn, 2 alternating benchmark runs of each:
// channels-last forward+backward 1.23-1.30x against 1.19-1.23x, the training step 1.16-1.19x
// against 1.15-1.19x). Two runs on one VM whose speed moves by tens of percent between runs do
// not settle a bound the other VMs measured, so what glibc reports stays the source. Two more
// pairs on that VM later (2026-12-06) bore it out: 32 MiB took channels-last backward to
// 1.20x over torch.nn from 1.10x and forward+backward to 1.25-1.26x from 1.17-1.18x, in the
// benchmark's loops, which read the same x and dy call after call, but the training step, whose
// next layer reads dx, fell to 1.10-1.15x from 1.15-1.17x.
// On the Intel Xeon VM the cap is 32 MiB (2026-12-08): the backward passes over 12.8 MB tensors
// (38.4 MB moved) stream, the forward passes over them (25.6 MB) still do not, and NCHW backward
// over 6.4 MB tensors (19.2 MB) fetches its output ahead (fetches_output_ahead). float32 backward
// over torch.nn at 32x128x28x28 0.92x -> 1.17x NCHW and 1.38x -> 1.61x channels-last, 32x2048x7x7
// 1.55x -> 1.81x NCHW and 1.08x -> 1.24x channels-last, 32x512x14x14 channels-last forward+backward
// 1.18x -> 1.47x, bfloat16 NCHW backward at 32x64x56x56 1.11x -> 1.49x; the geometric means of
// forward+backward over the 12 shapes 2.42x -> 2.49x NCHW and 1.55x -> 1.62x channels-last (medians
// of 3 alternating benchmark processes per bound). The training step was even: 1.13-1.18x over
// torch.nn with 48 MiB, 1.14-1.18x with 32 MiB (13 alternating pairs). The step measured 32 MiB the
// other way on the Zen 3 VM (above), so AMD CPUs keep 48 MiB.
int64_t max_cache_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_is("intel")) {
    return 32 << 20;
  }
#endif
  return 48 << 20;
}

// TORCH_BN_STREAM_BYTES, read once, sets the bound in bytes instead: for inputs sized around a
// known bound (the tests of the streamed passes), and for measuring another bound on a new
// machine without rebuilding.
int64_t cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* chosen = std::getenv("TORCH_BN_STREAM_BYTES")) {
      // The whole value, digits only: atoll would read "24MiB" as 24 bytes.
      char* end = nullptr;
      errno = 0;
      const long long value = std::strtoll(chosen, &end, 10);
      TORCH_CHECK(end != chosen && *end == '\0' && errno == 0 && value > 0,
                  "TORCH_BN_STREAM_BYTES must be a positive number of bytes, got '", chosen, "'");
      return static_cast<int64_t>(value);
    }
    int64_t l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return std::min<int64_t>((l3 > 0 ? l3 : kDefaultL3Bytes) / 4 * 3, max_cache_bytes());
  }();
  return bytes;
}

// Whether a streamed pass fetches the next group while it writes (see
// PlanarPlan::next_group_distance): on AMD CPUs, where that was measured faster, and nowhere
// else. TORCH_BN_FETCH_NEXT_GROUP ("0" or "1"), read once, decides instead: for the tests, which
// run the fetching path on any machine, and for measuring it on a new machine without
// rebuilding.
bool fetches_next_group() {
  static const bool fetches = [] {
    if (const char* chosen = std::getenv("TORCH_BN_FETCH_NEXT_GROUP")) {
      TORCH_CHECK(std::strcmp(chosen, "0") == 0 || std::strcmp(chosen, "1") == 0,
                  "TORCH_BN_FETCH_NEXT_GROUP must be 0 or 1, got '", chosen, "'");
      return chosen[0] == '1';
    }
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_is("amd") != 0;
#else
    return false;
#endif
  }();
  return fetches;
}

// The bytes of `tensors` tensors of shape `s`, values of `value_bytes` each.
int64_t pass_bytes(const Shape& s, int64_t value_bytes, int64_t tensors) {
  return tensors * s.count() * s.channels * value_bytes;
}

// Whether a pass that reads and writes `tensors` tensors of shape `s` (values of `value_bytes`
// each: x and y, a fused residual, dy and the gradients) writes its outputs past the cache:
// written through it, they would evict the inputs, and each line would be read before it is
// written. Below that size what is written stays in the cache for the layer that reads it next.
// Streamed against cached at 12.8 MB float32 (interleaved A/B on the AMD EPYC VM, 2 threads):
// backward (x, dy and dx: 38.4 MB) 1.3-1.4x faster at 28x28, 1.1-1.3x at 14x14 and 1.04-1.1x at
// 7x7 (56x56 even), the forward with a residual 1.2-1.5x (NCHW 14x14 even). The plain forward
// (x and y: 25.6 MB, under the whole L3 but over the bound) streams since the bound came down
// from 32 MiB: forward-train 1.3-2.4x faster (NCHW 28x28 and 14x14 the most, 7x7 1.05-1.3x;
// channels-last 1.2-1.4x), evaluation 1.6-1.8x at NCHW 28x28 and 1.2-1.7x channels-last (NCHW
// 14x14 and 7x7, whose runs are not whole lines, even), module forward+backward 1.06-1.33x,
// bfloat16 at 12.8 MB forward-train 1.1-1.5x and evaluation 1.04-1.11x (NCHW 32x64x56x56
// 0.87x); the training step even (1.10x and 1.11x over torch.nn against 1.12x and 1.11x, 40
// interleaved steps). At a 16 MiB bound backward at 6.4 MB (19.2 MB moved) streamed too and was
// 0.88x as fast. NCHW planes of kShortPlane values or more (shorter ones may be written by
// position) but fewer than kMinSharedLinePlane bytes go through the cache whatever the size, as
// evaluation's do: streamed, forward-train and backward stage them a few lines at a time
// (StagedStores), and at 32x1024x14x14 bfloat16 (392-byte planes) the speedup over torch's
// backward was 1.09x so against 1.19x not streamed, module forward+backward 1.03x against 1.17x,
// forward-train even (medians of 5 interleaved old/new process pairs, 2 threads).
bool streams_output(const Shape& s, int64_t value_bytes, int64_t tensors) {
  const bool short_planes = !s.rows && s.inner >= kShortPlane && s.inner * value_bytes < kMinSharedLinePlane;
  return !short_planes && pass_bytes(s, value_bytes, tensors) >= cache_bytes();
}

// Whether what a pass moves reaches half the bound of streams_output, so that its inputs were
// evicted since the call before and come from memory. Below that, a loop's inputs and outputs
// stay in the cache, and fetching them ahead only costs.
bool moves_past_cache(const Shape& s, int64_t value_bytes, int64_t tensors) {
  return pass_bytes(s, value_bytes, tensors) >= cache_bytes() / 2;
}

// Whether a training pass fetches its output ahead for writing (fetch_next_batch_for_write):
// where it writes through the cache (not streams_output) and moves_past_cache. Module
// forward+backward at 32x512x7x7 float32 (13 MB of x, y, dy and dx) took 0.67 ms with the fetch
// against 0.62 ms.
bool fetches_output_ahead(const Shape& s, int64_t value_bytes, int64_t tensors) {
  return !streams_output(s, value_bytes, tensors) && moves_past_cache(s, value_bytes, tensors);
}

} // namespace
} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
