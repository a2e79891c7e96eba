// resfuse::bn_act_backward_reduce and resfuse::bn_act_backward_apply on CPU.
//
// dz is grad_out where the forward ReLU passed (output > 0), else 0 when relu is set (the select
// of ATen's threshold_backward, so a non-finite grad_out under a zero output is dropped as in
// eager); grad_out otherwise.
//
// reduce: per-channel sums of dz, dz * (input - mean) and dz * (residual - res_mean). The centred
// products keep the sums safe for inputs with a large mean. Lane sums in acc_t cover at most a few
// thousand values before they are flushed into double totals. NCHW is parallel over channels, NHWC
// over fixed row blocks (kernel_utils.h: RowBlocks), so results do not depend on the thread count.
//
// apply: grad_input = a[c] * dz + b[c] * input + d[c] and grad_residual (see ops.cpp), one pass.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

// NCHW reduce: values per lane-sum flush.
constexpr int64_t kFlush = 2048;

template <bool kRelu, typename Vec>
inline Vec relu_grad(const Vec& grad, const Vec& output) {
  if constexpr (kRelu) {
    return Vec::blendv(grad, Vec(0), output <= Vec(0));
  } else {
    return grad;
  }
}

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

// Vector accumulators of the three sums.
template <typename Vec>
struct Sums {
  Vec dz{0}, xmu{0}, rmu{0};
};

// Adds the k <= kStep elements at offset i to `s` (mean/res_mean already broadcast or per lane).
template <typename scalar_t, bool kRelu, bool kRes>
inline void reduce_step(const ReduceParams<scalar_t>& p, int64_t i, int64_t k,
                        const typename VecIO<scalar_t>::Pack& mean,
                        const typename VecIO<scalar_t>::Pack& res_mean,
                        std::array<Sums<typename VecIO<scalar_t>::Vec>, VecIO<scalar_t>::kParts>& s) {
  using IO = VecIO<scalar_t>;
  const auto g = IO::load(p.grad_out + i, k);
  const auto x = IO::load(p.input + i, k);
  typename IO::Pack o{}, r{};
  if constexpr (kRelu) o = IO::load(p.output + i, k);
  if constexpr (kRes) r = IO::load(p.residual + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    // Lanes past k load zero everywhere, so dz = 0 there and they add nothing.
    const auto dz = relu_grad<kRelu>(g[q], o[q]);
    s[q].dz += dz;
    s[q].xmu = at::vec::fmadd(dz, x[q] - mean[q], s[q].xmu);
    if constexpr (kRes) s[q].rmu = at::vec::fmadd(dz, r[q] - res_mean[q], s[q].rmu);
  }
}

template <typename scalar_t, bool kRelu, bool kRes>
void reduce_nchw(const ReduceParams<scalar_t>& p) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  const int64_t HW = p.HW;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(p.N * HW, 1));
  at::parallel_for(0, p.C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      typename IO::Pack mean, res_mean{};
      mean.fill(Vec(p.mean[c]));
      if constexpr (kRes) res_mean.fill(Vec(p.res_mean[c]));
      std::array<Sums<Vec>, IO::kParts> s{};
      double total_dz = 0, total_xmu = 0, total_rmu = 0;
      int64_t pending = 0;
      const auto flush = [&] {
        const auto plus = [](const Vec& a, const Vec& b) { return a + b; };
        for (int64_t q = 0; q < IO::kParts; ++q) {
          total_dz += at::vec::vec_reduce_all<acc_t>(plus, s[q].dz);
          total_xmu += at::vec::vec_reduce_all<acc_t>(plus, s[q].xmu);
          if constexpr (kRes) total_rmu += at::vec::vec_reduce_all<acc_t>(plus, s[q].rmu);
          s[q] = Sums<Vec>{};
        }
        pending = 0;
      };
      for (int64_t n = 0; n < p.N; ++n) {
        const int64_t base = (n * p.C + c) * HW;
        int64_t i = 0;
        for (; i + IO::kStep <= HW; i += IO::kStep) {
          reduce_step<scalar_t, kRelu, kRes>(p, base + i, IO::kStep, mean, res_mean, s);
          if ((pending += IO::kStep) >= kFlush) flush();
        }
        if (i < HW) {
          reduce_step<scalar_t, kRelu, kRes>(p, base + i, HW - i, mean, res_mean, s);
          pending += IO::kStep;
        }
      }
      flush();
      p.sum_dz[c] = acc_t(total_dz);
      p.sum_dz_xmu[c] = acc_t(total_xmu);
      if constexpr (kRes) p.sum_dz_rmu[c] = acc_t(total_rmu);
    }
  });
}

template <typename scalar_t, bool kRelu, bool kRes>
void reduce_nhwc(const ReduceParams<scalar_t>& p) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t C = p.C;
  const RowBlocks blocks(p.N * p.HW, C);
  constexpr int64_t kSums = kRes ? 3 : 2;
  // Per block: kSums rows of C double partials.
  std::vector<double> partial(blocks.count * kSums * C, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> chunk(kSums * C);  // lane sums of the current chunk of rows
    acc_t* cdz = chunk.data();
    acc_t* cxmu = cdz + C;
    acc_t* crmu = kRes ? cxmu + C : nullptr;
    for (int64_t b = b0; b < b1; ++b) {
      double* part = partial.data() + b * kSums * C;
      for (int64_t r0 = blocks.begin(b); r0 < blocks.end(b); r0 += blocks.chunk_rows) {
        const int64_t r1 = std::min(blocks.end(b), r0 + blocks.chunk_rows);
        std::fill(chunk.begin(), chunk.end(), acc_t(0));
        for (int64_t row = r0; row < r1; ++row) {
          const auto run = [&](int64_t c, int64_t k) {
            std::array<Sums<typename IO::Vec>, IO::kParts> s;
            const auto dz0 = IO::load_acc(cdz + c, k), xmu0 = IO::load_acc(cxmu + c, k);
            typename IO::Pack rmu0{}, res_mean{};
            if constexpr (kRes) {
              rmu0 = IO::load_acc(crmu + c, k);
              res_mean = IO::load_acc(p.res_mean + c, k);
            }
            for (int64_t q = 0; q < IO::kParts; ++q) s[q] = {dz0[q], xmu0[q], rmu0[q]};
            reduce_step<scalar_t, kRelu, kRes>(p, row * C + c, k, IO::load_acc(p.mean + c, k),
                                               res_mean, s);
            typename IO::Pack dz1, xmu1, rmu1;
            for (int64_t q = 0; q < IO::kParts; ++q) {
              dz1[q] = s[q].dz;
              xmu1[q] = s[q].xmu;
              rmu1[q] = s[q].rmu;
            }
            IO::store_acc(cdz + c, dz1, k);
            IO::store_acc(cxmu + c, xmu1, k);
            if constexpr (kRes) IO::store_acc(crmu + c, rmu1, k);
          };
          int64_t c = 0;
          for (; c + IO::kStep <= C; c += IO::kStep) run(c, IO::kStep);
          if (c < C) run(c, C - c);
        }
        for (int64_t j = 0; j < kSums * C; ++j) part[j] += double(chunk[j]);
      }
    }
  });
  acc_t* outs[3] = {p.sum_dz, p.sum_dz_xmu, p.sum_dz_rmu};
  for (int64_t j = 0; j < kSums; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      double total = 0;
      for (int64_t b = 0; b < blocks.count; ++b) total += partial[(b * kSums + j) * C + c];
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
          reduce_nchw<scalar_t, kRelu, kRes>(p);
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

// The six per-channel coefficients of one vector step.
template <typename Pack>
struct Coefs {
  Pack a, b, d, res_a, res_b, res_d;
};

template <typename scalar_t, bool kRelu, ResidualGrad kRg>
inline void apply_step(const ApplyParams<scalar_t>& p, int64_t i, int64_t k,
                       const Coefs<typename VecIO<scalar_t>::Pack>& w) {
  using IO = VecIO<scalar_t>;
  const auto g = IO::load(p.grad_out + i, k);
  const auto x = IO::load(p.input + i, k);
  typename IO::Pack o{}, r{}, gx, gr;
  if constexpr (kRelu) o = IO::load(p.output + i, k);
  if constexpr (kRg == ResidualGrad::kAffine) r = IO::load(p.residual + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    const auto dz = relu_grad<kRelu>(g[q], o[q]);
    gx[q] = at::vec::fmadd(w.a[q], dz, at::vec::fmadd(w.b[q], x[q], w.d[q]));
    if constexpr (kRg == ResidualGrad::kDz) gr[q] = dz;
    if constexpr (kRg == ResidualGrad::kAffine) {
      gr[q] = at::vec::fmadd(w.res_a[q], dz, at::vec::fmadd(w.res_b[q], r[q], w.res_d[q]));
    }
  }
  IO::store(p.grad_input + i, gx, k);
  if constexpr (kRg != ResidualGrad::kNone) IO::store(p.grad_residual + i, gr, k);
}

template <typename scalar_t, bool kRelu, ResidualGrad kRg>
void apply_nchw(const ApplyParams<scalar_t>& p) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const int64_t HW = p.HW;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(HW, 1));
  at::parallel_for(0, p.N * p.C, grain, [&](int64_t plane0, int64_t plane1) {
    for (int64_t plane = plane0; plane < plane1; ++plane) {
      const int64_t c = plane % p.C;
      Coefs<typename IO::Pack> w{};
      w.a.fill(Vec(p.a[c]));
      w.b.fill(Vec(p.b[c]));
      w.d.fill(Vec(p.d[c]));
      if constexpr (kRg == ResidualGrad::kAffine) {
        w.res_a.fill(Vec(p.res_a[c]));
        w.res_b.fill(Vec(p.res_b[c]));
        w.res_d.fill(Vec(p.res_d[c]));
      }
      const int64_t base = plane * HW;
      int64_t i = 0;
      for (; i + IO::kStep <= HW; i += IO::kStep) apply_step<scalar_t, kRelu, kRg>(p, base + i, IO::kStep, w);
      if (i < HW) apply_step<scalar_t, kRelu, kRg>(p, base + i, HW - i, w);
    }
  });
}

template <typename scalar_t, bool kRelu, ResidualGrad kRg>
void apply_nhwc(const ApplyParams<scalar_t>& p) {
  using IO = VecIO<scalar_t>;
  const int64_t C = p.C;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1));
  const auto run = [&](int64_t base, int64_t c, int64_t k) {
    Coefs<typename IO::Pack> w{};
    w.a = IO::load_acc(p.a + c, k);
    w.b = IO::load_acc(p.b + c, k);
    w.d = IO::load_acc(p.d + c, k);
    if constexpr (kRg == ResidualGrad::kAffine) {
      w.res_a = IO::load_acc(p.res_a + c, k);
      w.res_b = IO::load_acc(p.res_b + c, k);
      w.res_d = IO::load_acc(p.res_d + c, k);
    }
    apply_step<scalar_t, kRelu, kRg>(p, base + c, k, w);
  };
  at::parallel_for(0, p.N * p.HW, grain, [&](int64_t row0, int64_t row1) {
    for (int64_t row = row0; row < row1; ++row) {
      const int64_t base = row * C;
      int64_t c = 0;
      for (; c + IO::kStep <= C; c += IO::kStep) run(base, c, IO::kStep);
      if (c < C) run(base, c, C - c);
    }
  });
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
      constexpr auto kNone = ResidualGrad::kNone, kDz = ResidualGrad::kDz, kAffine = ResidualGrad::kAffine;
      value_switch<kNone, kDz, kAffine>(mode, [&](auto mode_c) {
        constexpr bool kRelu = decltype(relu_c)::value;
        constexpr ResidualGrad kRg = decltype(mode_c)::value;
        if (layout == Layout::NHWC) {
          apply_nhwc<scalar_t, kRelu, kRg>(p);
        } else {
          apply_nchw<scalar_t, kRelu, kRg>(p);
        }
      });
    });
  });
  return {grad_input, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cpu);
}

}  // namespace resfuse::cpu
