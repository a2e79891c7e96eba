// resfuse::bn_act_max_pool and resfuse::max_pool_act_backward on CPU: a ResNet stem's BN-apply +
// ReLU + max-pool in one pass, and its backward without the eager path's int64 indices.
//
// Forward: out = max_pool2d(relu(input * scale[c] + shift[c])) (dilation 1, floor mode), never
// writing the full-size activation, plus argmax: per output element, the window-local index
// (r * kW + s from the window's unclipped top-left corner) of the element the max came from, or
// 255 where that element's ReLU output is <= 0 (ReLU passes no gradient there). The max follows
// ATen's CPU max-pool exactly: the first maximum in row-major window order, a NaN replaces any number
// (and a later NaN the earlier one). The activation is computed as bn_act computes it (one fused
// multiply-add, rounded to the input dtype), so the argmax is the one eager max-pool picks on
// bn_act's output.
//
// Backward: grad_input[n, c, h, w] = sum of grad_output over the windows whose argmax is (h, w): a
// gather (each input element written once, no zero fill, no atomic adds), accumulated in float32
// (float64 for float64).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

constexpr uint8_t kNoGrad = 255;

struct PoolGeom {
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw;
};

PoolGeom pool_geom(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p) {
  const int64_t H = input.size(2), W = input.size(3);
  return {input.size(0), input.size(1), H, W, pooled_size(H, k[0], s[0], p[0]), pooled_size(W, k[1], s[1], p[1]),
          k[0], k[1], s[0], s[1], p[0], p[1]};
}

// Window-local index r * kW + s of input position (h, w) in output window (i, j), counted from the
// window's unclipped top-left corner (what argmax stores).
inline int64_t local_index(const PoolGeom& g, int64_t h, int64_t w, int64_t i, int64_t j) {
  return (h - (i * g.sh - g.ph)) * g.kw + (w - (j * g.sw - g.pw));
}

// ---- forward -------------------------------------------------------------------------------------

template <typename scalar_t>
struct PoolForward {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  scalar_t* out;
  uint8_t* idx;  // window-local argmax, kNoGrad where the max is <= 0
  PoolGeom g;
};

// relu(z * scale + shift) rounded to scalar_t, exactly as bn_act computes and stores it.
template <typename scalar_t>
C10_ALWAYS_INLINE typename VecIO<scalar_t>::Pack relu_affine(typename VecIO<scalar_t>::Pack z,
                                                             const typename VecIO<scalar_t>::Pack& sc,
                                                             const typename VecIO<scalar_t>::Pack& sf) {
  using IO = VecIO<scalar_t>;
  for (int q = 0; q < IO::kParts; ++q) {
    z[q] = at::vec::maximum(at::vec::fmadd(z[q], sc[q], sf[q]), typename IO::Vec(0));  // propagates NaN
  }
  return IO::round(z);
}

// channels_last: one (n, i) output row per step, channels vectorised.
template <typename scalar_t>
void forward_nhwc(const PoolForward<scalar_t> p, int64_t r0, int64_t r1) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = IO::kStep;
  const PoolGeom g = p.g;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, i = r % g.Ho;
    const int64_t hs = i * g.sh - g.ph, h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + g.kh, g.H);
    for (int64_t j = 0; j < g.Wo; ++j) {
      const int64_t ws = j * g.sw - g.pw, w0 = std::max<int64_t>(ws, 0), w1 = std::min(ws + g.kw, g.W);
      const int64_t o = ((n * g.Ho + i) * g.Wo + j) * g.C;
      for (int64_t c = 0; c < g.C; c += kStep) {
        const int64_t k = std::min(kStep, g.C - c);
        const typename IO::Pack sc = IO::load_acc(p.scale + c, k), sf = IO::load_acc(p.shift + c, k);
        typename IO::Pack best, arg;
        best.fill(Vec(-std::numeric_limits<acc_t>::infinity()));
        arg.fill(Vec(0));
        for (int64_t hh = h0; hh < h1; ++hh) {
          for (int64_t ww = w0; ww < w1; ++ww) {
            const Vec local(static_cast<acc_t>((hh - hs) * g.kw + (ww - ws)));
            const typename IO::Pack z =
                relu_affine<scalar_t>(IO::load(p.x + ((n * g.H + hh) * g.W + ww) * g.C + c, k), sc, sf);
            for (int q = 0; q < IO::kParts; ++q) {  // ATen's rule: greater, or NaN
              const Vec take = (z[q] > best[q]) | z[q].isnan();
              best[q] = Vec::blendv(best[q], z[q], take);
              arg[q] = Vec::blendv(arg[q], local, take);
            }
          }
        }
        IO::store(p.out + o + c, best, k);
        acc_t bv[kStep], av[kStep];
        for (int q = 0; q < IO::kParts; ++q) {
          best[q].store(bv + q * Vec::size());
          arg[q].store(av + q * Vec::size());
        }
        for (int64_t l = 0; l < k; ++l) {
          p.idx[o + c + l] = bv[l] <= acc_t(0) ? kNoGrad : static_cast<uint8_t>(av[l]);
        }
      }
    }
  }
}

// NCHW: one (n, c) plane per step; the plane's activation is computed into `act` first (vectorised,
// as bn_act computes it), then pooled.
template <typename scalar_t>
void forward_nchw(const PoolForward<scalar_t> p, int64_t p0, int64_t p1) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const PoolGeom g = p.g;
  const int64_t hw = g.H * g.W;
  std::vector<acc_t> act(hw + IO::kStep);
  for (int64_t plane = p0; plane < p1; ++plane) {
    const int64_t c = plane % g.C;
    typename IO::Pack sc, sf;
    sc.fill(Vec(p.scale[c]));
    sf.fill(Vec(p.shift[c]));
    for (int64_t e = 0; e < hw; e += IO::kStep) {
      const int64_t k = std::min(IO::kStep, hw - e);
      const typename IO::Pack z = relu_affine<scalar_t>(IO::load(p.x + plane * hw + e, k), sc, sf);
      for (int q = 0; q < IO::kParts; ++q) z[q].store(act.data() + e + q * Vec::size());
    }
    for (int64_t i = 0; i < g.Ho; ++i) {
      const int64_t hs = i * g.sh - g.ph, h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + g.kh, g.H);
      for (int64_t j = 0; j < g.Wo; ++j) {
        const int64_t ws = j * g.sw - g.pw, w0 = std::max<int64_t>(ws, 0), w1 = std::min(ws + g.kw, g.W);
        acc_t best = -std::numeric_limits<acc_t>::infinity();
        int64_t arg = 0;
        for (int64_t hh = h0; hh < h1; ++hh) {
          for (int64_t ww = w0; ww < w1; ++ww) {
            const acc_t v = act[hh * g.W + ww];
            if (v > best || std::isnan(v)) {
              best = v;
              arg = (hh - hs) * g.kw + (ww - ws);
            }
          }
        }
        const int64_t o = (plane * g.Ho + i) * g.Wo + j;
        p.out[o] = static_cast<scalar_t>(best);
        p.idx[o] = best <= acc_t(0) ? kNoGrad : static_cast<uint8_t>(arg);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bn_act_max_pool_cpu(const at::Tensor& input_, const at::Tensor& scale,
                                                       const at::Tensor& shift, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding) {
  check_bn_act_max_pool_args(input_, scale, shift, kernel_size, stride, padding);
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor sc = scale.contiguous(), sf = shift.contiguous();
  const PoolGeom g = pool_geom(input, kernel_size, stride, padding);
  const auto opts = input.options().memory_format(memory_format(layout));
  at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, opts);
  at::Tensor idx = at::empty({g.N, g.C, g.Ho, g.Wo}, opts.dtype(at::kByte));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::bn_act_max_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PoolForward<scalar_t> p{input.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
                                  sf.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
                                  idx.mutable_data_ptr<uint8_t>(), g};
    if (layout == Layout::NHWC) {
      at::parallel_for(0, g.N * g.Ho, grain_for(g.Wo * g.C * g.kh * g.kw),
                       [&](int64_t r0, int64_t r1) { forward_nhwc<scalar_t>(p, r0, r1); });
    } else {
      at::parallel_for(0, g.N * g.C, grain_for(g.H * g.W),
                       [&](int64_t p0, int64_t p1) { forward_nchw<scalar_t>(p, p0, p1); });
    }
  });
  return {out, idx};
}

// ---- backward ------------------------------------------------------------------------------------

// The output windows (rows or columns) that contain input position `h`: [lo, hi).
inline std::pair<int64_t, int64_t> covering(int64_t h, int64_t k, int64_t s, int64_t p, int64_t out_size) {
  const int64_t lo = h + p - k + 1 <= 0 ? 0 : (h + p - k + 1 + s - 1) / s;
  return {lo, std::min((h + p) / s + 1, out_size)};
}

// channels_last: one (n, h) input row per step.
template <typename scalar_t>
void backward_nhwc(const scalar_t* gy, const uint8_t* idx, scalar_t* gx, const PoolGeom g, int64_t r0,
                   int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(g.C);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.H, h = r % g.H;
    const auto [i0, i1] = covering(h, g.kh, g.sh, g.ph, g.Ho);
    for (int64_t w = 0; w < g.W; ++w) {
      const auto [j0, j1] = covering(w, g.kw, g.sw, g.pw, g.Wo);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const uint8_t local = static_cast<uint8_t>(local_index(g, h, w, i, j));
          const int64_t o = ((n * g.Ho + i) * g.Wo + j) * g.C;
          const uint8_t* __restrict ip = idx + o;
          const scalar_t* __restrict gp = gy + o;
          acc_t* __restrict ap = acc.data();
          for (int64_t c = 0; c < g.C; ++c) {
            ap[c] += ip[c] == local ? static_cast<acc_t>(gp[c]) : acc_t(0);
          }
        }
      }
      scalar_t* __restrict xp = gx + ((n * g.H + h) * g.W + w) * g.C;
      for (int64_t c = 0; c < g.C; ++c) xp[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// NCHW: one (n, c) plane per step.
template <typename scalar_t>
void backward_nchw(const scalar_t* gy, const uint8_t* idx, scalar_t* gx, const PoolGeom g, int64_t p0,
                   int64_t p1) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* ip = idx + p * g.Ho * g.Wo;
    const scalar_t* gp = gy + p * g.Ho * g.Wo;
    for (int64_t h = 0; h < g.H; ++h) {
      const auto [i0, i1] = covering(h, g.kh, g.sh, g.ph, g.Ho);
      for (int64_t w = 0; w < g.W; ++w) {
        const auto [j0, j1] = covering(w, g.kw, g.sw, g.pw, g.Wo);
        acc_t a = 0;
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) {
            if (ip[i * g.Wo + j] == local_index(g, h, w, i, j)) a += static_cast<acc_t>(gp[i * g.Wo + j]);
          }
        }
        gx[(p * g.H + h) * g.W + w] = static_cast<scalar_t>(a);
      }
    }
  }
}

at::Tensor max_pool_act_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& argmax_,
                                     const at::Tensor& input, at::IntArrayRef kernel_size,
                                     at::IntArrayRef stride, at::IntArrayRef padding) {
  check_max_pool_act_backward_args(grad_output_, argmax_, input, kernel_size, stride, padding);
  const Layout layout = layout_of(input);
  const at::Tensor grad_output = to_layout(grad_output_, layout), argmax = to_layout(argmax_, layout);
  const PoolGeom g = pool_geom(input, kernel_size, stride, padding);
  at::Tensor grad_input = empty_in_layout(input, layout);
  if (grad_input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::max_pool_act_backward", [&] {
    const scalar_t* gy = grad_output.const_data_ptr<scalar_t>();
    const uint8_t* ip = argmax.const_data_ptr<uint8_t>();
    scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
    if (layout == Layout::NHWC) {
      at::parallel_for(0, g.N * g.H, grain_for(g.W * g.C * 4), [&](int64_t r0, int64_t r1) {
        backward_nhwc<scalar_t>(gy, ip, gx, g, r0, r1);
      });
    } else {
      at::parallel_for(0, g.N * g.C, grain_for(g.H * g.W * 4), [&](int64_t p0, int64_t p1) {
        backward_nchw<scalar_t>(gy, ip, gx, g, p0, p1);
      });
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_act_max_pool", &bn_act_max_pool_cpu);
  m.impl("max_pool_act_backward", &max_pool_act_backward_cpu);
}

}  // namespace resfuse::cpu
