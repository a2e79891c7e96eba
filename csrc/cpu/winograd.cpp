// resfuse::winograd_conv on CPU: a 3x3 convolution (stride 1, padding 1, dilation 1, one group) of
// channels_last activations as Winograd F(m x m, 3x3), m = `tile` = 2 or 4, with bias, residual add and
// ReLU fused into its output transform. With a = m + 2 and P = a*a transform points:
//
//   V[t, p, :] = (B^T d_t B)[p]           d_t: the a x a input tile t (zero outside the image)
//   M[t, p, :] = V[t, p, :] @ U[p]        U = G w G^T, P x [Ci, Co], transformed once per weight
//   y_t        = A^T M[t] A               the m x m output block of tile t (+ bias, residual, ReLU)
//
// F(2x2, 3x3) (P = 16): B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], A^T = [[1,1,1,0],[0,1,-1,-1]];
// the transforms only add and subtract, the 16 GEMMs cost 16/36 of the direct multiply-adds, and the
// result rounds like the direct sum (~4e-7 relative in fp32).
// F(4x4, 3x3) (P = 36, interpolation points 0, +-1, +-2, inf; Lavin & Gray 2016):
//   B^T = [[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],[0,-2,-1,2,1,0],[0,2,-1,-2,1,0],[0,4,0,-5,0,1]],
//   A^T = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]]:
// 36 GEMMs per 16 outputs, 1/4 of the direct multiply-adds, at a larger rounding error (the transforms
// scale by up to 8; measured in tests/test_cpu_conv.py) — a candidate the caller measures, not a default.
// Tile t = (n, i, j) covers input rows m*i-1 .. m*i+m and columns m*j-1 .. m*j+m, output rows
// m*i .. m*i+m-1 and columns m*j .. m*j+m-1 (cropped at the image's bottom and right edges).
//
// V and M are tile-major ([T, P, C]): read as a channels_last [1, P*C, T, 1] image, the P GEMMs are
// one P-group 1x1 convolution, which oneDNN (mkldnn::_convolution_pointwise, called through the
// dispatcher, with the weight prepacked by the caller) runs at 82-110 GFLOP/s here against 68-73 for
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
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/checks.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

// The 1-D transforms of F(m, 3) on vectors of channels: in (B^T d), out (A^T m) and grad (A g, the
// adjoint of out, for the weight gradient).
template <int m>
struct Wino;

template <>
struct Wino<2> {
  static constexpr int a = 4;
  template <typename V>
  static void in(const V* d, V* r) {
    r[0] = d[0] - d[2];
    r[1] = d[1] + d[2];
    r[2] = d[2] - d[1];
    r[3] = d[1] - d[3];
  }
  template <typename V>
  static void out(const V* s, V* o) {
    o[0] = s[0] + s[1] + s[2];
    o[1] = s[1] - s[2] - s[3];
  }
  template <typename V>
  static void grad(const V* g, V* r) {
    r[0] = g[0];
    r[1] = g[0] + g[1];
    r[2] = g[0] - g[1];
    r[3] = V(0) - g[1];
  }
};

template <>
struct Wino<4> {
  static constexpr int a = 6;
  template <typename V>
  static void in(const V* d, V* r) {
    const V four(4), five(5), two(2);
    const V s42 = d[4] - d[2], d31 = d[3] - d[1];
    r[0] = four * d[0] - five * d[2] + d[4];
    r[1] = (d[3] + d[4]) - four * (d[1] + d[2]);
    r[2] = (d[4] - d[3]) + four * (d[1] - d[2]);
    r[3] = s42 + two * d31;
    r[4] = s42 - two * d31;
    r[5] = four * d[1] - five * d[3] + d[5];
  }
  template <typename V>
  static void out(const V* s, V* o) {
    const V two(2), four(4), eight(8);
    const V p12 = s[1] + s[2], m12 = s[1] - s[2], p34 = s[3] + s[4], m34 = s[3] - s[4];
    o[0] = s[0] + p12 + p34;
    o[1] = m12 + two * m34;
    o[2] = p12 + four * p34;
    o[3] = m12 + eight * m34 + s[5];
  }
  template <typename V>
  static void grad(const V* g, V* r) {
    const V two(2), four(4), eight(8);
    const V e = g[0] + g[2], o = g[1] + g[3], e4 = g[0] + four * g[2], o4 = two * g[1] + eight * g[3];
    r[0] = g[0];
    r[1] = e + o;
    r[2] = e - o;
    r[3] = e4 + o4;
    r[4] = e4 - o4;
    r[5] = g[3];
  }
};

struct Tiles {
  int64_t N, H, W, m, th, tw, T;
  Tiles(int64_t n, int64_t h, int64_t w, int64_t tile)
      : N(n), H(h), W(w), m(tile), th((h + tile - 1) / tile), tw((w + tile - 1) / tile), T(n * th * tw) {}
};

// The separable 2-D transform of an n x n block of channel vectors (point (r, b) = load(r, b)) by a
// 1-D transform f (n vectors in, a out), applied column by column as the columns are loaded, then row
// by row: the a x a result point (r, b) is stored at dst + (r * a + b) * C (k lanes).
template <int n, int a, typename Vec, typename Load, typename F, typename scalar_t>
void transform_store(Load load, F f, scalar_t* dst, int64_t C, int64_t k) {
  Vec u[a][n];
  for (int b = 0; b < n; ++b) {
    Vec col[n], out[a];
    for (int r = 0; r < n; ++r) col[r] = load(r, b);
    f(col, out);
    for (int r = 0; r < a; ++r) u[r][b] = out[r];
  }
  for (int r = 0; r < a; ++r) {
    Vec row[a];
    f(u[r], row);
    for (int b = 0; b < a; ++b) row[b].store(dst + (r * a + b) * C, k);
  }
}

// Tiles [t0, t1) of the image into v (row t - base of the chunk buffer); tiles past the last are zero.
template <typename scalar_t, int m>
void input_tiles(const scalar_t* x, scalar_t* v, const Tiles g, int64_t C, int64_t t0, int64_t t1,
                 int64_t base) {
  using Vec = Vectorized<scalar_t>;
  using W = Wino<m>;
  constexpr int a = W::a;
  constexpr int64_t kV = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    scalar_t* vt = v + (t - base) * a * a * C;
    if (t >= g.T) {
      std::fill(vt, vt + a * a * C, scalar_t(0));
      continue;
    }
    const int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    int64_t row_off[a];  // offset of (row m*i-1+r, column m*j-1), used only when in bounds
    bool row_ok[a], col_ok[a];
    for (int r = 0; r < a; ++r) {
      const int64_t y = m * i - 1 + r, q = m * j - 1 + r;
      row_ok[r] = y >= 0 && y < g.H;
      col_ok[r] = q >= 0 && q < g.W;
      row_off[r] = ((n * g.H + y) * g.W + (m * j - 1)) * C;
    }
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t k = std::min<int64_t>(kV, C - c);
      transform_store<a, a, Vec>(  // B^T d B
          [&](int r, int b) { return row_ok[r] && col_ok[b] ? Vec::loadu(x + (row_off[r] + b * C + c), k) : Vec(0); },
          [](const Vec* i, Vec* o) { W::in(i, o); }, vt + c, C, k);
    }
  }
}

// Tiles [t0, t1) from mt (row t - base of the chunk's GEMM output, row stride m_stride) into y.
template <typename scalar_t, int m, bool kBias, bool kRes, bool kRelu>
void output_tiles(const scalar_t* mm, int64_t m_stride, const scalar_t* bias, const scalar_t* res, scalar_t* y,
                  const Tiles g, int64_t C, int64_t t0, int64_t t1, int64_t base) {
  using Vec = Vectorized<scalar_t>;
  using W = Wino<m>;
  constexpr int a = W::a;
  constexpr int64_t kV = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* mt = mm + (t - base) * m_stride;
    const int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const int rows = static_cast<int>(std::min<int64_t>(m, g.H - m * i));
    const int cols = static_cast<int>(std::min<int64_t>(m, g.W - m * j));
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t k = std::min<int64_t>(kV, C - c);
      Vec s[m][a];  // A^T M, column by column
      for (int b = 0; b < a; ++b) {
        Vec col[a];
        for (int r = 0; r < a; ++r) col[r] = Vec::loadu(mt + (r * a + b) * C + c, k);
        Vec o[m];
        W::out(col, o);
        for (int r = 0; r < m; ++r) s[r][b] = o[r];
      }
      const Vec bv = kBias ? Vec::loadu(bias + c, k) : Vec(0);
      for (int r = 0; r < rows; ++r) {
        Vec out[m];
        W::out(s[r], out);
        for (int b = 0; b < cols; ++b) {
          const int64_t pos = ((n * g.H + m * i + r) * g.W + m * j + b) * C + c;
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

// Tiles [t0, t1) of the output gradient gy into mg (row t - base): M_t = A g_t A^T, g_t the m x m output
// block of tile t (zero past the bottom/right edge) — the adjoint of the output transform, so that
// dL/dU[p] = sum_t V_t[p]^T M_t[p] (see winograd_weight_grad_cpu).
template <typename scalar_t, int m>
void grad_tiles(const scalar_t* gy, scalar_t* mg, const Tiles g, int64_t C, int64_t t0, int64_t t1, int64_t base) {
  using Vec = Vectorized<scalar_t>;
  using W = Wino<m>;
  constexpr int a = W::a;
  constexpr int64_t kV = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    scalar_t* mt = mg + (t - base) * a * a * C;
    const int64_t j = t % g.tw, i = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const int64_t rows = std::min<int64_t>(m, g.H - m * i), cols = std::min<int64_t>(m, g.W - m * j);
    const int64_t off = ((n * g.H + m * i) * g.W + m * j) * C;
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t k = std::min<int64_t>(kV, C - c);
      transform_store<m, a, Vec>(  // A g A^T
          [&](int r, int b) { return r < rows && b < cols ? Vec::loadu(gy + off + (r * g.W + b) * C + c, k) : Vec(0); },
          [](const Vec* i, Vec* o) { W::grad(i, o); }, mt + c, C, k);
    }
  }
}

// The P-group 1x1 convolution v [1, P*Ci, Tc, 1] (channels_last) x weight [P*Co, Ci, 1, 1] (dense or
// oneDNN-packed) through the mkldnn op (ATen for float64); returns [1, P*Co, Tc, 1] channels_last.
at::Tensor grouped_gemm(const at::Tensor& v, const at::Tensor& weight, int64_t P) {
  if (v.scalar_type() == at::kDouble) {  // oneDNN has no float64 convolution (float64: tests only)
    return at::conv2d(v, weight, std::optional<at::Tensor>(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                      at::IntArrayRef{1, 1}, P)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  torch::jit::Stack stack{v, weight, c10::IValue(), zeros, ones, ones, P, std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

template <int m>
at::Tensor winograd_conv_impl(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, bool relu, int64_t chunk) {
  constexpr int64_t P = (m + 2) * (m + 2);
  const int64_t N = input.size(0), C = input.size(1), Co = weight.size(0) / P;
  const Tiles g(N, input.size(2), input.size(3), m);
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor rc = residual ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor y = at::empty({N, Co, g.H, g.W}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor v = at::empty({chunk, P, C}, input.options());  // reused by every chunk
  const at::Tensor v_img = v.view({1, chunk, 1, P * C}).permute({0, 3, 1, 2});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "resfuse::winograd_conv", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = residual ? rc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for (int64_t base = 0; base < g.T; base += chunk) {
      at::parallel_for(base, base + chunk, grain_for(P * C), [&](int64_t t0, int64_t t1) {
        input_tiles<scalar_t, m>(x, vp, g, C, t0, t1, base);
      });
      const at::Tensor mg = grouped_gemm(v_img, weight, P);  // [1, P*Co, chunk, 1] channels_last
      TORCH_CHECK(mg.is_contiguous(at::MemoryFormat::ChannelsLast) && mg.size(2) == chunk,
                  "resfuse::winograd_conv: unexpected GEMM output ", mg.sizes(), " ", mg.strides());
      const scalar_t* mp = mg.const_data_ptr<scalar_t>();
      const int64_t end = std::min(base + chunk, g.T);
      value_switch<false, true>(bias.has_value(), [&](auto bias_c) {
        value_switch<false, true>(residual.has_value(), [&](auto res_c) {
          value_switch<false, true>(relu, [&](auto relu_c) {
            at::parallel_for(base, end, grain_for(P * Co), [&](int64_t t0, int64_t t1) {
              output_tiles<scalar_t, m, decltype(bias_c)::value, decltype(res_c)::value, decltype(relu_c)::value>(
                  mp, P * Co, bp, rp, yp, g, Co, t0, t1, base);
            });
          });
        });
      });
    }
  });
  return y;
}

at::Tensor winograd_conv_cpu(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                             bool relu, int64_t chunk, int64_t tile) {
  check_winograd_conv_args(input, weight, bias, residual, chunk, tile);
  return tile == 2 ? winograd_conv_impl<2>(input, weight, bias, residual, relu, chunk)
                   : winograd_conv_impl<4>(input, weight, bias, residual, relu, chunk);
}

// dL/dU, as [P, Co, Ci], of winograd_conv's U for the output gradient grad_output: with V_t
// (input_tiles) and M_t (grad_tiles) of each tile, dL/dU[p]^T = sum_t M_t[p]^T V_t[p] — P GEMMs of
// [Co, Tc] x [Tc, Ci] per chunk of Tc tiles, accumulated over the chunks, the P run in parallel (each
// single-threaded).
// The weight gradient is G^T dL/dU G (resfuse/cpu_conv.py): for m = 2, 16 GEMMs over T tiles against 9
// over 4T output positions for the direct weight gradient.
template <int m>
at::Tensor winograd_weight_grad_impl(const at::Tensor& grad_output, const at::Tensor& input, int64_t chunk) {
  constexpr int64_t P = (m + 2) * (m + 2);
  const int64_t N = input.size(0), Ci = input.size(1), Co = grad_output.size(1);
  const Tiles g(N, input.size(2), input.size(3), m);
  chunk = std::min(chunk, g.T);
  at::Tensor v = at::empty({chunk, P, Ci}, input.options());
  at::Tensor mg = at::empty({chunk, P, Co}, input.options());
  at::Tensor du = at::empty({P, Co, Ci}, input.options());  // the first chunk writes it, the others add
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "resfuse::winograd_weight_grad", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* gy = grad_output.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    scalar_t* mp = mg.mutable_data_ptr<scalar_t>();
    for (int64_t base = 0; base < g.T; base += chunk) {
      const int64_t rows = std::min(chunk, g.T - base);
      at::parallel_for(base, base + rows, grain_for(P * (Ci + Co)), [&](int64_t t0, int64_t t1) {
        input_tiles<scalar_t, m>(x, vp, g, Ci, t0, t1, base);
        grad_tiles<scalar_t, m>(gy, mp, g, Co, t0, t1, base);
      });
      const at::Tensor vr = v.narrow(0, 0, rows), mr = mg.narrow(0, 0, rows);
      at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          at::Tensor dup = du.select(0, p);
          if (base == 0) {
            at::mm_out(dup, mr.select(1, p).t(), vr.select(1, p));
          } else {
            dup.addmm_(mr.select(1, p).t(), vr.select(1, p));
          }
        }
      });
    }
  });
  return du;
}

at::Tensor winograd_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input, int64_t chunk,
                                    int64_t tile) {
  check_winograd_weight_grad_args(grad_output, input, chunk, tile);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs implement this op
  return tile == 2 ? winograd_weight_grad_impl<2>(grad_output, input, chunk)
                   : winograd_weight_grad_impl<4>(grad_output, input, chunk);
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
