// resfuse::conv_weight_grad on CPU: the weight gradient of a one-group convolution of channels_last
// activations, one GEMM per kernel tap, written into that tap's slice of a channels_last gradient:
//
//   gw[:, i, j, :] = gy[:, rows, cols, :]^T @ x[:, shifted rows, shifted cols, :]     [Co, K] @ [K, Ci]
//
// where rows x cols are the output positions whose input under tap (i, j) lies inside the image (none:
// the slice is zero). No im2col buffer: a tap's K positions are taken a few images (or rows of one
// image) at a time, each piece gathered (where it is not already a matrix view) into small
// per-thread buffers and accumulated into the tap's slice of gw — so besides gw the kernel holds
// little (1.2 MiB for 256 channels on a 14x14 map at batch 8, 2 threads, where oneDNN's weight
// gradient holds ~2 weight-sized buffers, 4.3 MiB; gathering a whole tap at once held an x- and a
// gy-sized copy per thread, 23 MiB on a 28x28 map), and the GEMMs read operands still in cache.
// bf16 / fp16 pieces are gathered as float32 and summed in float32, rounded once at the end.
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

// A piece of a tap's positions (the GEMM's K) gathered at a time: kSliceBytes of x and gy slices, or
// kMinPositions positions where that is more — each piece's GEMM reads and writes the tap's [co, Ci]
// slice of gw, so a short K makes it memory-bound (a 1x1 stride-2 2048x1024 layer on a 7x7 map: 0.96x
// oneDNN's time with 42-position pieces, 0.78x with 512). Measured over ResNet shapes at batch 8, 2
// threads: within noise of gathering the whole tap at once, or faster (0.74x on a 64-channel 56x56 map).
constexpr int64_t kSliceBytes = 256 << 10;
constexpr int64_t kMinPositions = 512;

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

  const bool reduced = x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble;
  const int64_t taps = kh * kw, threads = at::get_num_threads();
  const int64_t max_parts = std::max<int64_t>(Co / 32, 1);
  int64_t co_parts = std::clamp<int64_t>((2 * threads + taps - 1) / taps, 1, max_parts);
  // whole tasks per thread where that keeps >= 128 output channels per GEMM (a 3x3 layer on 2
  // threads: 18 tasks instead of 9, so no thread runs a tap more than the other)
  while ((taps * co_parts) % threads != 0 && co_parts < max_parts && Co / (co_parts + 1) >= 128) ++co_parts;
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
      // a piece of the tap's K positions at a time: a few whole images, or rows of one image, within
      // kSliceBytes; reshape gives a view where a piece is already a matrix (all of the centre tap of
      // a stride-1 convolution, then one GEMM), else a copy on this thread
      const int64_t n = x.size(0), rows = r.hi - r.lo, cols = c.hi - c.lo;
      const int64_t target = std::max(kMinPositions, kSliceBytes / ((Ci + co1 - co0) * x.element_size()));
      const bool view = gs.is_contiguous() && xs.is_contiguous();
      const int64_t images = view ? n : std::clamp<int64_t>(target / (rows * cols), 1, n);
      const int64_t rows_per = view ? rows : std::clamp<int64_t>(target / cols, 1, rows);
      // bf16 / fp16: the pieces are gathered as float32 and summed in a float32 [co, Ci] buffer
      at::Tensor acc = reduced ? at::empty({co1 - co0, Ci}, x.options().dtype(at::kFloat)) : out;
      for (int64_t n0 = 0; n0 < n; n0 += images) {
        for (int64_t h0 = 0; h0 < rows; h0 += rows_per) {
          const int64_t n1 = std::min(n, n0 + images), h1 = std::min(rows, h0 + rows_per);
          at::Tensor gp = gs.slice(0, n0, n1).slice(1, h0, h1), xp = xs.slice(0, n0, n1).slice(1, h0, h1);
          if (reduced) {
            gp = gp.to(at::kFloat);
            xp = xp.to(at::kFloat);
          }
          gp = gp.reshape({-1, co1 - co0}).t();
          xp = xp.reshape({-1, Ci});
          if (n0 == 0 && h0 == 0) {
            at::mm_out(acc, gp, xp);
          } else {
            acc.addmm_(gp, xp);
          }
        }
      }
      if (reduced) out.copy_(acc);
    }
  });
  return gw.permute({0, 3, 1, 2});
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("conv_weight_grad", &conv_weight_grad_cpu);
}

}  // namespace resfuse::cpu
