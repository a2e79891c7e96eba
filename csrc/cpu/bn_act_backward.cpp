// resfuse::bn_act_backward_reduce and resfuse::bn_act_backward_apply on CPU.
//
// dz is grad_out where the forward ReLU passed (output > 0), else 0 when relu is set (the select
// of ATen's threshold_backward, so a non-finite grad_out under a zero output is dropped as in
// eager); grad_out otherwise.
//
// reduce: per-channel sums of dz, dz * (input - mean) and dz * (residual - res_mean). The centred
// products keep the sums safe for inputs with a large mean. A lane sum in acc_t adds at most a few
// hundred values before it is flushed into a double total. NCHW is parallel over channels, NHWC
// over fixed row blocks (kernel_utils.h: RowBlocks), so results do not depend on the thread count.
//
// apply: grad_input = a[c] * dz + b[c] * input + d[c] and grad_residual (see ops.cpp), one pass;
// apply_ (in place): grad_input (+)= a[c] * dz [+ b[c] * input] + d[c], the same pass.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

// ---------------------------------------------------------------- reduce

template <typename scalar_t>
struct ReduceParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* output;    // null unless relu
  const scalar_t* input;
  const scalar_t* residual;  // null when no residual
  const acc_t* mean;
  const acc_t* res_mean;     // null when no residual
  acc_t* sum_dz;
  acc_t* sum_dz_xmu;
  acc_t* sum_dz_rmu;         // null when no residual
  int64_t N, C, HW;
};

// Lane sums of dz, dz * (x - mean) and dz * (r - res_mean).
template <typename scalar_t>
struct Sums {
  using IO = VecIO<scalar_t>;
  typename IO::Pack dz = IO::zero(), xmu = IO::zero(), rmu = IO::zero();
};

// Adds the k <= kStep elements at offset i to `s`, given the means of their channels.
template <typename scalar_t, bool kRelu, bool kRes>
C10_ALWAYS_INLINE void reduce_step(const ReduceParams<scalar_t>& p, int64_t i, int64_t k,
                                   const typename VecIO<scalar_t>::Pack& mean,
                                   const typename VecIO<scalar_t>::Pack& res_mean, Sums<scalar_t>& s) {
  using IO = VecIO<scalar_t>;
  const auto g = IO::load(p.grad_out + i, k);
  const auto x = IO::load(p.input + i, k);
  typename IO::Pack o{}, r{};
  if constexpr (kRelu) o = IO::load(p.output + i, k);
  if constexpr (kRes) r = IO::load(p.residual + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    // Lanes past k load zero everywhere, so dz = 0 there and they add nothing.
    const auto dz = relu_grad<kRelu>(g[q], o[q]);
    s.dz[q] += dz;
    s.xmu[q] = at::vec::fmadd(dz, x[q] - mean[q], s.xmu[q]);
    if constexpr (kRes) s.rmu[q] = at::vec::fmadd(dz, r[q] - res_mean[q], s.rmu[q]);
  }
}

// NCHW channels [c0, c1): each channel walks its N planes; lane sums are flushed into double
// totals every kFlush values.
template <typename scalar_t, bool kRelu, bool kRes>
void reduce_channels(const ReduceParams<scalar_t> p, int64_t c0, int64_t c1) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  for (int64_t c = c0; c < c1; ++c) {
    typename IO::Pack mean, res_mean{};
    mean.fill(Vec(p.mean[c]));
    if constexpr (kRes) res_mean.fill(Vec(p.res_mean[c]));
    Sums<scalar_t> s;
    double totals[3] = {0, 0, 0};
    int64_t pending = 0;
    const auto flush = [&] {
      const auto plus = [](const Vec& a, const Vec& b) { return a + b; };
      for (int64_t q = 0; q < IO::kParts; ++q) {
        totals[0] += at::vec::vec_reduce_all<acc_t>(plus, s.dz[q]);
        totals[1] += at::vec::vec_reduce_all<acc_t>(plus, s.xmu[q]);
        if constexpr (kRes) totals[2] += at::vec::vec_reduce_all<acc_t>(plus, s.rmu[q]);
      }
      s = Sums<scalar_t>{};
      pending = 0;
    };
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t base = (n * p.C + c) * p.HW;
      int64_t i = 0;
      for (; i + IO::kStep <= p.HW; i += IO::kStep) {
        reduce_step<scalar_t, kRelu, kRes>(p, base + i, IO::kStep, mean, res_mean, s);
        if ((pending += IO::kStep) >= kFlush) flush();
      }
      if (i < p.HW) {
        reduce_step<scalar_t, kRelu, kRes>(p, base + i, p.HW - i, mean, res_mean, s);
        pending += IO::kStep;
      }
    }
    flush();
    p.sum_dz[c] = acc_t(totals[0]);
    p.sum_dz_xmu[c] = acc_t(totals[1]);
    if constexpr (kRes) p.sum_dz_rmu[c] = acc_t(totals[2]);
  }
}

// kSums sums per channel: dz and dz*(x - mean), and dz*(r - res_mean) with a residual.
template <bool kRes>
constexpr int64_t kSums = kRes ? 3 : 2;

// NHWC: adds channels [c, c + k) of the row at offset `row` to the chunk's per-channel lane sums
// acc (kSums rows of C values).
template <typename scalar_t, bool kRelu, bool kRes>
C10_ALWAYS_INLINE void reduce_row_step(const ReduceParams<scalar_t>& p, at::opmath_type<scalar_t>* acc,
                                       int64_t row, int64_t c, int64_t k) {
  using IO = VecIO<scalar_t>;
  const int64_t C = p.C;
  Sums<scalar_t> s;
  s.dz = IO::load_acc(acc + c, k);
  s.xmu = IO::load_acc(acc + C + c, k);
  typename IO::Pack res_mean{};
  if constexpr (kRes) {
    s.rmu = IO::load_acc(acc + 2 * C + c, k);
    res_mean = IO::load_acc(p.res_mean + c, k);
  }
  reduce_step<scalar_t, kRelu, kRes>(p, row + c, k, IO::load_acc(p.mean + c, k), res_mean, s);
  IO::store_acc(acc + c, s.dz, k);
  IO::store_acc(acc + C + c, s.xmu, k);
  if constexpr (kRes) IO::store_acc(acc + 2 * C + c, s.rmu, k);
}

// NHWC row blocks [b0, b1) of `blocks`: block b adds its kSums x C sums into partial[b].
template <typename scalar_t, bool kRelu, bool kRes>
void reduce_blocks(const ReduceParams<scalar_t> p, const RowBlocks blocks, double* partial,
                   int64_t b0, int64_t b1) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t C = p.C;
  std::vector<acc_t> chunk(kSums<kRes> * C);  // lane sums of the current chunk of rows
  for (int64_t b = b0; b < b1; ++b) {
    double* part = partial + b * kSums<kRes> * C;
    for (int64_t r0 = blocks.begin(b); r0 < blocks.end(b); r0 += blocks.chunk_rows) {
      const int64_t r1 = std::min(blocks.end(b), r0 + blocks.chunk_rows);
      std::fill(chunk.begin(), chunk.end(), acc_t(0));
      for (int64_t row = r0 * C; row < r1 * C; row += C) {
        int64_t c = 0;
        for (; c + IO::kStep <= C; c += IO::kStep) {
          reduce_row_step<scalar_t, kRelu, kRes>(p, chunk.data(), row, c, IO::kStep);
        }
        if (c < C) reduce_row_step<scalar_t, kRelu, kRes>(p, chunk.data(), row, c, C - c);
      }
      for (int64_t j = 0; j < kSums<kRes> * C; ++j) part[j] += double(chunk[j]);
    }
  }
}

template <typename scalar_t, bool kRelu, bool kRes>
void reduce_nhwc(const ReduceParams<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.C;
  const RowBlocks blocks(p.N * p.HW, C);
  std::vector<double> partial(blocks.count * kSums<kRes> * C, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    reduce_blocks<scalar_t, kRelu, kRes>(p, blocks, partial.data(), b0, b1);
  });
  acc_t* const outs[3] = {p.sum_dz, p.sum_dz_xmu, p.sum_dz_rmu};
  for (int64_t j = 0; j < kSums<kRes>; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      double total = 0;
      for (int64_t b = 0; b < blocks.count; ++b) total += partial[(b * kSums<kRes> + j) * C + c];
      outs[j][c] = acc_t(total);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_,
    const at::Tensor& mean, const std::optional<at::Tensor>& residual_,
    const std::optional<at::Tensor>& res_mean, bool relu) {
  check_bn_act_backward_reduce_args(grad_out_, output_, input_, mean, residual_, res_mean, relu);
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor grad_out = to_layout(grad_out_, layout);
  const at::Tensor output = relu ? to_layout(output_, layout) : at::Tensor();
  const at::Tensor residual = residual_ ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor res_mean_c = res_mean ? res_mean->contiguous() : at::Tensor();
  const int64_t C = input.size(1);
  const auto options = input.options().dtype(param_dtype(input.scalar_type()));
  at::Tensor sum_dz = at::empty({C}, options);
  at::Tensor sum_dz_xmu = at::empty({C}, options);
  at::Tensor sum_dz_rmu = at::empty({residual.defined() ? C : 0}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::bn_act_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReduceParams<scalar_t> p{
        grad_out.const_data_ptr<scalar_t>(),
        relu ? output.const_data_ptr<scalar_t>() : nullptr,
        input.const_data_ptr<scalar_t>(),
        residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
        mean_c.const_data_ptr<acc_t>(),
        residual.defined() ? res_mean_c.const_data_ptr<acc_t>() : nullptr,
        sum_dz.mutable_data_ptr<acc_t>(),
        sum_dz_xmu.mutable_data_ptr<acc_t>(),
        residual.defined() ? sum_dz_rmu.mutable_data_ptr<acc_t>() : nullptr,
        input.size(0),
        C,
        input.size(2) * input.size(3)};
    value_switch<false, true>(relu, [&](auto relu_c) {
      value_switch<false, true>(residual.defined(), [&](auto res_c) {
        constexpr bool kRelu = decltype(relu_c)::value, kRes = decltype(res_c)::value;
        if (layout == Layout::NHWC) {
          reduce_nhwc<scalar_t, kRelu, kRes>(p);
        } else {
          at::parallel_for(0, p.C, grain_for(p.N * p.HW), [&](int64_t c0, int64_t c1) {
            reduce_channels<scalar_t, kRelu, kRes>(p, c0, c1);
          });
        }
      });
    });
  });
  return {sum_dz, sum_dz_xmu, sum_dz_rmu};
}

// ---------------------------------------------------------------- apply

// grad_residual: not computed, dz (identity shortcut), or res_a * dz + res_b * residual + res_d.
enum class ResidualGrad { kNone, kDz, kAffine };

template <typename scalar_t>
struct ApplyParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* output;    // null unless relu
  const scalar_t* input;
  const scalar_t* residual;  // null unless ResidualGrad::kAffine
  const acc_t* a;
  const acc_t* b;
  const acc_t* d;
  const acc_t* res_a;  // res_* null unless ResidualGrad::kAffine
  const acc_t* res_b;
  const acc_t* res_d;
  scalar_t* grad_input;
  scalar_t* grad_residual;  // null for ResidualGrad::kNone
  int64_t N, C, HW;
};

// The per-channel coefficients of one vector step.
template <typename scalar_t>
struct Coefs {
  typename VecIO<scalar_t>::Pack a, b, d, res_a, res_b, res_d;
};

// grad_input (and grad_residual) for the k <= kStep elements at offset i. kInput: the b * input
// term is present; kAcc: grad_input's old value is added (the in-place op). Every element is read
// before it is written, so grad_input may be grad_out or input itself.
template <typename scalar_t, bool kRelu, ResidualGrad kRg, bool kInput, bool kAcc>
C10_ALWAYS_INLINE void apply_step(const ApplyParams<scalar_t>& p, int64_t i, int64_t k,
                                  const Coefs<scalar_t>& w) {
  using IO = VecIO<scalar_t>;
  const auto g = IO::load(p.grad_out + i, k);
  typename IO::Pack x{}, o{}, r{}, acc{}, gx, gr;
  if constexpr (kInput) x = IO::load(p.input + i, k);
  if constexpr (kAcc) acc = IO::load(p.grad_input + i, k);
  if constexpr (kRelu) o = IO::load(p.output + i, k);
  if constexpr (kRg == ResidualGrad::kAffine) r = IO::load(p.residual + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    const auto dz = relu_grad<kRelu>(g[q], o[q]);
    gx[q] = at::vec::fmadd(w.a[q], dz, kInput ? at::vec::fmadd(w.b[q], x[q], w.d[q]) : w.d[q]);
    if constexpr (kAcc) gx[q] = gx[q] + acc[q];
    if constexpr (kRg == ResidualGrad::kDz) gr[q] = dz;
    if constexpr (kRg == ResidualGrad::kAffine) {
      gr[q] = at::vec::fmadd(w.res_a[q], dz, at::vec::fmadd(w.res_b[q], r[q], w.res_d[q]));
    }
  }
  IO::store(p.grad_input + i, gx, k);
  if constexpr (kRg != ResidualGrad::kNone) IO::store(p.grad_residual + i, gr, k);
}

// NHWC: channels [c, c + k) of the row at offset `row`, coefficients read as vectors.
template <typename scalar_t, bool kRelu, ResidualGrad kRg, bool kInput, bool kAcc>
C10_ALWAYS_INLINE void apply_row_step(const ApplyParams<scalar_t>& p, int64_t row, int64_t c, int64_t k) {
  using IO = VecIO<scalar_t>;
  Coefs<scalar_t> w{};
  w.a = IO::load_acc(p.a + c, k);
  w.b = IO::load_acc(p.b + c, k);
  w.d = IO::load_acc(p.d + c, k);
  if constexpr (kRg == ResidualGrad::kAffine) {
    w.res_a = IO::load_acc(p.res_a + c, k);
    w.res_b = IO::load_acc(p.res_b + c, k);
    w.res_d = IO::load_acc(p.res_d + c, k);
  }
  apply_step<scalar_t, kRelu, kRg, kInput, kAcc>(p, row + c, k, w);
}

// NCHW planes [plane0, plane1): the channel's coefficients are broadcast over the plane.
template <typename scalar_t, bool kRelu, ResidualGrad kRg, bool kInput, bool kAcc>
void apply_planes(const ApplyParams<scalar_t> p, int64_t plane0, int64_t plane1) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    const int64_t c = plane % p.C;
    Coefs<scalar_t> w{};
    w.a.fill(Vec(p.a[c]));
    w.b.fill(Vec(p.b[c]));
    w.d.fill(Vec(p.d[c]));
    if constexpr (kRg == ResidualGrad::kAffine) {
      w.res_a.fill(Vec(p.res_a[c]));
      w.res_b.fill(Vec(p.res_b[c]));
      w.res_d.fill(Vec(p.res_d[c]));
    }
    const int64_t base = plane * p.HW;
    int64_t i = 0;
    for (; i + IO::kStep <= p.HW; i += IO::kStep) {
      apply_step<scalar_t, kRelu, kRg, kInput, kAcc>(p, base + i, IO::kStep, w);
    }
    if (i < p.HW) apply_step<scalar_t, kRelu, kRg, kInput, kAcc>(p, base + i, p.HW - i, w);
  }
}

// NHWC rows [row0, row1) of C values.
template <typename scalar_t, bool kRelu, ResidualGrad kRg, bool kInput, bool kAcc>
void apply_rows(const ApplyParams<scalar_t> p, int64_t row0, int64_t row1) {
  using IO = VecIO<scalar_t>;
  for (int64_t row = row0 * p.C; row < row1 * p.C; row += p.C) {
    int64_t c = 0;
    for (; c + IO::kStep <= p.C; c += IO::kStep) {
      apply_row_step<scalar_t, kRelu, kRg, kInput, kAcc>(p, row, c, IO::kStep);
    }
    if (c < p.C) apply_row_step<scalar_t, kRelu, kRg, kInput, kAcc>(p, row, c, p.C - c);
  }
}

// The apply pass over all elements, parallel over NHWC rows or NCHW planes.
template <typename scalar_t, bool kRelu, ResidualGrad kRg, bool kInput, bool kAcc>
void launch_apply(const ApplyParams<scalar_t>& p, Layout layout) {
  parallel_over_layout(
      layout, p.N, p.C, p.HW, [&](int64_t r0, int64_t r1) { apply_rows<scalar_t, kRelu, kRg, kInput, kAcc>(p, r0, r1); },
      [&](int64_t p0, int64_t p1) { apply_planes<scalar_t, kRelu, kRg, kInput, kAcc>(p, p0, p1); });
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_cpu(
    const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& d,
    const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& res_a,
    const std::optional<at::Tensor>& res_b, const std::optional<at::Tensor>& res_d, bool relu,
    bool residual_grad) {
  check_bn_act_backward_apply_args(grad_out_, output_, input_, a, b, d, residual_, res_a, res_b,
                                   res_d, relu, residual_grad);
  const ResidualGrad mode = !residual_grad ? ResidualGrad::kNone
                            : res_a        ? ResidualGrad::kAffine
                                           : ResidualGrad::kDz;
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor grad_out = to_layout(grad_out_, layout);
  const at::Tensor output = relu ? to_layout(output_, layout) : at::Tensor();
  const bool affine = mode == ResidualGrad::kAffine;
  const at::Tensor residual = affine ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous(), d_c = d.contiguous();
  const at::Tensor res_a_c = affine ? res_a->contiguous() : at::Tensor();
  const at::Tensor res_b_c = affine ? res_b->contiguous() : at::Tensor();
  const at::Tensor res_d_c = affine ? res_d->contiguous() : at::Tensor();
  at::Tensor grad_input = empty_in_layout(input, layout);
  at::Tensor grad_residual = mode == ResidualGrad::kNone ? at::empty({0}, input.options())
                                                         : empty_in_layout(input, layout);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::bn_act_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApplyParams<scalar_t> p{
        grad_out.const_data_ptr<scalar_t>(),
        relu ? output.const_data_ptr<scalar_t>() : nullptr,
        input.const_data_ptr<scalar_t>(),
        affine ? residual.const_data_ptr<scalar_t>() : nullptr,
        a_c.const_data_ptr<acc_t>(),
        b_c.const_data_ptr<acc_t>(),
        d_c.const_data_ptr<acc_t>(),
        affine ? res_a_c.const_data_ptr<acc_t>() : nullptr,
        affine ? res_b_c.const_data_ptr<acc_t>() : nullptr,
        affine ? res_d_c.const_data_ptr<acc_t>() : nullptr,
        grad_input.mutable_data_ptr<scalar_t>(),
        mode == ResidualGrad::kNone ? nullptr : grad_residual.mutable_data_ptr<scalar_t>(),
        input.size(0),
        input.size(1),
        input.size(2) * input.size(3)};
    value_switch<false, true>(relu, [&](auto relu_c) {
      value_switch<ResidualGrad::kNone, ResidualGrad::kDz, ResidualGrad::kAffine>(mode, [&](auto mode_c) {
        constexpr bool kRelu = decltype(relu_c)::value;
        constexpr ResidualGrad kRg = decltype(mode_c)::value;
        launch_apply<scalar_t, kRelu, kRg, true, false>(p, layout);
      });
    });
  });
  return {grad_input, grad_residual};
}

void bn_act_backward_apply_inplace_cpu(const at::Tensor& grad_input, const at::Tensor& grad_out_,
                                       const at::Tensor& output_, const std::optional<at::Tensor>& input_,
                                       const at::Tensor& a, const at::Tensor& b, const at::Tensor& d,
                                       bool relu, bool accumulate) {
  check_bn_act_backward_apply_inplace_args(grad_input, grad_out_, output_, input_, a, b, d, relu,
                                           accumulate);
  const Layout layout = layout_of(grad_input);
  const at::Tensor grad_out = to_layout(grad_out_, layout);
  const at::Tensor output = relu ? to_layout(output_, layout) : at::Tensor();
  const at::Tensor input = input_ ? to_layout(*input_, layout) : at::Tensor();
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous(), d_c = d.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "resfuse::bn_act_backward_apply_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ApplyParams<scalar_t> p{};
    p.grad_out = grad_out.const_data_ptr<scalar_t>();
    p.output = relu ? output.const_data_ptr<scalar_t>() : nullptr;
    p.input = input_ ? input.const_data_ptr<scalar_t>() : nullptr;
    p.a = a_c.const_data_ptr<acc_t>();
    p.b = b_c.const_data_ptr<acc_t>();
    p.d = d_c.const_data_ptr<acc_t>();
    p.grad_input = grad_input.mutable_data_ptr<scalar_t>();
    p.N = grad_input.size(0);
    p.C = grad_input.size(1);
    p.HW = grad_input.size(2) * grad_input.size(3);
    value_switch<false, true>(relu, [&](auto relu_c) {
      value_switch<false, true>(input_.has_value(), [&](auto input_c) {
        value_switch<false, true>(accumulate, [&](auto acc_c) {
          launch_apply<scalar_t, decltype(relu_c)::value, ResidualGrad::kNone, decltype(input_c)::value,
                       decltype(acc_c)::value>(p, layout);
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cpu);
  m.impl("bn_act_backward_apply_", &bn_act_backward_apply_inplace_cpu);
}

}  // namespace resfuse::cpu
