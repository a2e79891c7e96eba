// resfuse::bn_stats on CUDA: checks, layout, allocation and dtype dispatch to bn_stats_cuda<T>
// (bn_act_kernel.cu: Welford per thread, Chan merges, two deterministic passes).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "bindings.cuh"
#include "bn_act_kernel.cuh"

namespace resfuse::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda_op(const at::Tensor& input_) {
  constexpr const char* op = "resfuse::bn_stats";
  check_bn_stats_args(input_);
  check_cuda_tensor(op, "input", input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const auto param = input.options().dtype(param_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({input.size(1)}, param), var = at::empty({input.size(1)}, param);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using T = cuda_t<scalar_t>;
    BnStatsParams p{act_shape(input, layout), input.const_data_ptr(), mean.mutable_data_ptr(),
                    var.mutable_data_ptr(), nullptr, num_sms()};
    const at::Tensor workspace = at::empty({bn_stats_workspace_elems<T>(p)}, param);
    p.workspace = workspace.mutable_data_ptr();
    check_launch(op, bn_stats_cuda<T>(p, at::cuda::getCurrentCUDAStream()));
  });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda_op);
}

}  // namespace resfuse::cuda
