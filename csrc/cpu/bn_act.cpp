// resfuse::bn_act on CPU: out = act(input * scale[c] + shift[c] + R), one pass over the tensors.
// NCHW is parallel over (n, c) planes with the channel's coefficients broadcast; NHWC is parallel
// over rows of C values with the coefficients read as vectors. Output in input's layout.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "../common/checks.h"
#include "../common/layout.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

// R in the formula: 0, residual, or residual * res_scale[c].
enum class Residual { kNone, kAdd, kScaled };

template <typename scalar_t>
struct BnActParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* input;
  const scalar_t* residual;  // null for Residual::kNone
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* res_scale;  // null unless Residual::kScaled
  scalar_t* out;
  int64_t N, C, HW;
};

// out for the k <= kStep elements at offset i, given the coefficients of their channels.
template <typename scalar_t, bool kRelu, Residual kRes>
C10_ALWAYS_INLINE void bn_act_step(const BnActParams<scalar_t>& p, int64_t i, int64_t k,
                                   const typename VecIO<scalar_t>::Pack& scale,
                                   const typename VecIO<scalar_t>::Pack& shift,
                                   const typename VecIO<scalar_t>::Pack& res_scale) {
  using IO = VecIO<scalar_t>;
  const auto x = IO::load(p.input + i, k);
  typename IO::Pack r{}, y;
  if constexpr (kRes != Residual::kNone) r = IO::load(p.residual + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    y[q] = at::vec::fmadd(x[q], scale[q], shift[q]);
    if constexpr (kRes == Residual::kAdd) y[q] = y[q] + r[q];
    if constexpr (kRes == Residual::kScaled) y[q] = at::vec::fmadd(r[q], res_scale[q], y[q]);
    if constexpr (kRelu) y[q] = at::vec::maximum(y[q], typename IO::Vec(0));  // propagates NaN
  }
  IO::store(p.out + i, y, k);
}

// NHWC: the k <= kStep channels [c, c + k) of the row at offset `row`, coefficients read as vectors.
template <typename scalar_t, bool kRelu, Residual kRes>
C10_ALWAYS_INLINE void bn_act_row_step(const BnActParams<scalar_t>& p, int64_t row, int64_t c,
                                       int64_t k) {
  using IO = VecIO<scalar_t>;
  typename IO::Pack res_scale{};
  if constexpr (kRes == Residual::kScaled) res_scale = IO::load_acc(p.res_scale + c, k);
  bn_act_step<scalar_t, kRelu, kRes>(p, row + c, k, IO::load_acc(p.scale + c, k),
                                     IO::load_acc(p.shift + c, k), res_scale);
}

// NCHW planes [plane0, plane1): the channel's coefficients are broadcast over the plane.
template <typename scalar_t, bool kRelu, Residual kRes>
void bn_act_planes(const BnActParams<scalar_t> p, int64_t plane0, int64_t plane1) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    const int64_t c = plane % p.C;
    typename IO::Pack scale, shift, res_scale{};
    scale.fill(Vec(p.scale[c]));
    shift.fill(Vec(p.shift[c]));
    if constexpr (kRes == Residual::kScaled) res_scale.fill(Vec(p.res_scale[c]));
    const int64_t base = plane * p.HW;
    int64_t i = 0;
    for (; i + IO::kStep <= p.HW; i += IO::kStep) {
      bn_act_step<scalar_t, kRelu, kRes>(p, base + i, IO::kStep, scale, shift, res_scale);
    }
    if (i < p.HW) bn_act_step<scalar_t, kRelu, kRes>(p, base + i, p.HW - i, scale, shift, res_scale);
  }
}

// NHWC rows [row0, row1) of C values.
template <typename scalar_t, bool kRelu, Residual kRes>
void bn_act_rows(const BnActParams<scalar_t> p, int64_t row0, int64_t row1) {
  using IO = VecIO<scalar_t>;
  for (int64_t row = row0 * p.C; row < row1 * p.C; row += p.C) {
    int64_t c = 0;
    for (; c + IO::kStep <= p.C; c += IO::kStep) bn_act_row_step<scalar_t, kRelu, kRes>(p, row, c, IO::kStep);
    if (c < p.C) bn_act_row_step<scalar_t, kRelu, kRes>(p, row, c, p.C - c);
  }
}

at::Tensor bn_act_cpu(const at::Tensor& input_, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual_,
                      const std::optional<at::Tensor>& res_scale_, bool relu) {
  check_bn_act_args(input_, scale, shift, residual_, res_scale_);
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor residual = residual_ ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor scale_c = scale.contiguous(), shift_c = shift.contiguous();
  const at::Tensor res_scale = res_scale_ ? res_scale_->contiguous() : at::Tensor();
  at::Tensor out = empty_in_layout(input, layout);
  const Residual mode = !residual.defined()   ? Residual::kNone
                        : res_scale.defined() ? Residual::kScaled
                                              : Residual::kAdd;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::bn_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnActParams<scalar_t> p{
        input.const_data_ptr<scalar_t>(),
        residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
        scale_c.const_data_ptr<acc_t>(),
        shift_c.const_data_ptr<acc_t>(),
        res_scale.defined() ? res_scale.const_data_ptr<acc_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(),
        input.size(0),
        input.size(1),
        input.size(2) * input.size(3)};
    value_switch<false, true>(relu, [&](auto relu_c) {
      value_switch<Residual::kNone, Residual::kAdd, Residual::kScaled>(mode, [&](auto mode_c) {
        constexpr bool kRelu = decltype(relu_c)::value;
        constexpr Residual kRes = decltype(mode_c)::value;
        parallel_over_layout(
            layout, p.N, p.C, p.HW, [&](int64_t r0, int64_t r1) { bn_act_rows<scalar_t, kRelu, kRes>(p, r0, r1); },
            [&](int64_t p0, int64_t p1) { bn_act_planes<scalar_t, kRelu, kRes>(p, p0, p1); });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_act", &bn_act_cpu);
}

}  // namespace resfuse::cpu
