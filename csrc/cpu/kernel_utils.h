#pragma once
// Helpers shared by the CPU kernels in this folder: vector I/O in the accumulation type, a
// compile-time switch for flags, and the work partitions of the two layouts (common/layout.h).
//
// Conventions of the kernels, both for the compiler's sake:
// * the function looping over a parallel range takes its parameter struct by value: a local copy,
//   which the output stores provably do not alias, so its pointers stay in registers (through a
//   reference the compiler reloads them after every store);
// * the per-vector-step functions are C10_ALWAYS_INLINE: otherwise GCC may keep a step out of line
//   and pass its vectors through memory.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <type_traits>

#include "../common/layout.h"

namespace resfuse::cpu {

using at::vec::Vectorized;

// Elements of work below which a parallel range is not split further.
constexpr int64_t kGrainElems = 32768;

// at::parallel_for grain for items (planes, rows, channels) of `elems` elements each.
inline int64_t grain_for(int64_t elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems, 1));
}

// NCHW reductions: values a lane sum in acc_t adds before it is flushed into a double total.
constexpr int64_t kFlush = 2048;

// An elementwise pass over [N, C, HW] activations in parallel: NHWC as rows(row0, row1) over the N*HW
// rows of C values, NCHW as planes(plane0, plane1) over the N*C planes of HW values.
template <typename Rows, typename Planes>
void parallel_over_layout(Layout layout, int64_t N, int64_t C, int64_t HW, const Rows& rows, const Planes& planes) {
  if (layout == Layout::NHWC) {
    at::parallel_for(0, N * HW, grain_for(C), rows);
  } else {
    at::parallel_for(0, N * C, grain_for(HW), planes);
  }
}

// Calls f(std::integral_constant<T, v>{}) for the v among Values... that equals `value`, so that a
// runtime flag or mode becomes a compile-time constant inside f:
//   value_switch<false, true>(relu, [&](auto relu_c) { kernel<decltype(relu_c)::value>(...); });
template <auto... Values, typename T, typename F>
void value_switch(T value, F&& f) {
  const bool found = ((value == Values && (f(std::integral_constant<T, Values>{}), true)) || ...);
  TORCH_INTERNAL_ASSERT(found, "value_switch: unexpected value");
}

// dz of a ReLU output: grad where output > 0, else 0 (the select of ATen's threshold_backward, so a
// non-finite grad under a zero output is dropped as in eager, and a NaN output passes grad); grad
// itself without the ReLU.
template <bool kRelu, typename Vec>
C10_ALWAYS_INLINE Vec relu_grad(const Vec& grad, const Vec& output) {
  if constexpr (kRelu) {
    return Vec::blendv(grad, Vec(0), output <= Vec(0));
  } else {
    return grad;
  }
}

// Activations of dtype scalar_t are read and written as vectors of their accumulation type acc_t
// (float for float32, bfloat16 and float16; double for float64). One step covers kStep elements,
// i.e. one Vectorized<scalar_t>, which is kParts vectors of acc_t (2 for bfloat16/float16, else 1).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static constexpr int64_t kParts = kStep / Vec::size();
  using Pack = std::array<Vec, kParts>;

  // All lanes zero (explicitly: older torch versions leave a default-constructed Vectorized
  // uninitialised).
  static C10_ALWAYS_INLINE Pack zero() {
    Pack v;
    v.fill(Vec(0));
    return v;
  }

  // n <= kStep values from p; lanes past n are zero.
  static C10_ALWAYS_INLINE Pack load(const scalar_t* p, int64_t n = kStep) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n));
      return {lo, hi};
    } else {
      return {Vec::loadu(p, n)};
    }
  }

  // The first n <= kStep lanes of v to p (rounded to scalar_t).
  static C10_ALWAYS_INLINE void store(scalar_t* p, const Pack& v, int64_t n = kStep) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, n);
    } else {
      v[0].store(p, n);
    }
  }

  // v rounded to scalar_t and back: the value a store and a load of it give (v for float/double).
  static C10_ALWAYS_INLINE Pack round(const Pack& v) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v[0], v[1]));
      return {lo, hi};
    } else {
      return v;
    }
  }

  // n <= kStep values of a per-channel acc_t vector, shaped like load(); lanes past n are zero.
  static C10_ALWAYS_INLINE Pack load_acc(const acc_t* p, int64_t n = kStep) {
    Pack v;
    for (int64_t k = 0; k < kParts; ++k) {
      const int64_t m = std::clamp<int64_t>(n - k * Vec::size(), 0, Vec::size());
      v[k] = Vec::loadu(p + k * Vec::size(), m);
    }
    return v;
  }

  static C10_ALWAYS_INLINE void store_acc(acc_t* p, const Pack& v, int64_t n = kStep) {
    for (int64_t k = 0; k < kParts; ++k) {
      const int64_t m = std::clamp<int64_t>(n - k * Vec::size(), 0, Vec::size());
      if (m > 0) v[k].store(p + k * Vec::size(), m);
    }
  }
};

// NHWC reductions (rows of C contiguous values) split the M = N*H*W rows into blocks whose bounds
// depend on the shape only, never on the thread count, so that results are bitwise reproducible.
// Each block is reduced by one thread into its own per-channel partials; the partials are merged in
// block order afterwards. Within a block, rows are taken in chunks of `chunk_rows` rows: a float
// lane sum then adds at most kChunkRows values before it is flushed into double, and a chunk
// (<= kChunkElems values) stays in cache for a second pass over it.
struct RowBlocks {
  static constexpr int64_t kMaxBlocks = 64;
  static constexpr int64_t kChunkElems = 16384;
  static constexpr int64_t kChunkRows = 256;

  int64_t rows;
  int64_t count;
  int64_t chunk_rows;

  RowBlocks(int64_t rows_, int64_t channels)
      : rows(rows_),
        count(std::clamp<int64_t>((rows_ * channels + kGrainElems - 1) / kGrainElems, 1,
                                  std::min<int64_t>(kMaxBlocks, std::max<int64_t>(rows_, 1)))),
        chunk_rows(std::clamp<int64_t>(kChunkElems / std::max<int64_t>(channels, 1), 1,
                                       kChunkRows)) {}

  int64_t begin(int64_t block) const { return rows * block / count; }
  int64_t end(int64_t block) const { return rows * (block + 1) / count; }
};

}  // namespace resfuse::cpu
