// The resfuse operator library: one schema per op (docs/architecture.md is the contract). Kernels
// are registered per backend in same-stem files: csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(resfuse, CPU))
// and csrc/cuda/ (TORCH_LIBRARY_IMPL(resfuse, CUDA)); fake (meta) kernels for torch.compile are in
// resfuse/ops/bn_act.py.

#include <Python.h>
#include <torch/library.h>

// `import resfuse._C` only has to load this library so that the static registrations run; the
// module itself is empty (no pybind11), so the library is built on the limited Python API (abi3).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // doc
      -1,  // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resfuse, m) {
  // Per-channel mean and biased variance of input [N, C, H, W] over N, H, W, as float32 [C]
  // (float64 for float64 input). Numerically safe: chunked two-pass moments merged with Chan's
  // formula, never raw sum/sum^2.
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)", {at::Tag::pt2_compliant_tag});

  // out = act(input * scale[c] + shift[c] + R), R = residual * res_scale[c] | residual | 0,
  // act = ReLU if relu else identity. NaN propagates. Output in input's memory format.
  m.def(
      "bn_act(Tensor input, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, "
      "bool relu) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // With dz = grad_out masked by the ReLU of output (relu) or grad_out: per-channel sums
  // sum_dz = sum(dz), sum_dz_xmu = sum(dz * (input - mean)), sum_dz_rmu = sum(dz * (residual -
  // res_mean)) ([0]-shaped when residual is None).
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor output, Tensor input, Tensor mean, "
      "Tensor? residual, Tensor? res_mean, bool relu) "
      "-> (Tensor sum_dz, Tensor sum_dz_xmu, Tensor sum_dz_rmu)",
      {at::Tag::pt2_compliant_tag});

  // grad_input = a[c] * dz + b[c] * input + d[c]; grad_residual = res_a[c] * dz + res_b[c] *
  // residual + res_d[c] (res_a given) or dz (not given) when residual_grad, else a [0]-shaped tensor.
  m.def(
      "bn_act_backward_apply(Tensor grad_out, Tensor output, Tensor input, Tensor a, Tensor b, "
      "Tensor d, Tensor? residual, Tensor? res_a, Tensor? res_b, Tensor? res_d, bool relu, "
      "bool residual_grad) -> (Tensor grad_input, Tensor grad_residual)",
      {at::Tag::pt2_compliant_tag});

  // In place: grad_input = a[c] * dz + b[c] * input + d[c] (+ grad_input's old value when
  // accumulate); without input the b term is absent. grad_input may be grad_out itself (a
  // gradient buffer the caller owns, then accumulate is false): each element is read before it is
  // written. Saves the allocation of a new gradient per layer in the fused backward.
  m.def(
      "bn_act_backward_apply_(Tensor(a!) grad_input, Tensor grad_out, Tensor output, Tensor? input, "
      "Tensor a, Tensor b, Tensor d, bool relu, bool accumulate) -> ()",
      {at::Tag::pt2_compliant_tag});

  // out = act(input * gate[n, c] + residual), act = ReLU if relu else identity, NaN propagating: the
  // per-image channel gate of a squeeze-and-excitation block, its shortcut add and ReLU in one pass.
  // gate: [N, C] float32 (float64 for float64 input). Output in input's memory format.
  m.def("gate_act(Tensor input, Tensor gate, Tensor? residual, bool relu) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // With dz = grad_out masked by the ReLU of output (relu) or grad_out: grad_input = dz * gate[n, c],
  // grad_gate[n, c] = sum over H, W of dz * input ([N, C], gate's dtype; a [0]-shaped tensor without
  // input, which is then not read), grad_residual = dz when residual_grad, else a [0]-shaped tensor.
  // Activations in input's memory format (grad_out's without input).
  m.def(
      "gate_act_backward(Tensor grad_out, Tensor output, Tensor? input, Tensor gate, bool relu, "
      "bool residual_grad) -> (Tensor grad_input, Tensor grad_gate, Tensor grad_residual)",
      {at::Tag::pt2_compliant_tag});

  // CPU only (csrc/cpu/bn_params.cpp): the per-channel arithmetic of one BN layer, one call each
  // instead of a few tensor ops from Python. Vectors are [C], float32 or float64 (all one dtype).
  // bn_normalize: invstd = 1 / sqrt(var + eps), scale = weight * invstd (invstd without weight),
  // shift = bias - mean * scale (-(mean * invstd) without weight; weight and bias go together),
  // unbiased = var * count / max(count - 1, 1).
  m.def(
      "bn_normalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, int count) "
      "-> (Tensor invstd, Tensor scale, Tensor shift, Tensor unbiased)",
      {at::Tag::pt2_compliant_tag});

  // The coefficients of dL/dy = a * dz + b * y + d from bn_act_backward_reduce's sums: xmu =
  // sum_dz_xmu * invstd (dL/dweight), a = weight * invstd (invstd without weight); with batch_stats
  // b = -(a * invstd * xmu) / count and d = -(a * sum_dz + count * b * mean) / count, else 0.
  m.def(
      "bn_backward_coefficients(Tensor sum_dz, Tensor sum_dz_xmu, Tensor mean, Tensor invstd, Tensor? weight, "
      "int count, bool batch_stats) -> (Tensor a, Tensor b, Tensor d, Tensor xmu)",
      {at::Tag::pt2_compliant_tag});

  // In place, nn.BatchNorm2d's running-statistics update for a float momentum: running_mean =
  // (1 - momentum) * running_mean + momentum * mean, running_var likewise with unbiased,
  // num_batches_tracked (int64, one element) += 1.
  m.def(
      "bn_running_update_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
      "Tensor mean, Tensor unbiased, float momentum) -> ()",
      {at::Tag::pt2_compliant_tag});

  // CPU only (csrc/cpu/max_pool_act.cpp): a ResNet stem's BN-apply + ReLU + max-pool in one pass.
  // output = max_pool2d(relu(input * scale[c] + shift[c]), kernel_size, stride, padding) (dilation 1,
  // floor mode; ATen's choice among equal maxima, NaN propagating); argmax: uint8, per output element
  // the window-local index (r * kW + s) of the element the max came from, 255 where its ReLU output is
  // <= 0 (no gradient passes). Both in input's memory format.
  m.def(
      "bn_act_max_pool(Tensor input, Tensor scale, Tensor shift, int[2] kernel_size, int[2] stride, "
      "int[2] padding) -> (Tensor output, Tensor argmax)",
      {at::Tag::pt2_compliant_tag});

  // The gradient of bn_act_max_pool's output w.r.t. the pre-activation z = input * scale + shift:
  // grad_output routed to the argmax elements (summed where windows overlap), 0 elsewhere. `input`
  // gives the shape, dtype and memory format of the result only.
  m.def(
      "max_pool_act_backward(Tensor grad_output, Tensor argmax, Tensor input, int[2] kernel_size, "
      "int[2] stride, int[2] padding) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // CPU only (csrc/cpu/winograd.cpp): dL/dU (as [P, Co, Ci], P = (tile+2)^2) of winograd_conv's transformed
  // weight U for grad_output [N, Co, H, W] and input [N, Ci, H, W] (3x3, stride 1, padding 1;
  // channels_last float32/float64), tiles `chunk` at a time; the weight gradient is G^T dL/dU G.
  m.def("winograd_weight_grad(Tensor grad_output, Tensor input, int chunk, int tile) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // CPU only (csrc/cpu/conv_weight_grad.cpp): the weight gradient [Co, Ci, kH, kW] (channels_last)
  // of conv2d(input, weight, stride, padding, dilation, groups=1) for grad_output, one GEMM per kernel
  // tap, taps in parallel. input [N, Ci, H, W] and grad_output [N, Co, Ho, Wo], one float dtype.
  m.def(
      "conv_weight_grad(Tensor grad_output, Tensor input, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // CPU only (csrc/cpu/winograd.cpp): act(conv3x3(input) + bias[c] + residual) with stride 1 and
  // padding 1 as a Winograd F(tile x tile, 3x3) convolution, tile 2 or 4. input: channels_last
  // [N, Ci, H, W] float32 or float64; weight: the transformed weight U = G w G^T as [P*Co, Ci, 1, 1],
  // P = (tile+2)^2 (dense, or prepacked by mkldnn::_reorder_convolution_weight for the channels_last
  // input [1, P*Ci, chunk, 1]); the tiles are processed `chunk` at a time. Returns channels_last
  // [N, Co, H, W].
  m.def(
      "winograd_conv(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, bool relu, int chunk, "
      "int tile) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
