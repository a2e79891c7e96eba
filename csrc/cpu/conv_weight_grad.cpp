// resfuse::conv_weight_grad on CPU: the weight gradient of a one-group convolution of channels_last
// activations, one GEMM per kernel tap, written into that tap's slice of a channels_last gradient:
//
//   gw[:, i, j, :] = gy[:, rows, cols, :]^T @ x[:, shifted rows, shifted cols, :]     [Co, K] @ [K, Ci]
//
// where rows x cols are the output positions whose input under tap (i, j) lies inside the image (none:
// the slice is zero). No im2col buffer: at most one x- and one gy-sized slice copy per thread at a
// time (oneDNN's weight gradient holds ~3 weight-sized buffers).
//
// The taps — each split into `co_parts` ranges of output channels when there are fewer taps than
// twice the threads — run in parallel, each GEMM single-threaded on its own slices: a few large GEMMs
// scale with the threads where one multi-threaded GEMM per tap did not (512x512 3x3 on a 7x7 map at
// batch 8, 2-core EPYC, 2 threads: 10.4 ms here, 13.3 ms with per-tap multi-threaded GEMMs).

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"

namespace resfuse::cpu {
namespace {

// Outputs [lo, hi) along one dimension whose input under tap `tap` is inside [0, size), and the
// input index of the first; hi <= lo when there are none.
struct TapRange {
  int64_t lo, hi, first;
};

TapRange tap_range(int64_t tap, int64_t size, int64_t out_size, int64_t stride, int64_t padding,
                   int64_t dilation) {
  const int64_t off = tap * dilation - padding;  // input index of output 0 under this tap
  const int64_t lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  const int64_t hi = std::min(out_size, off >= size ? int64_t{0} : (size - 1 - off) / stride + 1);
  return {lo, hi, lo * stride + off};
}

at::Tensor conv_weight_grad_cpu(const at::Tensor& grad_output_, const at::Tensor& input_,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  check_conv_weight_grad_args(grad_output_, input_, kernel_size, stride, padding, dilation);
  // the GEMMs below are this kernel's implementation, not ops to record (operands may require grad)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input_.contiguous(cl).permute({0, 2, 3, 1});        // [N, H, W, Ci] dense
  const at::Tensor gy = grad_output_.contiguous(cl).permute({0, 2, 3, 1});  // [N, Ho, Wo, Co] dense
  const int64_t Ci = x.size(3), Co = gy.size(3), kh = kernel_size[0], kw = kernel_size[1];
  at::Tensor gw = at::empty({Co, kh, kw, Ci}, x.options());

  const int64_t taps = kh * kw, threads = at::get_num_threads();
  const int64_t co_parts = std::clamp<int64_t>((2 * threads + taps - 1) / taps, 1, std::max<int64_t>(Co / 32, 1));
  const int64_t co_step = (Co + co_parts - 1) / co_parts;
  at::parallel_for(0, taps * co_parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tap = t / co_parts, co0 = (t % co_parts) * co_step, co1 = std::min(Co, co0 + co_step);
      if (co0 >= co1) continue;
      const int64_t i = tap / kw, j = tap % kw;
      at::Tensor out = gw.select(1, i).select(1, j).slice(0, co0, co1);  // [co, Ci], row stride kh*kw*Ci
      const TapRange r = tap_range(i, x.size(1), gy.size(1), stride[0], padding[0], dilation[0]);
      const TapRange c = tap_range(j, x.size(2), gy.size(2), stride[1], padding[1], dilation[1]);
      if (r.hi <= r.lo || c.hi <= c.lo) {
        out.zero_();
        continue;
      }
      const at::Tensor xs = x.slice(1, r.first, r.first + (r.hi - r.lo - 1) * stride[0] + 1, stride[0])
                                .slice(2, c.first, c.first + (c.hi - c.lo - 1) * stride[1] + 1, stride[1]);
      const at::Tensor gs = gy.slice(1, r.lo, r.hi).slice(2, c.lo, c.hi).slice(3, co0, co1);
      // reshape: a view where the slice is already a matrix, else one copy on this thread
      at::mm_out(out, gs.reshape({-1, co1 - co0}).t(), xs.reshape({-1, Ci}));
    }
  });
  return gw.permute({0, 3, 1, 2});
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("conv_weight_grad", &conv_weight_grad_cpu);
}

}  // namespace resfuse::cpu
