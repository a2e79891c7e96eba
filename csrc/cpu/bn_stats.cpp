// resfuse::bn_stats on CPU: per-channel mean and biased variance over N, H, W.
//
// Numerics: the values of a channel are taken in chunks small enough to stay in cache, and each
// chunk by the corrected two-pass algorithm (Chan, Golub & LeVeque) in acc_t: pass 1 gives an
// approximate mean m~ (lane sums of at most a few hundred values); pass 2 sums d = x - m~ and d^2,
// which have no cancellation (d is exact in float32 when x is near m~). The chunk's mean is then
// m~ + sum(d)/n and its M2 is sum(d^2) - sum(d)^2/n, in double; chunks are merged with Chan et al.'s
// pairwise formula in double. A float32 channel with mean 1e4 and std 1 keeps its variance to
// ~1e-6 relative (raw sum/sum^2 in float32 would lose every digit).
//
// Work split: NCHW is parallel over channels (each channel walks its N planes); NHWC is parallel
// over fixed row blocks (kernel_utils.h: RowBlocks) with per-block per-channel partials, merged in
// block order, in parallel over channels (RowMoments: one count per set of rows, so a merge is
// multiply-adds per channel). Both are independent of the thread count, so results are bitwise
// reproducible.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
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

  // Moments of n values from their sum of deviations from `shift` and of squared deviations.
  static Moments from_deviations(double n, double shift, double sum_d, double sum_d2) {
    return {n, shift + sum_d / n, std::max(0.0, sum_d2 - sum_d * (sum_d / n))};
  }

  // Chan et al.: add the moments of another set.
  void merge(const Moments& o) {
    if (o.n == 0) return;
    const double total = n + o.n;
    const double delta = o.mean - mean;
    mean += delta * (o.n / total);
    m2 += o.m2 + delta * delta * (n / total * o.n);
    n = total;
  }

  // Mean and biased variance; NaN for an empty set (N*H*W == 0).
  std::pair<double, double> mean_var() const {
    if (n == 0) return {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN()};
    return {mean, m2 / n};
  }
};

// Moments of n <= kChunk contiguous acc_t values, by the corrected two-pass algorithm.
template <typename acc_t>
C10_ALWAYS_INLINE Moments chunk_moments(const acc_t* v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const auto plus = [](const Vec& a, const Vec& b) { return a + b; };
  const auto reduce = [&](const Vec& a) { return double(at::vec::vec_reduce_all<acc_t>(plus, a)); };
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 += Vec::loadu(v + i);
    s1 += Vec::loadu(v + i + W);
    s2 += Vec::loadu(v + i + 2 * W);
    s3 += Vec::loadu(v + i + 3 * W);
  }
  for (; i < n; i += W) s0 += Vec::loadu(v + i, std::min(W, n - i));  // lanes past n load zero
  const acc_t shift = acc_t(reduce((s0 + s1) + (s2 + s3)) / double(n));

  const Vec m(shift);
  Vec d_sum0(0), d_sum1(0), d2_sum0(0), d2_sum1(0);
  i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec d0 = Vec::loadu(v + i) - m, d1 = Vec::loadu(v + i + W) - m;
    d_sum0 += d0;
    d_sum1 += d1;
    d2_sum0 = at::vec::fmadd(d0, d0, d2_sum0);
    d2_sum1 = at::vec::fmadd(d1, d1, d2_sum1);
  }
  for (; i < n; i += W) {
    const int64_t k = std::min(W, n - i);
    const Vec d = Vec::set(Vec(0), Vec::loadu(v + i, k) - m, k);  // zero lanes past n
    d_sum0 += d;
    d2_sum0 = at::vec::fmadd(d, d, d2_sum0);
  }
  return Moments::from_deviations(double(n), shift, reduce(d_sum0 + d_sum1), reduce(d2_sum0 + d2_sum1));
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
        m.merge(chunk_moments(vals, planes * len));
      }
    }
    const auto [mu, v] = m.mean_var();
    mean[c] = acc_t(mu);
    var[c] = acc_t(v);
  }
}

// NHWC, for the rows [r0, r1) of x [M, C] and the kSteps vector steps of channels from c (all full
// but the last, which has k_last <= kStep channels), per-channel sums going down the column block so
// that they stay in registers. Pass 1 (kDeviations false): sum(x) into sum_d. Pass 2: sum(d) into
// sum_d and sum(d^2) into sum_d2, d = x - shift[c].
template <typename scalar_t, bool kDeviations, int64_t kSteps>
C10_ALWAYS_INLINE void column_sums(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, int64_t c,
                                   int64_t k_last, const at::opmath_type<scalar_t>* shift,
                                   at::opmath_type<scalar_t>* sum_d, at::opmath_type<scalar_t>* sum_d2) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t S = IO::kStep;
  const auto width = [&](int64_t j) { return j == kSteps - 1 ? k_last : S; };
  std::array<typename IO::Pack, kSteps> s1, s2, mu;
  s1.fill(IO::zero());
  s2.fill(IO::zero());
  if constexpr (kDeviations) {
    for (int64_t j = 0; j < kSteps; ++j) mu[j] = IO::load_acc(shift + c + j * S, width(j));
  }
  for (const scalar_t* px = x + r0 * C + c; px < x + r1 * C + c; px += C) {
    for (int64_t j = 0; j < kSteps; ++j) {
      // Lanes past the width load zero in both x and shift, so they add nothing.
      const auto v = IO::load(px + j * S, width(j));
      for (int64_t q = 0; q < IO::kParts; ++q) {
        if constexpr (kDeviations) {
          const auto d = v[q] - mu[j][q];
          s1[j][q] += d;
          s2[j][q] = at::vec::fmadd(d, d, s2[j][q]);
        } else {
          s1[j][q] += v[q];
        }
      }
    }
  }
  for (int64_t j = 0; j < kSteps; ++j) {
    IO::store_acc(sum_d + c + j * S, s1[j], width(j));
    if constexpr (kDeviations) IO::store_acc(sum_d2 + c + j * S, s2[j], width(j));
  }
}

// column_sums over all C channels, in column blocks of kVecs acc_t vectors: 8 for pass 1 (the
// 64 channels of a float32 row in one sweep down the chunk, which streams it from memory), 4 for
// pass 2 (three vectors per step; it re-reads the chunk from cache).
template <typename scalar_t, bool kDeviations>
void row_sums(const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
              const at::opmath_type<scalar_t>* shift, at::opmath_type<scalar_t>* sum_d,
              at::opmath_type<scalar_t>* sum_d2) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t S = IO::kStep, kBlock = (kDeviations ? 4 : 8) / IO::kParts;
  int64_t c = 0;
  for (; c + kBlock * S <= C; c += kBlock * S) {
    column_sums<scalar_t, kDeviations, kBlock>(x, C, r0, r1, c, S, shift, sum_d, sum_d2);
  }
  for (; c < C; c += S) {
    column_sums<scalar_t, kDeviations, 1>(x, C, r0, r1, c, std::min(S, C - c), shift, sum_d, sum_d2);
  }
}

// Per-channel moments of a set of rows, channels [c0, c1), structure of arrays: every channel of a
// set has the same count n, so adding a set takes two scalar weights and then only multiply-adds
// per channel (a per-channel Moments::merge divides per channel, which made the merges the bulk of
// the work for >= 512 channels on a small map: 8x2048x4x4 took 170 us, 1 thread).
struct RowMoments {
  double n = 0;
  double* mean;  // [c1 - c0], zero-initialised
  double* m2;    // [c1 - c0]
  int64_t c0, c1;

  // Chan et al.'s merge (Moments::merge) with a set of `rows` rows whose channel c has mean and M2
  // moments(c) (a pair).
  template <typename F>
  C10_ALWAYS_INLINE void add(double rows, const F& moments) {
    if (rows == 0) return;
    const double total = n + rows, w = rows / total, f = n / total * rows;
    for (int64_t c = c0; c < c1; ++c) {
      const auto [cm, cm2] = moments(c);
      const double delta = cm - mean[c - c0];
      mean[c - c0] += delta * w;  // (the first set: w = 1, f = 0, so mean = cm and m2 = cm2 exactly)
      m2[c - c0] += cm2 + delta * delta * f;
    }
    n = total;
  }
};

// NHWC row blocks [b0, b1) of x [M, C]: block b leaves the moments of its rows in
// mean[b * C + c], m2[b * C + c].
template <typename scalar_t>
void stats_blocks(const scalar_t* x, int64_t C, const RowBlocks blocks, double* mean, double* m2, int64_t b0,
                  int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> shift(C), sum_d(C), sum_d2(C);
  for (int64_t b = b0; b < b1; ++b) {
    RowMoments m{0, mean + b * C, m2 + b * C, 0, C};
    for (int64_t r0 = blocks.begin(b); r0 < blocks.end(b); r0 += blocks.chunk_rows) {
      const int64_t r1 = std::min(blocks.end(b), r0 + blocks.chunk_rows);
      const double rows = double(r1 - r0), inv = 1.0 / rows;
      row_sums<scalar_t, false>(x, C, r0, r1, nullptr, shift.data(), nullptr);
      for (int64_t c = 0; c < C; ++c) shift[c] = acc_t(double(shift[c]) * inv);
      row_sums<scalar_t, true>(x, C, r0, r1, shift.data(), sum_d.data(), sum_d2.data());
      // the chunk's moments from its deviations (Moments::from_deviations)
      m.add(rows, [&](int64_t c) {
        const double d = double(sum_d[c]);
        return std::pair<double, double>(double(shift[c]) + d * inv,
                                         std::max(0.0, double(sum_d2[c]) - d * (d * inv)));
      });
    }
  }
}

template <typename scalar_t>
void bn_stats_nhwc(const scalar_t* x, int64_t M, int64_t C, at::opmath_type<scalar_t>* mean,
                   at::opmath_type<scalar_t>* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowBlocks blocks(M, C);
  std::vector<double> bmean(blocks.count * C, 0.0), bm2(blocks.count * C, 0.0), tmean(C, 0.0), tm2(C, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    stats_blocks(x, C, blocks, bmean.data(), bm2.data(), b0, b1);
  });
  // the blocks merged in block order, in parallel over channels
  at::parallel_for(0, C, grain_for(2 * blocks.count), [&](int64_t c0, int64_t c1) {
    RowMoments m{0, tmean.data() + c0, tm2.data() + c0, c0, c1};
    for (int64_t b = 0; b < blocks.count; ++b) {
      m.add(double(blocks.end(b) - blocks.begin(b)),
            [&](int64_t c) { return std::pair<double, double>(bmean[b * C + c], bm2[b * C + c]); });
    }
    for (int64_t c = c0; c < c1; ++c) {
      const auto [mu, v] = Moments{m.n, tmean[c], tm2[c]}.mean_var();
      mean[c] = acc_t(mu);
      var[c] = acc_t(v);
    }
  });
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
