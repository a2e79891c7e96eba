// resfuse::gate_act and resfuse::gate_act_backward on CPU: a per-image channel gate (the multiply of a
// squeeze-and-excitation block), the shortcut add and the ReLU in one pass, and its backward in one.
//
//   forward:  out = act(input * gate[n, c] + residual)
//   backward: dz = relu_grad(grad_out, out); grad_input = dz * gate[n, c]; grad_residual = dz;
//             grad_gate[n, c] = sum over h, w of dz * input (when input is given)
//
// Elementwise work is split as in bn_act: NCHW over (n, c) planes (the plane's gate is one scalar, its
// grad_gate one lane sum flushed into a double every kFlush values), NHWC over rows of C values (the
// image's gate row read as vectors). The NHWC grad_gate sums each image's rows in fixed blocks
// (RowBlocks over that image's H*W rows: bounds that depend on the shape only), each block's float lane
// sums flushed into double partials per chunk of rows, the partials added in block order — so the
// result does not depend on the thread count.

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

template <typename scalar_t>
struct GateParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* input;
  const scalar_t* residual;  // null without a residual
  const acc_t* gate;         // [N, C]
  scalar_t* out;
  int64_t N, C, HW;
};

template <typename scalar_t, bool kRelu, bool kRes>
C10_ALWAYS_INLINE void gate_step(const GateParams<scalar_t>& p, int64_t i, int64_t k,
                                 const typename VecIO<scalar_t>::Pack& gate) {
  using IO = VecIO<scalar_t>;
  const auto x = IO::load(p.input + i, k);
  typename IO::Pack r{}, y;
  if constexpr (kRes) r = IO::load(p.residual + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    y[q] = kRes ? at::vec::fmadd(x[q], gate[q], r[q]) : x[q] * gate[q];
    if constexpr (kRelu) y[q] = at::vec::maximum(y[q], typename IO::Vec(0));  // propagates NaN
  }
  IO::store(p.out + i, y, k);
}

// NCHW planes [plane0, plane1); plane = n * C + c indexes gate too.
template <typename scalar_t, bool kRelu, bool kRes>
void gate_planes(const GateParams<scalar_t> p, int64_t plane0, int64_t plane1) {
  using IO = VecIO<scalar_t>;
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    typename IO::Pack gate;
    gate.fill(typename IO::Vec(p.gate[plane]));
    const int64_t base = plane * p.HW;
    int64_t i = 0;
    for (; i + IO::kStep <= p.HW; i += IO::kStep) gate_step<scalar_t, kRelu, kRes>(p, base + i, IO::kStep, gate);
    if (i < p.HW) gate_step<scalar_t, kRelu, kRes>(p, base + i, p.HW - i, gate);
  }
}

// NHWC rows [row0, row1) of C values (row / HW is the image): step(i, k, gate) for each run of
// k <= kStep values at offset i, with the image's gate for those channels — forward and backward alike.
template <typename scalar_t, typename Step>
C10_ALWAYS_INLINE void for_gate_rows(const at::opmath_type<scalar_t>* gate_nc, int64_t C, int64_t HW, int64_t row0,
                                     int64_t row1, const Step& step) {
  using IO = VecIO<scalar_t>;
  for (int64_t row = row0; row < row1; ++row) {
    const auto* gate = gate_nc + (row / HW) * C;
    const int64_t base = row * C;
    int64_t c = 0;
    for (; c + IO::kStep <= C; c += IO::kStep) step(base + c, IO::kStep, IO::load_acc(gate + c));
    if (c < C) step(base + c, C - c, IO::load_acc(gate + c, C - c));
  }
}

template <typename scalar_t, bool kRelu, bool kRes>
void gate_rows(const GateParams<scalar_t> p, int64_t row0, int64_t row1) {
  for_gate_rows<scalar_t>(p.gate, p.C, p.HW, row0, row1, [&](int64_t i, int64_t k, const auto& gate) {
    gate_step<scalar_t, kRelu, kRes>(p, i, k, gate);
  });
}

at::Tensor gate_act_cpu(const at::Tensor& input_, const at::Tensor& gate, const std::optional<at::Tensor>& residual_,
                        bool relu) {
  check_gate_act_args(input_, gate, residual_);
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const at::Tensor residual = residual_ ? to_layout(*residual_, layout) : at::Tensor();
  const at::Tensor gate_c = gate.contiguous();
  at::Tensor out = empty_in_layout(input, layout);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::gate_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateParams<scalar_t> p{input.const_data_ptr<scalar_t>(),
                                 residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
                                 gate_c.const_data_ptr<acc_t>(),
                                 out.mutable_data_ptr<scalar_t>(),
                                 input.size(0),
                                 input.size(1),
                                 input.size(2) * input.size(3)};
    value_switch<false, true>(relu, [&](auto relu_c) {
      value_switch<false, true>(residual.defined(), [&](auto res_c) {
        constexpr bool kRelu = decltype(relu_c)::value, kRes = decltype(res_c)::value;
        parallel_over_layout(
            layout, p.N, p.C, p.HW, [&](int64_t r0, int64_t r1) { gate_rows<scalar_t, kRelu, kRes>(p, r0, r1); },
            [&](int64_t p0, int64_t p1) { gate_planes<scalar_t, kRelu, kRes>(p, p0, p1); });
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------- backward

template <typename scalar_t>
struct GateBackParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* output;  // null unless relu
  const scalar_t* input;   // null without grad_gate
  const acc_t* gate;        // [N, C]
  scalar_t* grad_input;
  scalar_t* grad_residual;  // null unless requested
  acc_t* grad_gate;         // [N, C]; null without input
  int64_t N, C, HW;
};

// grad_input (and grad_residual) of the k <= kStep elements at offset i; with kGate, adds dz * input to
// `sum` (lanes past k load zero, so they add nothing).
template <typename scalar_t, bool kRelu, bool kRg, bool kGate>
C10_ALWAYS_INLINE void gate_back_step(const GateBackParams<scalar_t>& p, int64_t i, int64_t k,
                                      const typename VecIO<scalar_t>::Pack& gate, typename VecIO<scalar_t>::Pack& sum) {
  using IO = VecIO<scalar_t>;
  const auto g = IO::load(p.grad_out + i, k);
  typename IO::Pack o{}, x{}, dz, gx;
  if constexpr (kRelu) o = IO::load(p.output + i, k);
  if constexpr (kGate) x = IO::load(p.input + i, k);
  for (int64_t q = 0; q < IO::kParts; ++q) {
    dz[q] = relu_grad<kRelu>(g[q], o[q]);
    gx[q] = dz[q] * gate[q];
    if constexpr (kGate) sum[q] = at::vec::fmadd(dz[q], x[q], sum[q]);
  }
  IO::store(p.grad_input + i, gx, k);
  if constexpr (kRg) IO::store(p.grad_residual + i, dz, k);
}

// NCHW planes [plane0, plane1); with kGate each plane's sum of dz * input goes to grad_gate[plane].
template <typename scalar_t, bool kRelu, bool kRg, bool kGate>
void gate_back_planes(const GateBackParams<scalar_t> p, int64_t plane0, int64_t plane1) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  const auto plus = [](const Vec& a, const Vec& b) { return a + b; };
  for (int64_t plane = plane0; plane < plane1; ++plane) {
    typename IO::Pack gate, sum = IO::zero();
    gate.fill(Vec(p.gate[plane]));
    double total = 0;
    const auto flush = [&] {
      for (int64_t q = 0; q < IO::kParts; ++q) total += at::vec::vec_reduce_all<acc_t>(plus, sum[q]);
      sum = IO::zero();
    };
    const int64_t base = plane * p.HW;
    int64_t i = 0, pending = 0;
    for (; i + IO::kStep <= p.HW; i += IO::kStep) {
      gate_back_step<scalar_t, kRelu, kRg, kGate>(p, base + i, IO::kStep, gate, sum);
      if (kGate && (pending += IO::kStep) >= kFlush) {
        flush();
        pending = 0;
      }
    }
    if (i < p.HW) gate_back_step<scalar_t, kRelu, kRg, kGate>(p, base + i, p.HW - i, gate, sum);
    if constexpr (kGate) {
      flush();
      p.grad_gate[plane] = acc_t(total);
    }
  }
}

// NHWC without grad_gate: rows [row0, row1) of C values, elementwise.
template <typename scalar_t, bool kRelu, bool kRg>
void gate_back_rows(const GateBackParams<scalar_t> p, int64_t row0, int64_t row1) {
  typename VecIO<scalar_t>::Pack unused;
  for_gate_rows<scalar_t>(p.gate, p.C, p.HW, row0, row1, [&](int64_t i, int64_t k, const auto& gate) {
    gate_back_step<scalar_t, kRelu, kRg, false>(p, i, k, gate, unused);
  });
}

// NHWC: channels [c, c + k) of the row at offset `row`, adding dz * input into the chunk's lane sums.
template <typename scalar_t, bool kRelu, bool kRg>
C10_ALWAYS_INLINE void gate_back_row_step(const GateBackParams<scalar_t>& p, at::opmath_type<scalar_t>* chunk,
                                          const at::opmath_type<scalar_t>* gate, int64_t row, int64_t c, int64_t k) {
  using IO = VecIO<scalar_t>;
  auto sum = IO::load_acc(chunk + c, k);
  gate_back_step<scalar_t, kRelu, kRg, true>(p, row + c, k, IO::load_acc(gate + c, k), sum);
  IO::store_acc(chunk + c, sum, k);
}

// NHWC with grad_gate, blocks [t0, t1) of blocks.count blocks per image: block t of image t /
// blocks.count adds its C sums into partial[t].
template <typename scalar_t, bool kRelu, bool kRg>
void gate_back_blocks(const GateBackParams<scalar_t> p, const RowBlocks blocks, double* partial, int64_t t0,
                      int64_t t1) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t C = p.C;
  std::vector<acc_t> chunk(C);  // lane sums of the current chunk of rows
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / blocks.count, b = t % blocks.count;
    const acc_t* gate = p.gate + n * C;
    double* part = partial + t * C;
    for (int64_t r0 = blocks.begin(b); r0 < blocks.end(b); r0 += blocks.chunk_rows) {
      const int64_t r1 = std::min(blocks.end(b), r0 + blocks.chunk_rows);
      std::fill(chunk.begin(), chunk.end(), acc_t(0));
      for (int64_t row = (n * p.HW + r0) * C; row < (n * p.HW + r1) * C; row += C) {
        int64_t c = 0;
        for (; c + IO::kStep <= C; c += IO::kStep) gate_back_row_step<scalar_t, kRelu, kRg>(p, chunk.data(), gate, row, c, IO::kStep);
        if (c < C) gate_back_row_step<scalar_t, kRelu, kRg>(p, chunk.data(), gate, row, c, C - c);
      }
      for (int64_t c = 0; c < C; ++c) part[c] += double(chunk[c]);
    }
  }
}

template <typename scalar_t, bool kRelu, bool kRg>
void gate_back_nhwc(const GateBackParams<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.C;
  const RowBlocks blocks(p.HW, C);  // per image
  std::vector<double> partial(p.N * blocks.count * C, 0.0);
  at::parallel_for(0, p.N * blocks.count, 1, [&](int64_t t0, int64_t t1) {
    gate_back_blocks<scalar_t, kRelu, kRg>(p, blocks, partial.data(), t0, t1);
  });
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double total = 0;
      for (int64_t b = 0; b < blocks.count; ++b) total += partial[(n * blocks.count + b) * C + c];
      p.grad_gate[n * C + c] = acc_t(total);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_act_backward_cpu(const at::Tensor& grad_out_,
                                                                     const at::Tensor& output_,
                                                                     const std::optional<at::Tensor>& input_,
                                                                     const at::Tensor& gate, bool relu,
                                                                     bool residual_grad) {
  check_gate_act_backward_args(grad_out_, output_, input_, gate, relu);
  const at::Tensor& like = input_ ? *input_ : grad_out_;  // layout, shape and dtype of the results
  const Layout layout = layout_of(like);
  const at::Tensor input = input_ ? to_layout(*input_, layout) : at::Tensor();
  const at::Tensor grad_out = to_layout(grad_out_, layout);
  const at::Tensor output = relu ? to_layout(output_, layout) : at::Tensor();
  const at::Tensor gate_c = gate.contiguous();
  at::Tensor grad_input = empty_in_layout(grad_out, layout);
  at::Tensor grad_residual = residual_grad ? empty_in_layout(grad_out, layout) : grad_out.new_empty({0});
  at::Tensor grad_gate = input.defined()
                             ? at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous))
                             : gate.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "resfuse::gate_act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateBackParams<scalar_t> p{grad_out.const_data_ptr<scalar_t>(),
                                     relu ? output.const_data_ptr<scalar_t>() : nullptr,
                                     input.defined() ? input.const_data_ptr<scalar_t>() : nullptr,
                                     gate_c.const_data_ptr<acc_t>(),
                                     grad_input.mutable_data_ptr<scalar_t>(),
                                     residual_grad ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
                                     input.defined() ? grad_gate.mutable_data_ptr<acc_t>() : nullptr,
                                     grad_out.size(0),
                                     grad_out.size(1),
                                     grad_out.size(2) * grad_out.size(3)};
    value_switch<false, true>(relu, [&](auto relu_c) {
      value_switch<false, true>(residual_grad, [&](auto rg_c) {
        constexpr bool kRelu = decltype(relu_c)::value, kRg = decltype(rg_c)::value;
        if (!input.defined()) {
          parallel_over_layout(
              layout, p.N, p.C, p.HW, [&](int64_t r0, int64_t r1) { gate_back_rows<scalar_t, kRelu, kRg>(p, r0, r1); },
              [&](int64_t p0, int64_t p1) { gate_back_planes<scalar_t, kRelu, kRg, false>(p, p0, p1); });
        } else if (layout == Layout::NHWC) {
          gate_back_nhwc<scalar_t, kRelu, kRg>(p);
        } else {
          at::parallel_for(0, p.N * p.C, grain_for(p.HW), [&](int64_t plane0, int64_t plane1) {
            gate_back_planes<scalar_t, kRelu, kRg, true>(p, plane0, plane1);
          });
        }
      });
    });
  });
  return {grad_input, grad_gate, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("gate_act", &gate_act_cpu);
  m.impl("gate_act_backward", &gate_act_backward_cpu);
}

}  // namespace resfuse::cpu
