// resfuse::bn_act_backward_reduce and resfuse::bn_act_backward_apply on CUDA: checks, layout,
// allocation and dtype dispatch to the launchers of bn_act_kernel.cuh. The ReLU mask is the select
// of ATen's threshold_backward (output <= 0 -> 0), as in the reference and CPU kernels.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "bindings.cuh"
#include "bn_act_kernel.cuh"

namespace resfuse::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cuda_op(
    const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_, const at::Tensor& mean_,
    const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& res_mean_, bool relu) {
  constexpr const char* op = "resfuse::bn_act_backward_reduce";
  check_bn_act_backward_reduce_args(grad_out_, output_, input_, mean_, residual_, res_mean_, relu);
  check_cuda_tensor(op, "input", input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor grad_out = to_layout(grad_out_, layout);
  const at::Tensor output = relu ? to_layout(output_, layout) : at::Tensor();
  const at::Tensor residual = residual_ ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor mean = mean_.contiguous();
  const at::Tensor res_mean = res_mean_ ? res_mean_->contiguous() : at::Tensor();
  const int64_t C = input.size(1);
  const auto param = input.options().dtype(param_dtype(input.scalar_type()));
  at::Tensor sum_dz = at::empty({C}, param), sum_dz_xmu = at::empty({C}, param);
  at::Tensor sum_dz_rmu = at::empty({residual.defined() ? C : 0}, param);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using T = cuda_t<scalar_t>;
    BnBackwardReduceParams p{act_shape(input, layout),
                             grad_out.const_data_ptr(),
                             output.defined() ? output.const_data_ptr() : nullptr,
                             input.const_data_ptr(),
                             mean.const_data_ptr(),
                             residual.defined() ? residual.const_data_ptr() : nullptr,
                             res_mean.defined() ? res_mean.const_data_ptr() : nullptr,
                             sum_dz.mutable_data_ptr(),
                             sum_dz_xmu.mutable_data_ptr(),
                             residual.defined() ? sum_dz_rmu.mutable_data_ptr() : nullptr,
                             nullptr,
                             relu,
                             num_sms()};
    const at::Tensor workspace = at::empty({bn_backward_reduce_workspace_elems<T>(p)}, param);
    p.workspace = workspace.mutable_data_ptr();
    check_launch(op, bn_backward_reduce_cuda<T>(p, at::cuda::getCurrentCUDAStream()));
  });
  return {sum_dz, sum_dz_xmu, sum_dz_rmu};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_cuda_op(
    const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_, const at::Tensor& a_,
    const at::Tensor& b_, const at::Tensor& d_, const std::optional<at::Tensor>& residual_,
    const std::optional<at::Tensor>& res_a_, const std::optional<at::Tensor>& res_b_,
    const std::optional<at::Tensor>& res_d_, bool relu, bool residual_grad) {
  constexpr const char* op = "resfuse::bn_act_backward_apply";
  check_bn_act_backward_apply_args(grad_out_, output_, input_, a_, b_, d_, residual_, res_a_, res_b_, res_d_,
                                   relu, residual_grad);
  check_cuda_tensor(op, "input", input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor grad_out = to_layout(grad_out_, layout);
  const at::Tensor output = relu ? to_layout(output_, layout) : at::Tensor();
  // residual is read only for grad_residual = res_a * dz + res_b * residual + res_d.
  const bool res_coef = residual_grad && res_a_.has_value();
  const at::Tensor residual = res_coef ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor a = a_.contiguous(), b = b_.contiguous(), d = d_.contiguous();
  const at::Tensor res_a = res_coef ? res_a_->contiguous() : at::Tensor();
  const at::Tensor res_b = res_coef ? res_b_->contiguous() : at::Tensor();
  const at::Tensor res_d = res_coef ? res_d_->contiguous() : at::Tensor();
  at::Tensor grad_input = empty_in_layout(input, layout);
  at::Tensor grad_residual = residual_grad ? empty_in_layout(input, layout) : at::empty({0}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using T = cuda_t<scalar_t>;
    const BnBackwardApplyParams p{act_shape(input, layout),
                                  grad_out.const_data_ptr(),
                                  output.defined() ? output.const_data_ptr() : nullptr,
                                  input.const_data_ptr(),
                                  a.const_data_ptr(),
                                  b.const_data_ptr(),
                                  d.const_data_ptr(),
                                  residual.defined() ? residual.const_data_ptr() : nullptr,
                                  res_a.defined() ? res_a.const_data_ptr() : nullptr,
                                  res_b.defined() ? res_b.const_data_ptr() : nullptr,
                                  res_d.defined() ? res_d.const_data_ptr() : nullptr,
                                  grad_input.mutable_data_ptr(),
                                  residual_grad ? grad_residual.mutable_data_ptr() : nullptr,
                                  relu,
                                  num_sms()};
    check_launch(op, bn_backward_apply_cuda<T>(p, at::cuda::getCurrentCUDAStream()));
  });
  return {grad_input, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda_op);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cuda_op);
}

}  // namespace resfuse::cuda
