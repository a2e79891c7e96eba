// CUDA-only fused convolutions (conv_kernel.cu): the schemas, argument checks, allocation and dtype
// dispatch. Both ops compute in NHWC: an input in another memory format is copied to channels_last
// once, and the outputs are always channels_last. groups = 1; sm_80 or newer.
//
//   cuda_conv_bias_act(x, w, scale?, bias?, stride, padding, dilation, residual?, relu) -> y
//       y = act(conv2d(x, w) * scale[k] + bias[k] + residual)     (inference, BN folded or not)
//   cuda_conv_stats(x, w, stride, padding, dilation) -> (y, mean, var)
//       y = conv2d(x, w) and the per-channel mean / biased variance of y as stored (training)
//
// x [N, C, H, W], w [K, C, R, S] and residual [N, K, P, Q] share x's dtype (float32, float64,
// bfloat16, float16); scale, bias, mean, var are [K] float32 (float64 for float64).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "bindings.cuh"
#include "conv_kernel.cuh"

namespace resfuse::cuda {
namespace {

// Checks x, w and the geometry and returns the launch parameters (pointers still unset). Runs under
// a device guard for x (the caller checked that x is a CUDA tensor).
ConvParams conv_params(const char* op, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_activation(op, "x", x);
  TORCH_CHECK(w.dim() == 4, op, ": w must be a 4-D [K, C, R, S] tensor, got shape ", w.sizes());
  check_same_device(op, "w", w, "x", x);
  check_same_dtype(op, "w", w, "x", x);
  TORCH_CHECK(w.size(1) == x.size(1), op, ": w must have x.size(1) = ", x.size(1),
              " input channels (groups = 1), got w of shape ", w.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, ",
              props->name, " is ", props->major, ".", props->minor);

  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = w.size(0), R = w.size(2), S = w.size(3);
  const int64_t P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) / stride[0] + 1;
  const int64_t Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(R >= 1 && S >= 1 && P >= 1 && Q >= 1, op, ": output size is empty: x ", x.sizes(), ", w ",
              w.sizes(), ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  // The kernel indexes output pixels, filter taps and image coordinates in 32 bits (memory offsets
  // in 64); coordinates stay below 2^29 so that its out-of-image sentinel (-2^30) cannot wrap.
  constexpr int64_t kCoordLimit = int64_t(1) << 29;
  TORCH_CHECK(N * P * Q <= INT_MAX && R * S * C <= INT_MAX && K <= INT_MAX &&
                  H + 2 * padding[0] + dilation[0] * R <= kCoordLimit &&
                  W + 2 * padding[1] + dilation[1] * S <= kCoordLimit,
              op, ": sizes exceed the 32-bit index range of the kernel: x ", x.sizes(), ", w ", w.sizes(),
              ", padding ", padding, ", dilation ", dilation);

  ConvParams p{};
  p.N = int(N), p.H = int(H), p.W = int(W), p.C = int(C);
  p.K = int(K), p.R = int(R), p.S = int(S), p.P = int(P), p.Q = int(Q);
  p.stride_h = int(stride[0]), p.stride_w = int(stride[1]);
  p.pad_h = int(padding[0]), p.pad_w = int(padding[1]);
  p.dil_h = int(dilation[0]), p.dil_w = int(dilation[1]);
  return p;
}

at::Tensor output_like(const at::Tensor& x, const ConvParams& p) {
  return at::empty({p.N, p.K, p.P, p.Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor cuda_conv_bias_act(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& scale_,
                              const std::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              const std::optional<at::Tensor>& residual_, bool relu) {
  constexpr const char* op = "resfuse::cuda_conv_bias_act";
  check_cuda_tensor(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  ConvParams p = conv_params(op, x_, w_, stride, padding, dilation);
  const at::Tensor x = to_layout(x_, Layout::NHWC), w = to_layout(w_, Layout::NHWC);
  at::Tensor y = output_like(x, p);
  const auto check_vector = [&](const char* name, const std::optional<at::Tensor>& v) {
    if (!v) return at::Tensor();
    TORCH_CHECK(v->dim() == 1 && v->size(0) == p.K, op, ": ", name, " must have shape [K] = [", p.K,
                "] (K = w.size(0)), got ", v->sizes());
    const auto want = param_dtype(x.scalar_type());
    TORCH_CHECK(v->scalar_type() == want, op, ": ", name, " must be ", want, " for ", x.scalar_type(),
                " x, got ", v->scalar_type());
    check_same_device(op, name, *v, "x", x);
    return v->contiguous();
  };
  const at::Tensor scale = check_vector("scale", scale_), bias = check_vector("bias", bias_);
  at::Tensor residual;
  if (residual_) {
    check_like(op, "residual", *residual_, "the output", y);
    residual = to_layout(*residual_, Layout::NHWC);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = cuda_t<scalar_t>;
    p.x = x.const_data_ptr();
    p.w = w.const_data_ptr();
    p.scale = scale.defined() ? scale.const_data_ptr() : nullptr;
    p.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
    p.residual = residual.defined() ? residual.const_data_ptr() : nullptr;
    p.y = y.mutable_data_ptr();
    p.relu = relu;
    check_launch(op, conv_bias_act_cuda<T>(p, at::cuda::getCurrentCUDAStream()));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_conv_stats(const at::Tensor& x_, const at::Tensor& w_,
                                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                                               at::IntArrayRef dilation) {
  constexpr const char* op = "resfuse::cuda_conv_stats";
  check_cuda_tensor(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  ConvParams p = conv_params(op, x_, w_, stride, padding, dilation);
  const at::Tensor x = to_layout(x_, Layout::NHWC), w = to_layout(w_, Layout::NHWC);
  at::Tensor y = output_like(x, p);
  const auto param = x.options().dtype(param_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({p.K}, param), var = at::empty({p.K}, param);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using T = cuda_t<scalar_t>;
    p.x = x.const_data_ptr();
    p.w = w.const_data_ptr();
    p.y = y.mutable_data_ptr();
    p.mean = mean.mutable_data_ptr();
    p.var = var.mutable_data_ptr();
    const at::Tensor workspace = at::empty({conv_workspace_elems<T>(p, /*stats=*/true)}, param);
    p.workspace = workspace.mutable_data_ptr();
    check_launch(op, conv_stats_cuda<T>(p, at::cuda::getCurrentCUDAStream()));
  });
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resfuse, m) {
  m.def(
      "cuda_conv_bias_act(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, Tensor? residual, bool relu) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "cuda_conv_stats(Tensor x, Tensor w, int[2] stride, int[2] padding, int[2] dilation) "
      "-> (Tensor y, Tensor mean, Tensor var)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("cuda_conv_bias_act", &cuda_conv_bias_act);
  m.impl("cuda_conv_stats", &cuda_conv_stats);
}

}  // namespace resfuse::cuda
