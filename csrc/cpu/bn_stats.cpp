// resfuse::bn_stats on CPU: per-channel mean and biased variance over N, H, W.
//
// Numerics: the values of a channel are taken in chunks small enough to stay in cache. A chunk's
// mean and M2 (sum of squared deviations) come from two passes in acc_t: the lane sums of the first
// pass add at most a few hundred values each, and the second pass sums (x - chunk mean)^2, so there
// is no cancellation. Chunks are then merged with Chan et al.'s pairwise formula in double. A
// float32 channel with mean 1e4 and std 1 keeps its variance to ~1e-6 relative, where raw
// sum/sum^2 in float32 would lose every digit.
//
// Work split: NCHW is parallel over channels (each channel walks its N planes); NHWC is parallel
// over fixed row blocks (kernel_utils.h: RowBlocks) with per-block per-channel partials merged in
// block order. Both are independent of the thread count, so results are bitwise reproducible.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "kernel_utils.h"

namespace resfuse::cpu {
namespace {

// NCHW: values per chunk (8 KiB of float, so the second pass reads L1).
constexpr int64_t kChunk = 2048;

// Count, mean and M2 of a set of values, in double.
struct Moments {
  double n = 0;
  double mean = 0;
  double m2 = 0;

  // Chan et al.: add a set of nb values with mean mean_b and M2 m2_b.
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n / total * nb);
    n = total;
  }

  // Mean and biased variance; NaN for an empty set (N*H*W == 0).
  std::pair<double, double> mean_var() const {
    if (n == 0) return {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN()};
    return {mean, m2 / n};
  }
};

// Mean and M2 of n <= kChunk contiguous acc_t values, by two passes.
template <typename acc_t>
C10_ALWAYS_INLINE std::pair<acc_t, acc_t> chunk_moments(const acc_t* v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 += Vec::loadu(v + i);
    s1 += Vec::loadu(v + i + W);
    s2 += Vec::loadu(v + i + 2 * W);
    s3 += Vec::loadu(v + i + 3 * W);
  }
  for (; i < n; i += W) s0 += Vec::loadu(v + i, std::min(W, n - i));  // lanes past n load zero
  const auto plus = [](const Vec& a, const Vec& b) { return a + b; };
  const acc_t mean = at::vec::vec_reduce_all<acc_t>(plus, (s0 + s1) + (s2 + s3)) / acc_t(n);

  const Vec m(mean);
  Vec q0(0), q1(0), q2(0), q3(0);
  i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const Vec d0 = Vec::loadu(v + i) - m, d1 = Vec::loadu(v + i + W) - m;
    const Vec d2 = Vec::loadu(v + i + 2 * W) - m, d3 = Vec::loadu(v + i + 3 * W) - m;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
    q2 = at::vec::fmadd(d2, d2, q2);
    q3 = at::vec::fmadd(d3, d3, q3);
  }
  for (; i < n; i += W) {
    const int64_t k = std::min(W, n - i);
    const Vec d = Vec::set(Vec(0), Vec::loadu(v + i, k) - m, k);  // zero lanes past n
    q0 = at::vec::fmadd(d, d, q0);
  }
  return {mean, at::vec::vec_reduce_all<acc_t>(plus, (q0 + q1) + (q2 + q3))};
}

// n values of src as acc_t into dst.
template <typename scalar_t>
void to_acc(const scalar_t* src, int64_t n, at::opmath_type<scalar_t>* dst) {
  using IO = VecIO<scalar_t>;
  if constexpr (!IO::kReduced) {
    std::memcpy(dst, src, n * sizeof(scalar_t));
  } else {
    for (int64_t i = 0; i < n; i += IO::kStep) {
      const int64_t k = std::min(IO::kStep, n - i);
      IO::store_acc(dst + i, IO::load(src + i, k), k);
    }
  }
}

// NCHW channels [c0, c1) of x [N, C, HW]: each channel walks its N planes in chunks.
template <typename scalar_t>
void stats_channels(const scalar_t* x, int64_t N, int64_t C, int64_t HW,
                    at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* var, int64_t c0,
                    int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  // A chunk is `group` whole planes of one channel when planes are small (gathered into buf), else
  // a piece of one plane of at most kChunk values.
  const int64_t seg = std::min(HW, kChunk);
  const int64_t group = HW >= kChunk / 4 ? 1 : kChunk / std::max<int64_t>(HW, 1);
  std::vector<acc_t> buf(kChunk);
  for (int64_t c = c0; c < c1; ++c) {
    Moments m;
    for (int64_t n0 = 0; n0 < N; n0 += group) {
      const int64_t planes = std::min(group, N - n0);
      for (int64_t i = 0; i < HW; i += seg) {
        const int64_t len = std::min(seg, HW - i);
        const acc_t* vals = buf.data();
        if (planes == 1 && !VecIO<scalar_t>::kReduced) {
          vals = reinterpret_cast<const acc_t*>(x + (n0 * C + c) * HW + i);
        } else {
          for (int64_t q = 0; q < planes; ++q) {
            to_acc(x + ((n0 + q) * C + c) * HW + i, len, buf.data() + q * len);
          }
        }
        const auto [chunk_mean, chunk_m2] = chunk_moments(vals, planes * len);
        m.merge(double(planes * len), chunk_mean, chunk_m2);
      }
    }
    const auto [mu, v] = m.mean_var();
    mean[c] = acc_t(mu);
    var[c] = acc_t(v);
  }
}

// NHWC: per-channel sums over the rows [r0, r1) of x [M, C] for the kSteps vector steps of
// channels from c (all full but the last, which has k_last <= kStep channels), written to out: of x
// when kSquares is false, else of (x - mean[c])^2. Going down a column block keeps the sums in
// registers.
template <typename scalar_t, bool kSquares, int64_t kSteps>
C10_ALWAYS_INLINE void column_sums(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, int64_t c,
                                   int64_t k_last, const at::opmath_type<scalar_t>* mean,
                                   at::opmath_type<scalar_t>* out) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t S = IO::kStep;
  const auto width = [&](int64_t j) { return j == kSteps - 1 ? k_last : S; };
  std::array<typename IO::Pack, kSteps> sum{}, mu{};
  if constexpr (kSquares) {
    for (int64_t j = 0; j < kSteps; ++j) mu[j] = IO::load_acc(mean + c + j * S, width(j));
  }
  for (const scalar_t* px = x + r0 * C + c; px < x + r1 * C + c; px += C) {
    for (int64_t j = 0; j < kSteps; ++j) {
      // Lanes past the width load zero in both x and mean, so they add nothing.
      const auto v = IO::load(px + j * S, width(j));
      for (int64_t q = 0; q < IO::kParts; ++q) {
        if constexpr (kSquares) {
          const auto d = v[q] - mu[j][q];
          sum[j][q] = at::vec::fmadd(d, d, sum[j][q]);
        } else {
          sum[j][q] += v[q];
        }
      }
    }
  }
  for (int64_t j = 0; j < kSteps; ++j) IO::store_acc(out + c + j * S, sum[j], width(j));
}

// column_sums over all C channels, in blocks of 4 acc_t vectors (a 32-channel block in float).
template <typename scalar_t, bool kSquares>
void row_sums(const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
              const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* out) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t S = IO::kStep, kBlock = 8 / IO::kParts;
  int64_t c = 0;
  for (; c + kBlock * S <= C; c += kBlock * S) {
    column_sums<scalar_t, kSquares, kBlock>(x, C, r0, r1, c, S, mean, out);
  }
  for (; c < C; c += S) column_sums<scalar_t, kSquares, 1>(x, C, r0, r1, c, std::min(S, C - c), mean, out);
}

// NHWC row blocks [b0, b1) of x [M, C]: block b leaves its per-channel mean and M2 in
// block_mean[b], block_m2[b].
template <typename scalar_t>
void stats_blocks(const scalar_t* x, int64_t C, const RowBlocks blocks, double* block_mean,
                  double* block_m2, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> chunk_mean(C), chunk_m2(C);
  for (int64_t b = b0; b < b1; ++b) {
    double* bmean = block_mean + b * C;
    double* bm2 = block_m2 + b * C;
    double done = 0;
    for (int64_t r0 = blocks.begin(b); r0 < blocks.end(b); r0 += blocks.chunk_rows) {
      const int64_t r1 = std::min(blocks.end(b), r0 + blocks.chunk_rows);
      const acc_t rows = acc_t(r1 - r0);
      // Two passes over the chunk (the second from cache): per-channel means, then M2.
      row_sums<scalar_t, false>(x, C, r0, r1, nullptr, chunk_mean.data());
      for (int64_t c = 0; c < C; ++c) chunk_mean[c] /= rows;
      row_sums<scalar_t, true>(x, C, r0, r1, chunk_mean.data(), chunk_m2.data());
      // Chan merge of the chunk into the block's partials.
      const double total = done + double(rows);
      const double w_new = double(rows) / total, w_cross = done / total * double(rows);
      for (int64_t c = 0; c < C; ++c) {
        const double delta = double(chunk_mean[c]) - bmean[c];
        bmean[c] += delta * w_new;
        bm2[c] += double(chunk_m2[c]) + delta * delta * w_cross;
      }
      done = total;
    }
  }
}

template <typename scalar_t>
void bn_stats_nhwc(const scalar_t* x, int64_t M, int64_t C, at::opmath_type<scalar_t>* mean,
                   at::opmath_type<scalar_t>* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowBlocks blocks(M, C);
  std::vector<double> block_mean(blocks.count * C, 0.0), block_m2(blocks.count * C, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    stats_blocks(x, C, blocks, block_mean.data(), block_m2.data(), b0, b1);
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments m;
    for (int64_t b = 0; b < blocks.count; ++b) {
      m.merge(double(blocks.end(b) - blocks.begin(b)), block_mean[b * C + c], block_m2[b * C + c]);
    }
    const auto [mu, v] = m.mean_var();
    mean[c] = acc_t(mu);
    var[c] = acc_t(v);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input_) {
  check_bn_stats_args(input_);
  const Layout layout = layout_of(input_);
  const at::Tensor input = to_layout(input_, layout);
  const int64_t N = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  const auto options = input.options().dtype(param_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({C}, options);
  at::Tensor var = at::empty({C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "resfuse::bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    if (layout == Layout::NHWC) {
      bn_stats_nhwc(x, N * HW, C, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    } else {
      acc_t* const mu = mean.mutable_data_ptr<acc_t>();
      acc_t* const v = var.mutable_data_ptr<acc_t>();
      at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
        stats_channels(x, N, C, HW, mu, v, c0, c1);
      });
    }
  });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
}

}  // namespace resfuse::cpu
