// resfuse::bn_normalize, resfuse::bn_backward_coefficients and resfuse::bn_running_update_ on CPU:
// the per-channel arithmetic of one BN layer of a fused chain — forward coefficients, backward
// coefficients, running-statistics update — each one call instead of 4-8 tensor ops from Python (at
// ~3-5 us each, ~65 us per BN layer and train step: a fifth of a small fused block's step, see
// resfuse/ops/chain.py). C is at most a few thousand: one serial loop per op, in the statistics
// dtype (float32, float64 for float64 activations), each formula evaluated in the order of the
// tensor-op form it replaces (resfuse/ops/chain.py, resfuse/functional.py).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace resfuse::cpu {
namespace {

// A [C] float32/float64 vector of the statistics dtype `dtype`, contiguous (checked: these ops are
// called by resfuse itself, but a clear message beats a wrong result).
void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t C, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [C] = [", C, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (the dtype of mean), got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

at::ScalarType stats_dtype(const char* op, const at::Tensor& mean) {
  const auto st = mean.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": mean must be float32 or float64, got ", st);
  TORCH_CHECK(mean.dim() == 1, op, ": mean must be a [C] vector, got shape ", mean.sizes());
  return st;
}

// invstd = 1 / sqrt(var + eps); scale = weight * invstd (invstd without weight); shift = bias -
// mean * scale (-(mean * invstd) without weight); unbiased = var * count / max(count - 1, 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_normalize_cpu(
    const at::Tensor& mean_, const at::Tensor& var_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, double eps, int64_t count) {
  constexpr const char* op = "resfuse::bn_normalize";
  const auto dtype = stats_dtype(op, mean_);
  const int64_t C = mean_.size(0);
  check_vector(op, "mean", mean_, C, dtype);
  check_vector(op, "var", var_, C, dtype);
  TORCH_CHECK(weight_.has_value() == bias_.has_value(), op, ": weight and bias go together");
  if (weight_) {
    check_vector(op, "weight", *weight_, C, dtype);
    check_vector(op, "bias", *bias_, C, dtype);
  }
  const at::Tensor mean = mean_.contiguous(), var = var_.contiguous();
  const at::Tensor weight = weight_ ? weight_->contiguous() : at::Tensor();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor invstd = at::empty({C}, mean.options()), scale = at::empty({C}, mean.options());
  at::Tensor shift = at::empty({C}, mean.options()), unbiased = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "resfuse::bn_normalize", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* is = invstd.mutable_data_ptr<scalar_t>();
    scalar_t* sc = scale.mutable_data_ptr<scalar_t>();
    scalar_t* sh = shift.mutable_data_ptr<scalar_t>();
    scalar_t* ub = unbiased.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    const auto ratio = static_cast<scalar_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t inv = scalar_t(1) / std::sqrt(v[c] + e);
      is[c] = inv;
      if (w) {
        sc[c] = inv * w[c];
        sh[c] = b[c] - m[c] * sc[c];
      } else {
        sc[c] = inv;
        sh[c] = -(m[c] * inv);
      }
      ub[c] = v[c] * ratio;
    }
  });
  return {invstd, scale, shift, unbiased};
}

// The backward coefficients of one layer from its reduced gradient sums, for dL/dy = a * dz + b * y
// + d: xmu = sum_dz_xmu * invstd (= dL/dweight); a = weight * invstd (invstd without weight); with
// batch statistics b = -(a * invstd * xmu) / count, d = -(a * sum_dz + count * b * mean) / count,
// else b = d = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coefficients_cpu(
    const at::Tensor& sum_dz_, const at::Tensor& sum_dz_xmu_, const at::Tensor& mean_, const at::Tensor& invstd_,
    const std::optional<at::Tensor>& weight_, int64_t count, bool batch_stats) {
  constexpr const char* op = "resfuse::bn_backward_coefficients";
  const auto dtype = stats_dtype(op, mean_);
  const int64_t C = mean_.size(0);
  check_vector(op, "sum_dz", sum_dz_, C, dtype);
  check_vector(op, "sum_dz_xmu", sum_dz_xmu_, C, dtype);
  check_vector(op, "invstd", invstd_, C, dtype);
  if (weight_) check_vector(op, "weight", *weight_, C, dtype);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  const at::Tensor sum_dz = sum_dz_.contiguous(), sum_dz_xmu = sum_dz_xmu_.contiguous();
  const at::Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const at::Tensor weight = weight_ ? weight_->contiguous() : at::Tensor();
  at::Tensor a = at::empty({C}, mean.options()), b = at::empty({C}, mean.options());
  at::Tensor d = at::empty({C}, mean.options()), xmu = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "resfuse::bn_backward_coefficients", [&] {
    const scalar_t* sdz = sum_dz.const_data_ptr<scalar_t>();
    const scalar_t* sxm = sum_dz_xmu.const_data_ptr<scalar_t>();
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* inv = invstd.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *ap = a.mutable_data_ptr<scalar_t>(), *bp = b.mutable_data_ptr<scalar_t>();
    scalar_t *dp = d.mutable_data_ptr<scalar_t>(), *xp = xmu.mutable_data_ptr<scalar_t>();
    const auto neg_inv_count = static_cast<scalar_t>(-1.0 / static_cast<double>(count));
    const auto n = static_cast<scalar_t>(count);
    for (int64_t c = 0; c < C; ++c) {
      xp[c] = sxm[c] * inv[c];
      ap[c] = w ? w[c] * inv[c] : inv[c];
      if (batch_stats) {
        bp[c] = ap[c] * inv[c] * xp[c] * neg_inv_count;
        dp[c] = (ap[c] * sdz[c] + n * bp[c] * m[c]) * neg_inv_count;
      } else {
        bp[c] = dp[c] = scalar_t(0);
      }
    }
  });
  return {a, b, d, xmu};
}

// running_mean = (1 - momentum) * running_mean + momentum * mean, running_var likewise with
// unbiased, num_batches_tracked += 1 — nn.BatchNorm2d's update for a float momentum.
void bn_running_update_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                           const at::Tensor& num_batches_tracked, const at::Tensor& mean, const at::Tensor& unbiased,
                           double momentum) {
  constexpr const char* op = "resfuse::bn_running_update_";
  const auto dtype = stats_dtype(op, mean);
  const int64_t C = mean.size(0);
  check_vector(op, "unbiased", unbiased, C, dtype);
  check_vector(op, "running_mean", running_mean, C, dtype);
  check_vector(op, "running_var", running_var, C, dtype);
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
              ": running_mean and running_var must be contiguous");
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong &&
                  num_batches_tracked.device().is_cpu(),
              op, ": num_batches_tracked must be a one-element int64 CPU tensor, got ",
              num_batches_tracked.scalar_type(), " ", num_batches_tracked.sizes());
  const at::Tensor m_c = mean.contiguous(), u_c = unbiased.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "resfuse::bn_running_update_", [&] {
    const scalar_t* m = m_c.const_data_ptr<scalar_t>();
    const scalar_t* u = u_c.const_data_ptr<scalar_t>();
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    const auto keep = static_cast<scalar_t>(1.0 - momentum), mom = static_cast<scalar_t>(momentum);
    for (int64_t c = 0; c < C; ++c) {  // as ATen's running.mul_(keep).add_(x, alpha=momentum): one fma
      rm[c] = std::fma(m[c], mom, rm[c] * keep);
      rv[c] = std::fma(u[c], mom, rv[c] * keep);
    }
  });
  *num_batches_tracked.mutable_data_ptr<int64_t>() += 1;
  // as an ATen in-place op does: whoever caches values derived from these buffers (BN folded into a
  // conv weight, resfuse/functional.py) sees the change through their version counters
  for (const at::Tensor* t : {&running_mean, &running_var, &num_batches_tracked}) {
    t->unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_normalize", &bn_normalize_cpu);
  m.impl("bn_backward_coefficients", &bn_backward_coefficients_cpu);
  m.impl("bn_running_update_", &bn_running_update_cpu);
}

}  // namespace resfuse::cpu
