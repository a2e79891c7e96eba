// resfuse::bn_act on CUDA: checks, layout, allocation and dtype dispatch to bn_act_cuda<T>
// (bn_act_kernel.cu: one vectorised pass, per-channel coefficients held in registers).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "../common/checks.h"
#include "../common/layout.h"
#include "bindings.cuh"
#include "bn_act_kernel.cuh"

namespace resfuse::cuda {
namespace {

at::Tensor bn_act_cuda_op(const at::Tensor& input_, const at::Tensor& scale_, const at::Tensor& shift_,
                          const std::optional<at::Tensor>& residual_,
                          const std::optional<at::Tensor>& res_scale_, bool relu) {
  constexpr const char* op = "resfuse::bn_act";
  check_bn_act_args(input_, scale_, shift_, residual_, res_scale_);
  check_cuda_tensor(op, "input", input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor residual = residual_ ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor scale = scale_.contiguous(), shift = shift_.contiguous();
  const at::Tensor res_scale = res_scale_ ? res_scale_->contiguous() : at::Tensor();
  at::Tensor out = empty_in_layout(input, layout);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using T = cuda_t<scalar_t>;
    const BnActParams p{act_shape(input, layout),
                        input.const_data_ptr(),
                        scale.const_data_ptr(),
                        shift.const_data_ptr(),
                        residual.defined() ? residual.const_data_ptr() : nullptr,
                        res_scale.defined() ? res_scale.const_data_ptr() : nullptr,
                        out.mutable_data_ptr(),
                        relu,
                        num_sms()};
    check_launch(op, bn_act_cuda<T>(p, at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_act", &bn_act_cuda_op);
}

}  // namespace resfuse::cuda
