// resfuse::winograd_conv on CPU: a 3x3 convolution (stride 1, padding 1, dilation 1, one group) of
// channels_last activations as Winograd F(2x2, 3x3), with bias, residual add and ReLU fused into its
// output transform:
//
//   V[t, p, :] = (B^T d_t B)[p]           d_t: the 4x4 input tile t (zero outside the image)
//   M[t, p, :] = V[t, p, :] @ U[p]        U = G w G^T, 16 x [Ci, Co], transformed once per weight
//   y_t        = A^T M[t] A               the 2x2 output block of tile t (+ bias, residual, ReLU)
//
// with B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], A^T = [[1,1,1,0],[0,1,-1,-1]]. Tile t =
// (n, i, j) covers input rows 2i-1 .. 2i+2 and columns 2j-1 .. 2j+2, output rows 2i, 2i+1 and
// columns 2j, 2j+1 (cropped at an odd edge). The 16 GEMMs cost 16/36 of the direct convolution's
// multiply-adds; the transforms only add and subtract, so the result rounds like the direct sum
// (measured ~4e-7 relative in fp32, as oneDNN's direct convolution).
//
// V and M are tile-major ([T, 16, C]): read as a channels_last [1, 16*C, T, 1] image, the 16 GEMMs
// are one 16-group 1x1 convolution, which oneDNN (mkldnn::_convolution_pointwise, called through the
// dispatcher, with the weight prepacked by the caller) runs at 82-99 GFLOP/s here against 68-73 for
// batched MKL GEMMs (2-core AMD EPYC, 1 thread). The tiles go through in chunks of `chunk`, so V and M
// of a chunk stay in cache between the three steps: without chunking the transforms of a 4x64x56x56
// input took 2-3x longer (V alone is 13 MB there).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/checks.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

struct Tiles {
  int64_t N, H, W, th, tw, T;
  Tiles(int64_t n, int64_t h, int64_t w)
      : N(n), H(h), W(w), th((h + 1) / 2), tw((w + 1) / 2), T(n * ((h + 1) / 2) * ((w + 1) / 2)) {}
};

// Tiles [t0, t1) of the image into v (row t - base of the chunk buffer); tiles past the last are zero.
template <typename scalar_t>
void input_tiles(const scalar_t* x, scalar_t* v, const Tiles g, int64_t C, int64_t t0, int64_t t1,
                 int64_t base) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kV = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    scalar_t* vt = v + (t - base) * 16 * C;
    if (t >= g.T) {
      std::fill(vt, vt + 16 * C, scalar_t(0));
      continue;
    }
    const int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    int64_t row_off[4];  // offset of (row 2i-1+a, column 2j-1), used only when in bounds
    bool row_ok[4], col_ok[4];
    for (int a = 0; a < 4; ++a) {
      const int64_t r = 2 * i - 1 + a, q = 2 * j - 1 + a;
      row_ok[a] = r >= 0 && r < g.H;
      col_ok[a] = q >= 0 && q < g.W;
      row_off[a] = ((n * g.H + r) * g.W + (2 * j - 1)) * C;
    }
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t k = std::min<int64_t>(kV, C - c);
      Vec d[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          d[a][b] = row_ok[a] && col_ok[b] ? Vec::loadu(x + (row_off[a] + b * C + c), k) : Vec(0);
        }
      }
      Vec u[4][4];  // B^T d
      for (int b = 0; b < 4; ++b) {
        u[0][b] = d[0][b] - d[2][b];
        u[1][b] = d[1][b] + d[2][b];
        u[2][b] = d[2][b] - d[1][b];
        u[3][b] = d[1][b] - d[3][b];
      }
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        const Vec r[4] = {u[a][0] - u[a][2], u[a][1] + u[a][2], u[a][2] - u[a][1], u[a][1] - u[a][3]};
        for (int b = 0; b < 4; ++b) r[b].store(vt + (a * 4 + b) * C + c, k);
      }
    }
  }
}

// Tiles [t0, t1) from m (row t - base of the chunk's GEMM output, row stride m_stride) into y.
template <typename scalar_t, bool kBias, bool kRes, bool kRelu>
void output_tiles(const scalar_t* m, int64_t m_stride, const scalar_t* bias, const scalar_t* res, scalar_t* y,
                  const Tiles g, int64_t C, int64_t t0, int64_t t1, int64_t base) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kV = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* mt = m + (t - base) * m_stride;
    const int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const int rows = 2 * i + 1 < g.H ? 2 : 1, cols = 2 * j + 1 < g.W ? 2 : 1;
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t k = std::min<int64_t>(kV, C - c);
      Vec s[2][4];  // A^T M
      for (int b = 0; b < 4; ++b) {
        const Vec m0 = Vec::loadu(mt + (0 * 4 + b) * C + c, k);
        const Vec m1 = Vec::loadu(mt + (1 * 4 + b) * C + c, k);
        const Vec m2 = Vec::loadu(mt + (2 * 4 + b) * C + c, k);
        const Vec m3 = Vec::loadu(mt + (3 * 4 + b) * C + c, k);
        s[0][b] = m0 + m1 + m2;
        s[1][b] = m1 - m2 - m3;
      }
      const Vec bv = kBias ? Vec::loadu(bias + c, k) : Vec(0);
      for (int a = 0; a < rows; ++a) {
        const Vec out[2] = {s[a][0] + s[a][1] + s[a][2], s[a][1] - s[a][2] - s[a][3]};
        for (int b = 0; b < cols; ++b) {
          const int64_t pos = ((n * g.H + 2 * i + a) * g.W + 2 * j + b) * C + c;
          Vec o = out[b];
          if constexpr (kBias) o = o + bv;
          if constexpr (kRes) o = o + Vec::loadu(res + pos, k);
          if constexpr (kRelu) o = at::vec::maximum(o, Vec(0));  // propagates NaN
          o.store(y + pos, k);
        }
      }
    }
  }
}

// Tiles [t0, t1) of the output gradient gy into m (row t - base): M_t = A g_t A^T, g_t the 2x2 output
// block of tile t (zero past an odd edge), A = [[1,0],[1,1],[1,-1],[0,-1]] — the adjoint of the output
// transform, so that dL/dU[p] = sum_t V_t[p]^T M_t[p] (see winograd_weight_grad_cpu).
template <typename scalar_t>
void grad_tiles(const scalar_t* gy, scalar_t* m, const Tiles g, int64_t C, int64_t t0, int64_t t1, int64_t base) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kV = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    scalar_t* mt = m + (t - base) * 16 * C;
    const int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const bool row1 = 2 * i + 1 < g.H, col1 = 2 * j + 1 < g.W;
    const int64_t off = ((n * g.H + 2 * i) * g.W + 2 * j) * C;
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t k = std::min<int64_t>(kV, C - c);
      const Vec d00 = Vec::loadu(gy + off + c, k);
      const Vec d01 = col1 ? Vec::loadu(gy + off + C + c, k) : Vec(0);
      const Vec d10 = row1 ? Vec::loadu(gy + off + g.W * C + c, k) : Vec(0);
      const Vec d11 = row1 && col1 ? Vec::loadu(gy + off + (g.W + 1) * C + c, k) : Vec(0);
      const Vec r[4][2] = {{d00, d01}, {d00 + d10, d01 + d11}, {d00 - d10, d01 - d11}, {Vec(0) - d10, Vec(0) - d11}};
      for (int a = 0; a < 4; ++a) {
        const Vec out[4] = {r[a][0], r[a][0] + r[a][1], r[a][0] - r[a][1], Vec(0) - r[a][1]};
        for (int b = 0; b < 4; ++b) out[b].store(mt + (a * 4 + b) * C + c, k);
      }
    }
  }
}

// The 16-group 1x1 convolution v [1, 16*Ci, Tc, 1] (channels_last) x weight [16*Co, Ci, 1, 1]
// (dense or oneDNN-packed) through the mkldnn op (ATen for float64); returns [1, 16*Co, Tc, 1]
// channels_last.
at::Tensor grouped_gemm(const at::Tensor& v, const at::Tensor& weight) {
  if (v.scalar_type() == at::kDouble) {  // oneDNN has no float64 convolution (float64: tests only)
    return at::conv2d(v, weight, std::optional<at::Tensor>(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                      at::IntArrayRef{1, 1}, 16)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  torch::jit::Stack stack{v, weight, c10::IValue(), zeros, ones, ones, int64_t{16}, std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor winograd_conv_cpu(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                             bool relu, int64_t chunk) {
  check_winograd_conv_args(input, weight, bias, residual, chunk);
  const int64_t N = input.size(0), C = input.size(1), Co = weight.size(0) / 16;
  const Tiles g(N, input.size(2), input.size(3));
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor rc = residual ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor y = at::empty({N, Co, g.H, g.W}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor v = at::empty({chunk, 16, C}, input.options());  // reused by every chunk
  const at::Tensor v_img = v.view({1, chunk, 1, 16 * C}).permute({0, 3, 1, 2});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "resfuse::winograd_conv", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = residual ? rc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for (int64_t base = 0; base < g.T; base += chunk) {
      at::parallel_for(base, base + chunk, grain_for(16 * C), [&](int64_t t0, int64_t t1) {
        input_tiles<scalar_t>(x, vp, g, C, t0, t1, base);
      });
      const at::Tensor m = grouped_gemm(v_img, weight);  // [1, 16*Co, chunk, 1] channels_last
      TORCH_CHECK(m.is_contiguous(at::MemoryFormat::ChannelsLast) && m.size(2) == chunk,
                  "resfuse::winograd_conv: unexpected GEMM output ", m.sizes(), " ", m.strides());
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const int64_t end = std::min(base + chunk, g.T);
      value_switch<false, true>(bias.has_value(), [&](auto bias_c) {
        value_switch<false, true>(residual.has_value(), [&](auto res_c) {
          value_switch<false, true>(relu, [&](auto relu_c) {
            at::parallel_for(base, end, grain_for(16 * Co), [&](int64_t t0, int64_t t1) {
              output_tiles<scalar_t, decltype(bias_c)::value, decltype(res_c)::value, decltype(relu_c)::value>(
                  mp, 16 * Co, bp, rp, yp, g, Co, t0, t1, base);
            });
          });
        });
      });
    }
  });
  return y;
}

// dL/dU, as [16, Co, Ci], of winograd_conv's U for the output gradient grad_output: with V_t
// (input_tiles) and M_t (grad_tiles) of each tile, dL/dU[p]^T = sum_t M_t[p]^T V_t[p] — 16 GEMMs of
// [Co, Tc] x [Tc, Ci] per chunk of Tc tiles, accumulated over the chunks, the 16 run in parallel (each
// single-threaded).
// The weight gradient is G^T dL/dU G (resfuse/cpu_conv.py): 16 GEMMs over T tiles against 9 over
// 4T output positions for the direct weight gradient.
at::Tensor winograd_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input, int64_t chunk) {
  check_winograd_weight_grad_args(grad_output, input, chunk);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs implement this op
  const int64_t N = input.size(0), Ci = input.size(1), Co = grad_output.size(1);
  const Tiles g(N, input.size(2), input.size(3));
  chunk = std::min(chunk, g.T);
  at::Tensor v = at::empty({chunk, 16, Ci}, input.options());
  at::Tensor m = at::empty({chunk, 16, Co}, input.options());
  at::Tensor du = at::zeros({16, Co, Ci}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "resfuse::winograd_weight_grad", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* gy = grad_output.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    scalar_t* mp = m.mutable_data_ptr<scalar_t>();
    for (int64_t base = 0; base < g.T; base += chunk) {
      const int64_t rows = std::min(chunk, g.T - base);
      at::parallel_for(base, base + rows, grain_for(16 * (Ci + Co)), [&](int64_t t0, int64_t t1) {
        input_tiles<scalar_t>(x, vp, g, Ci, t0, t1, base);
        grad_tiles<scalar_t>(gy, mp, g, Co, t0, t1, base);
      });
      const at::Tensor vr = v.narrow(0, 0, rows), mr = m.narrow(0, 0, rows);
      at::parallel_for(0, 16, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) du.select(0, p).addmm_(mr.select(1, p).t(), vr.select(1, p));
      });
    }
  });
  return du;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("winograd_conv", &winograd_conv_cpu);
  m.impl("winograd_weight_grad", &winograd_weight_grad_cpu);
}

// A prepacked (oneDNN "mkldnn" layout) weight dispatches here; the activations are plain CPU tensors.
TORCH_LIBRARY_IMPL(resfuse, MkldnnCPU, m) {
  m.impl("winograd_conv", &winograd_conv_cpu);
}

}  // namespace resfuse::cpu
