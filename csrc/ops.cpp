// Every torch_bn operator schema, in one place. Kernels live in cpu/ and cuda/, autograd in
// autograd.cpp; the fake (meta) kernels live in torch_bn/ops.py.
#include <Python.h>
#include <torch/library.h>

// The extension is imported as torch_bn._C only so that loading it runs the registrations
// below; it exposes no Python functions of its own.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(torch_bn, m) {
  // Batch statistics and normalized output in one call. mean/invstd are float64 on the CPU; on
  // CUDA float32 for float32/float16/bfloat16 input and float64 for float64 input (see
  // stats_type.h).
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor mean, Tensor invstd)");
  // Normalization with given (running) statistics.
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, float eps) -> Tensor");
  // Gradients of either forward: `mean`/`invstd` are the saved batch statistics when
  // `training`, else the running mean and 1/sqrt(running_var + eps).
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd,"
      " bool training, bool[3] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // backward in differentiable torch ops (no kernel of its own), `mean` and `invstd` taken as
  // given: the backward op's double backward, and higher-order gradients of the modules.
  // grad_weight is Σ dy·xhat, defined also without a weight.
  m.def(
      "backward_formula(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd,"
      " bool training) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // backward_formula in training with the batch statistics recomputed from `input` in
  // differentiable ops, so that their dependence on the input is part of the graph: forward
  // in training differentiated twice.
  m.def(
      "training_backward_formula(Tensor grad_output, Tensor input, Tensor? weight, float eps)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The same with a fused epilogue: z = BN(x) + residual, output = act(z) for activation
  // "identity", "relu" or "leaky_relu" (slope negative_slope). `mask` holds the sign of z, one
  // bit per element in the input's memory order (LSB first), empty for "identity".
  m.def(
      "forward_train_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps,"
      " str activation, float negative_slope) -> (Tensor output, Tensor mean, Tensor invstd, Tensor mask)");
  m.def(
      "forward_eval_act(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, Tensor? residual, float eps, str activation, float negative_slope)"
      " -> (Tensor output, Tensor mask)");
  // Gradients of the fused forward; grad_residual is dz = dy * act'(z), read off the mask.
  m.def(
      "backward_act(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd,"
      " Tensor mask, bool training, str activation, float negative_slope, bool[4] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // forward_train, then update_running_stats of its statistics over the input's values per
  // channel: a module's training forward as one call. The running tensors are checked first.
  m.def(
      "forward_train_update(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!) running_mean,"
      " Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps,"
      " bool unbiased) -> (Tensor output, Tensor mean, Tensor invstd)");
  // running = (1 - f) * running + f * batch, with f = momentum, or 1/num_batches_tracked
  // (after its increment) when momentum is None. `count` is the number of values per channel
  // that produced mean/invstd; count == 0 (an empty batch) only bumps num_batches_tracked.
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var,"
      " Tensor(c!)? num_batches_tracked, Tensor mean, Tensor invstd, float? momentum,"
      " float eps, int count, bool unbiased) -> ()");
}
