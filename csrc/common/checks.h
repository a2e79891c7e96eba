#pragma once
// Argument checks shared by the CPU and CUDA bindings of every resfuse op. Each message names the op
// and the argument, e.g.
//   "resfuse::bn_act: residual must have the shape of input [2, 5, 7, 7], got [2, 5, 7, 8]".
// Memory layout is never an error: see layout.h (to_layout) for how other strides are accepted.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "layout.h"

namespace resfuse {

// dtype of the per-channel vectors (scale, shift, means, ...) and statistics for activations of
// dtype `act`: float64 for float64, float32 for float32, bfloat16 and float16.
inline at::ScalarType param_dtype(at::ScalarType act) {
  return act == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D [N, C, H, W] tensor, got ", t.dim(),
              "-D with shape ", t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
}

// The main activation of an op: 4-D and floating point.
inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  check_4d(op, name, t);
  check_floating(op, name, t);
}

// A secondary activation (grad_out, output, residual): same device, dtype and shape as `ref`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  check_same_device(op, name, t, ref_name, ref);
  check_same_dtype(op, name, t, ref_name, ref);
  check_same_shape(op, name, t, ref_name, ref);
}

// A per-channel vector for the activation `input`: shape [C], dtype param_dtype(input), same device.
inline void check_channel_vector(const char* op, const char* name, const at::Tensor& t,
                                 const at::Tensor& input) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [C] = [",
              channels, "] (C = input.size(1)), got ", t.sizes());
  const auto want = param_dtype(input.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, " for ",
              input.scalar_type(), " input, got ", t.scalar_type());
  check_same_device(op, name, t, "input", input);
}

// ---- Per-op argument rules (docs/architecture.md), one function per schema in csrc/ops.cpp ----

inline void check_bn_stats_args(const at::Tensor& input) {
  check_activation("resfuse::bn_stats", "input", input);
}

inline void check_bn_act_args(const at::Tensor& input, const at::Tensor& scale,
                              const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& res_scale) {
  constexpr const char* op = "resfuse::bn_act";
  check_activation(op, "input", input);
  check_channel_vector(op, "scale", scale, input);
  check_channel_vector(op, "shift", shift, input);
  if (residual) check_like(op, "residual", *residual, "input", input);
  if (res_scale) {
    TORCH_CHECK(residual.has_value(), op, ": res_scale is given but residual is None");
    check_channel_vector(op, "res_scale", *res_scale, input);
  }
}

// A per-image channel gate for the activation `input`: shape [N, C], dtype param_dtype(input), same device.
inline void check_gate(const char* op, const at::Tensor& gate, const at::Tensor& input) {
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == input.size(0) && gate.size(1) == input.size(1), op,
              ": gate must have shape [N, C] = [", input.size(0), ", ", input.size(1), "], got ", gate.sizes());
  const auto want = param_dtype(input.scalar_type());
  TORCH_CHECK(gate.scalar_type() == want, op, ": gate must be ", want, " for ", input.scalar_type(),
              " input, got ", gate.scalar_type());
  check_same_device(op, "gate", gate, "input", input);
}

inline void check_gate_act_args(const at::Tensor& input, const at::Tensor& gate,
                                const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "resfuse::gate_act";
  check_activation(op, "input", input);
  check_gate(op, gate, input);
  if (residual) check_like(op, "residual", *residual, "input", input);
}

// `output` is read only when relu is true (for the ReLU mask); it is not checked otherwise.
inline void check_gate_act_backward_args(const at::Tensor& grad_out, const at::Tensor& output,
                                         const std::optional<at::Tensor>& input, const at::Tensor& gate, bool relu) {
  constexpr const char* op = "resfuse::gate_act_backward";
  check_activation(op, "grad_out", grad_out);
  if (input) check_like(op, "input", *input, "grad_out", grad_out);
  if (relu) check_like(op, "output", output, "grad_out", grad_out);
  check_gate(op, gate, grad_out);
}

// `output` is read only when relu is true (for the ReLU mask); it is not checked otherwise.
inline void check_bn_act_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& output,
                                              const at::Tensor& input, const at::Tensor& mean,
                                              const std::optional<at::Tensor>& residual,
                                              const std::optional<at::Tensor>& res_mean,
                                              bool relu) {
  constexpr const char* op = "resfuse::bn_act_backward_reduce";
  check_activation(op, "input", input);
  check_like(op, "grad_out", grad_out, "input", input);
  if (relu) check_like(op, "output", output, "input", input);
  check_channel_vector(op, "mean", mean, input);
  TORCH_CHECK(residual.has_value() == res_mean.has_value(), op,
              ": residual and res_mean must be given together, got only ",
              residual ? "residual" : "res_mean");
  if (residual) {
    check_like(op, "residual", *residual, "input", input);
    check_channel_vector(op, "res_mean", *res_mean, input);
  }
}

inline void check_bn_act_backward_apply_args(
    const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& d,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_a,
    const std::optional<at::Tensor>& res_b, const std::optional<at::Tensor>& res_d, bool relu,
    bool residual_grad) {
  constexpr const char* op = "resfuse::bn_act_backward_apply";
  check_activation(op, "input", input);
  check_like(op, "grad_out", grad_out, "input", input);
  if (relu) check_like(op, "output", output, "input", input);
  check_channel_vector(op, "a", a, input);
  check_channel_vector(op, "b", b, input);
  check_channel_vector(op, "d", d, input);
  TORCH_CHECK(res_a.has_value() == res_b.has_value() && res_a.has_value() == res_d.has_value(), op,
              ": res_a, res_b and res_d must be given together or not at all");
  if (res_a) {
    check_channel_vector(op, "res_a", *res_a, input);
    check_channel_vector(op, "res_b", *res_b, input);
    check_channel_vector(op, "res_d", *res_d, input);
    TORCH_CHECK(residual.has_value() || !residual_grad, op,
                ": residual is required for grad_residual = res_a * dz + res_b * residual + res_d");
  }
  if (residual) check_like(op, "residual", *residual, "input", input);
}

// grad_input is written in place: dense NCHW or channels_last, and overlapping none of the read
// operands except by being one of them entirely (grad_out, when not accumulating).
inline void check_bn_act_backward_apply_inplace_args(
    const at::Tensor& grad_input, const at::Tensor& grad_out, const at::Tensor& output,
    const std::optional<at::Tensor>& input, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& d, bool relu, bool accumulate) {
  constexpr const char* op = "resfuse::bn_act_backward_apply_";
  check_activation(op, "grad_input", grad_input);
  TORCH_CHECK(grad_input.is_contiguous(memory_format(layout_of(grad_input))), op,
              ": grad_input must be dense NCHW or channels_last (it is written in place), got strides ",
              grad_input.strides());
  check_like(op, "grad_out", grad_out, "grad_input", grad_input);
  if (relu) check_like(op, "output", output, "grad_input", grad_input);
  if (input) check_like(op, "input", *input, "grad_input", grad_input);
  check_channel_vector(op, "a", a, grad_input);
  check_channel_vector(op, "b", b, grad_input);
  check_channel_vector(op, "d", d, grad_input);
  const bool same = grad_input.is_same(grad_out);
  TORCH_CHECK(!(same && accumulate), op, ": grad_input is grad_out; accumulate must be false");
  TORCH_CHECK(same || !grad_input.is_alias_of(grad_out), op,
              ": grad_input shares memory with grad_out without being the same tensor");
  TORCH_CHECK(!(relu && grad_input.is_alias_of(output)), op, ": grad_input shares memory with output");
  TORCH_CHECK(!(input && !grad_input.is_same(*input) && grad_input.is_alias_of(*input)), op,
              ": grad_input shares memory with input without being the same tensor");
}

// conv_weight_grad: the geometry, and grad_output of the convolution's output shape.
inline void check_conv_weight_grad_args(const at::Tensor& grad_output, const at::Tensor& input,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "resfuse::conv_weight_grad";
  check_activation(op, "input", input);
  check_activation(op, "grad_output", grad_output);
  check_same_device(op, "grad_output", grad_output, "input", input);
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have 2 elements each");
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0 && stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0, op,
                ": kernel_size, stride and dilation must be positive and padding non-negative, got ", kernel_size,
                ", ", stride, ", ", dilation, ", ", padding);
    out[d] = (input.size(2 + d) + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) / stride[d] + 1;
    TORCH_CHECK(out[d] > 0, op, ": kernel_size ", kernel_size, " (dilation ", dilation,
                ") is larger than the padded input ", input.sizes());
  }
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(2) == out[0] && grad_output.size(3) == out[1],
              op, ": grad_output must have shape [", input.size(0), ", Co, ", out[0], ", ", out[1],
              "] for input ", input.sizes(), ", got ", grad_output.sizes());
}

// Output size of a max-pool (dilation 1, floor mode) along one dimension of `size` elements.
inline int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

// A max-pool geometry of `input` (dilation 1, floor mode), as ATen's max_pool2d accepts it; the
// window-local argmax index must fit in a uint8 below 255 (255 marks "no gradient").
inline void check_pool_geometry(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have 2 elements each, got ", kernel_size, ", ", stride,
              ", ", padding);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0 && stride[d] > 0, op, ": kernel_size and stride must be positive, got ",
                kernel_size, " and ", stride);
    TORCH_CHECK(padding[d] >= 0 && 2 * padding[d] <= kernel_size[d], op,
                ": padding must be between 0 and half the kernel size, got padding ", padding,
                " for kernel_size ", kernel_size);
    TORCH_CHECK(input.size(2 + d) + 2 * padding[d] >= kernel_size[d], op, ": kernel_size ", kernel_size,
                " is larger than the padded input ", input.size(2), "x", input.size(3));
  }
  TORCH_CHECK(kernel_size[0] * kernel_size[1] <= 255, op, ": kernel_size ", kernel_size,
              " has more than 255 elements");
}

inline void check_bn_act_max_pool_args(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding) {
  constexpr const char* op = "resfuse::bn_act_max_pool";
  check_activation(op, "input", input);
  check_channel_vector(op, "scale", scale, input);
  check_channel_vector(op, "shift", shift, input);
  check_pool_geometry(op, input, kernel_size, stride, padding);
}

inline void check_max_pool_act_backward_args(const at::Tensor& grad_output, const at::Tensor& argmax,
                                             const at::Tensor& input, at::IntArrayRef kernel_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr const char* op = "resfuse::max_pool_act_backward";
  check_activation(op, "input", input);
  check_pool_geometry(op, input, kernel_size, stride, padding);
  const std::vector<int64_t> want{input.size(0), input.size(1),
                                  pooled_size(input.size(2), kernel_size[0], stride[0], padding[0]),
                                  pooled_size(input.size(3), kernel_size[1], stride[1], padding[1])};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(want), op, ": grad_output must have the pooled shape ",
              at::IntArrayRef(want), ", got ", grad_output.sizes());
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  check_same_device(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK(argmax.sizes() == grad_output.sizes(), op, ": argmax must have the pooled shape ",
              at::IntArrayRef(want), ", got ", argmax.sizes());
  TORCH_CHECK(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8 (from bn_act_max_pool), got ",
              argmax.scalar_type());
  check_same_device(op, "argmax", argmax, "input", input);
}

// Winograd F(m x m, 3x3) transforms (CPU): float32/float64 only; m = tile = 2 or 4.
inline void check_winograd_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// An activation the Winograd kernels read: 4-D, float32/float64, dense channels_last.
inline void check_winograd_activation(const char* op, const char* name, const at::Tensor& t) {
  check_4d(op, name, t);
  check_winograd_dtype(op, name, t);
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
              " must be dense channels_last, got strides ", t.strides());
}

inline void check_winograd_tile(const char* op, int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ", tile);
}

inline void check_winograd_weight_grad_args(const at::Tensor& grad_output, const at::Tensor& input,
                                            int64_t chunk, int64_t tile) {
  constexpr const char* op = "resfuse::winograd_weight_grad";
  check_winograd_tile(op, tile);
  check_winograd_activation(op, "input", input);
  check_4d(op, "grad_output", grad_output);
  check_same_device(op, "grad_output", grad_output, "input", input);
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(2) == input.size(2) &&
                  grad_output.size(3) == input.size(3),
              op, ": grad_output must have shape [", input.size(0), ", Co, ", input.size(2), ", ", input.size(3),
              "] (3x3, stride 1, padding 1), got ", grad_output.sizes());
  check_winograd_activation(op, "grad_output", grad_output);
  TORCH_CHECK(chunk > 0, op, ": chunk must be positive, got ", chunk);
}

inline void check_winograd_conv_args(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual, int64_t chunk, int64_t tile) {
  constexpr const char* op = "resfuse::winograd_conv";
  check_winograd_activation(op, "input", input);
  check_winograd_tile(op, tile);
  const int64_t P = (tile + 2) * (tile + 2);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) % P == 0 && weight.size(1) == input.size(1) &&
                  weight.size(2) == 1 && weight.size(3) == 1,
              op, ": weight must be the transformed weight [", P, "*Co, Ci, 1, 1] (tile ", tile, ") with Ci = ",
              input.size(1), ", got ", weight.sizes());
  check_same_dtype(op, "weight", weight, "input", input);
  TORCH_CHECK(chunk > 0, op, ": chunk must be positive, got ", chunk);
  const int64_t co = weight.size(0) / P;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == co, op, ": bias must have shape [Co] = [", co,
                "], got ", bias->sizes());
    check_same_dtype(op, "bias", *bias, "input", input);
    check_same_device(op, "bias", *bias, "input", input);
  }
  if (residual) {
    const std::vector<int64_t> want{input.size(0), co, input.size(2), input.size(3)};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(want), op, ": residual must have shape ",
                at::IntArrayRef(want), ", got ", residual->sizes());
    check_same_dtype(op, "residual", *residual, "input", input);
    check_same_device(op, "residual", *residual, "input", input);
  }
}

}  // namespace resfuse
