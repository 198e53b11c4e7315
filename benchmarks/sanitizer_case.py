"""A small run of every torch_bn CUDA kernel path, for compute-sanitizer (benchmarks/gpu_run.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_case.py

It covers both layouts (NCHW, channels-last 2d/3d, (N, C)), the four dtypes, 16-byte and
one-value loads (odd sizes, a misaligned view), several blocks per channel, the fused
activations (mask bytes owned by a thread, and OR-ed words for odd sizes), every backward
output mask in training and eval, and an empty batch. Each result is also compared with the CPU
kernels in float64 and checked to be bitwise reproducible, so a kernel that reads or writes the
wrong element fails here even where the sanitizer stays quiet. Exits 1 on any mismatch.
"""

import itertools
import sys

import torch

import torch_bn  # noqa: F401  (registers the torch_bn operators)

OPS = torch.ops.torch_bn
# Relative error allowed against the float64 CPU result: the rounding of the output dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ACTIVATIONS = [("identity", 0.0, False), ("relu", 0.0, True), ("leaky_relu", 0.1, False)]
MASKS = [[True, True, True, True], [True, False, False, False], [False, True, True, False], [False, False, False, True]]


def layout_cases():
    # (shape, memory format, storage offset in elements)
    return [
        ((8, 4, 64, 64), torch.contiguous_format, 0),  # several blocks per channel, 16-byte loads
        ((4, 3, 5, 7), torch.contiguous_format, 0),  # odd planes: one value per load, OR-ed mask words
        ((4, 3, 8, 8), torch.contiguous_format, 1),  # a misaligned view
        ((3, 16, 6, 6), torch.channels_last, 0),
        ((2, 3, 5, 5), torch.channels_last, 0),  # 3 channels: one value per load
        ((2, 8, 3, 4, 5), torch.channels_last_3d, 0),
        ((300, 40), torch.contiguous_format, 0),
        ((0, 5, 4, 4), torch.contiguous_format, 0),  # empty batch
    ]


def make(shape, dtype, memory_format, offset):
    x = torch.randn(shape, dtype=torch.float64).mul_(2).add_(0.5).to(dtype)
    if offset:
        flat = torch.empty(x.numel() + offset, dtype=dtype)
        x = flat[offset:].view(shape).copy_(x)
    return x.to(memory_format=memory_format) if not offset else x


def relative_error(actual, expected):
    # Copied to the CPU before anything else, so that initcheck sees the copy read torch_bn's
    # own output (the sanitizer instruments only torch_bn's kernels; see gpu_run.sh).
    actual, expected = actual.cpu().double(), expected.cpu().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


class Checker:
    def __init__(self):
        self.checks = 0
        self.failures = []

    def close(self, name, actual, expected, tolerance):
        self.checks += 1
        if actual.shape != expected.shape or relative_error(actual, expected) > tolerance:
            error = relative_error(actual, expected) if actual.shape == expected.shape else "shape"
            self.failures.append(f"{name}: relative error {error} > {tolerance}")

    def equal(self, name, first, second):
        self.checks += 1
        # On the CPU: on the device, torch.equal reads back a flag that torch's own kernel wrote,
        # which initcheck, instrumenting only torch_bn's kernels, took for uninitialized memory.
        if not all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(first, second)):
            self.failures.append(f"{name}: two runs differ")


def run_case(check, shape, dtype, memory_format, offset, activation):
    name, slope, with_residual = activation
    tag = f"{tuple(shape)} {memory_format} offset={offset} {dtype} {name}"
    channels = shape[1]
    x = make(shape, dtype, memory_format, offset)
    residual = make(shape, dtype, memory_format, 0) if with_residual else None
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    running_mean, running_var = torch.randn(channels), torch.rand(channels) + 0.5
    tolerance = TOLERANCE[dtype]

    def on_cuda(*tensors):
        return [t.cuda() if t is not None else None for t in tensors]

    def as_double(*tensors):
        return [t.double() if t is not None else None for t in tensors]

    args = (name, slope)
    cx, cr, cw, cb, crm, crv = on_cuda(x, residual, weight, bias, running_mean, running_var)
    train = OPS.forward_train_act(cx, cw, cb, cr, 1e-5, *args)
    check.equal(f"forward_train_act {tag}", train, OPS.forward_train_act(cx, cw, cb, cr, 1e-5, *args))
    expected = OPS.forward_train_act(*as_double(x, weight, bias, residual), 1e-5, *args)
    for what, actual, reference in zip(("output", "mean", "invstd"), train, expected):
        check.close(f"forward_train_act {what} {tag}", actual, reference, max(tolerance, 1e-6) * 4)
    evaluated = OPS.forward_eval_act(cx, cw, cb, crm, crv, cr, 1e-5, *args)
    expected = OPS.forward_eval_act(*as_double(x, weight, bias, running_mean, running_var, residual), 1e-5, *args)
    check.close(f"forward_eval_act output {tag}", evaluated[0], expected[0], tolerance * 4)

    # The backward reads the CUDA forward's own mask, on both devices.
    mask = train[3]
    grad = make(shape, dtype, memory_format, 0)
    for training, output_mask in itertools.product((True, False), MASKS):
        mean, invstd = (train[1], train[2]) if training else (crm, (crv + 1e-5).rsqrt())
        actual = OPS.backward_act(grad.cuda(), cx, cw, mean, invstd, mask, training, *args, output_mask)
        expected = OPS.backward_act(
            *as_double(grad, x, weight, mean.cpu(), invstd.cpu()), mask.cpu(), training, *args, output_mask
        )
        for what, a, e, wanted in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), actual, expected, output_mask):
            label = f"backward_act {what} training={training} {tag}"
            if wanted:
                check.close(label, a, e, tolerance * 8 + 1e-6)
            else:
                check.close(label + " (not asked: empty)", a, torch.empty(0), 0.0)


def main():
    if not torch.cuda.is_available():
        print("sanitizer_case: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    check = Checker()
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for (shape, memory_format, offset), dtype in itertools.product(layout_cases(), dtypes):
        for activation in ACTIVATIONS:
            run_case(check, shape, dtype, memory_format, offset, activation)
    # The plain operators and the running statistics on the device.
    x = torch.randn(16, 4, 8, 8, device="cuda")
    output, mean, invstd = OPS.forward_train(x, None, None, 1e-5)
    check.close("forward_train", output, OPS.forward_train(x.cpu().double(), None, None, 1e-5)[0], 1e-5)
    running_mean, running_var = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    OPS.update_running_stats(running_mean, running_var, None, mean, invstd, 0.1, 1e-5, x.numel() // 4, True)
    check.close("update_running_stats", running_mean, 0.1 * mean, 1e-6)
    torch.cuda.synchronize()
    print(f"sanitizer_case: {check.checks} checks, {len(check.failures)} failed")
    for failure in check.failures[:40]:
        print("  " + failure)
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
