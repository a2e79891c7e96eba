// CUDA kernels of the four BatchNorm primitives (docs/architecture.md): bn_stats, bn_act,
// bn_act_backward_reduce, bn_act_backward_apply. Launchers are declared in bn_act_kernel.cuh.
//
// Two kernel templates carry all four ops; an "op" functor supplies the per-element math:
//
//   reduce_partials_kernel<Op, kChannelsLast, V>   per-channel reduction -> per-block partials
//   pointwise_kernel<Op, kChannelsLast, V>         elementwise with per-channel coefficients
//   merge_partials_kernel<Final>                   fixed-order merge of the partials of each channel
//
// Memory access. V is the number of elements in one 16-byte access (V = 1 when the tensor is not
// 16-byte aligned or the contiguous run is not a multiple of 16 bytes):
// * channels_last: the tensor is a row-major [rows = N*H*W, C] matrix. A thread owns V adjacent
//   channels (one vector) and walks rows; per-channel coefficients are loaded once per thread.
// * NCHW: the tensor is N*C planes of H*W contiguous elements. A thread owns V adjacent elements of
//   one plane; for the reductions a block owns one channel and walks its N planes.
//
// Statistics: per thread a Welford recurrence (channels_last: one element per channel per row, the
// reciprocal of the shared count computed once per row; NCHW: each V-element chunk is reduced exactly
// and merged with Chan's formula), then Chan merges in a fixed tree inside the block and a fixed
// sequential+tree order across blocks. No atomics: bit-reproducible for a given GPU (the number of
// blocks depends on the SM count).
#include "bn_act_kernel.cuh"
#include "common.cuh"

namespace resfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMinRowsPerThread = 4;  // the row splits G are capped so that each thread gets >= 4 rows

// Per-block partial results: ws[(part * G + block) * C + channel].
template <typename Acc> __device__ __forceinline__ Acc& partial(Acc* ws, int part, int64_t G, int64_t C,
                                                              int64_t p, int64_t c) {
  return ws[(part * G + p) * C + c];
}

// ---- reduction ops -----------------------------------------------------------------------------
// L lanes of state per thread: L = V channels (channels_last) or L = 1 channel (NCHW).
template <typename T, int L> struct StatsOp {
  using Acc = acc_t<T>;
  struct State {
    Acc n, mean[L], m2[L];  // the count is shared by the lanes: every lane sees the same rows
  };
  struct Consts {};
  const T* __restrict__ x;

  __device__ __forceinline__ void init(State& s) const {
    s.n = Acc(0);
#pragma unroll
    for (int l = 0; l < L; ++l) s.mean[l] = s.m2[l] = Acc(0);
  }
  __device__ __forceinline__ void load_consts(Consts&, int64_t) const {}

  // channels_last: one element for each of the L channels (Welford, one reciprocal per row).
  __device__ __forceinline__ void row(State& s, const Consts&, int64_t off) const {
    const Pack<T, L> v = load_pack<L>(x + off);
    s.n += Acc(1);
    const Acc inv = Acc(1) / s.n;
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const Acc xv = to_acc(v[l]);
      const Acc d = xv - s.mean[l];
      s.mean[l] += d * inv;
      s.m2[l] += d * (xv - s.mean[l]);
    }
  }
  // NCHW (L == 1): V elements of one channel, reduced exactly, then merged (Chan).
  template <int V> __device__ __forceinline__ void chunk(State& s, const Consts&, int64_t off) const {
    const Pack<T, V> v = load_pack<V>(x + off);
    Acc sum = Acc(0);
#pragma unroll
    for (int i = 0; i < V; ++i) sum += to_acc(v[i]);
    const Acc mean = sum / Acc(V);
    Acc m2 = Acc(0);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const Acc d = to_acc(v[i]) - mean;
      m2 += d * d;
    }
    Moments<Acc> m{s.n, s.mean[0], s.m2[0]};
    m.merge(Acc(V), mean, m2);
    s.n = m.n, s.mean[0] = m.mean, s.m2[0] = m.m2;
  }
  // Chan's merge, lane by lane, with the count-dependent factors computed once.
  __device__ __forceinline__ static void merge(State& a, const State& b) {
    const Acc n = a.n + b.n;
    if (n == Acc(0)) return;
    const Acc f = b.n / n, g = a.n * f;
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const Acc delta = b.mean[l] - a.mean[l];
      a.mean[l] += delta * f;
      a.m2[l] += b.m2[l] + delta * delta * g;
    }
    a.n = n;
  }
  __device__ __forceinline__ void store(const State& s, Acc* ws, int64_t G, int64_t C, int64_t p,
                                        int64_t c0) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      partial(ws, 0, G, C, p, c0 + l) = s.n;
      partial(ws, 1, G, C, p, c0 + l) = s.mean[l];
      partial(ws, 2, G, C, p, c0 + l) = s.m2[l];
    }
  }
};

// dz = grad_out where the forward ReLU passed, else 0 (when relu): the select of ATen's
// threshold_backward (output <= 0 -> 0), so a non-finite grad under a zero output is dropped as in
// eager and NaN outputs pass the gradient, exactly like the reference and CPU kernels.
template <typename T> __device__ __forceinline__ acc_t<T> relu_grad(bool relu, T g, T out) {
  return relu && to_acc(out) <= acc_t<T>(0) ? acc_t<T>(0) : to_acc(g);
}

// Sums of dz, dz * (x - mean[c]), dz * (r - res_mean[c]).
template <typename T, int L> struct BackwardReduceOp {
  using Acc = acc_t<T>;
  struct State {
    Acc s[3][L];
  };
  struct Consts {
    Acc mean[L], res_mean[L];
  };
  const T* __restrict__ g;
  const T* __restrict__ out;
  const T* __restrict__ x;
  const T* __restrict__ r;  // nullptr: no residual
  const Acc* __restrict__ mean;
  const Acc* __restrict__ res_mean;
  bool relu;

  __device__ __forceinline__ void init(State& s) const {
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
      for (int l = 0; l < L; ++l) s.s[k][l] = Acc(0);
  }
  __device__ __forceinline__ void load_consts(Consts& k, int64_t c0) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      k.mean[l] = mean[c0 + l];
      k.res_mean[l] = r ? res_mean[c0 + l] : Acc(0);
    }
  }
  template <int V> __device__ __forceinline__ void accumulate(State& s, const Consts& k, int64_t off) const {
    const Pack<T, V> gv = load_pack<V>(g + off);
    const Pack<T, V> xv = load_pack<V>(x + off);
    Pack<T, V> ov{}, rv{};
    if (relu) ov = load_pack<V>(out + off);
    if (r) rv = load_pack<V>(r + off);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int l = L == 1 ? 0 : i;
      const Acc dz = relu_grad(relu, gv[i], ov[i]);
      s.s[0][l] += dz;
      s.s[1][l] += dz * (to_acc(xv[i]) - k.mean[l]);
      if (r) s.s[2][l] += dz * (to_acc(rv[i]) - k.res_mean[l]);
    }
  }
  __device__ __forceinline__ void row(State& s, const Consts& k, int64_t off) const { accumulate<L>(s, k, off); }
  template <int V> __device__ __forceinline__ void chunk(State& s, const Consts& k, int64_t off) const {
    accumulate<V>(s, k, off);
  }
  __device__ __forceinline__ static void merge(State& a, const State& b) {
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
      for (int l = 0; l < L; ++l) a.s[k][l] += b.s[k][l];
  }
  __device__ __forceinline__ void store(const State& s, Acc* ws, int64_t G, int64_t C, int64_t p,
                                        int64_t c0) const {
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
      for (int l = 0; l < L; ++l) partial(ws, k, G, C, p, c0 + l) = s.s[k][l];
  }
};

// ---- reduction kernel --------------------------------------------------------------------------
// channels_last: grid (ceil(C/V / TX), G), block (TX, TY): thread (tx, ty) owns channel vector
//   blockIdx.x*TX + tx and rows blockIdx.y*TY + ty + k*G*TY; the block merges over ty.
// NCHW: grid (C, G), block (TX, TY): the block owns channel blockIdx.x; thread (tx, ty) walks samples
//   n = blockIdx.y*TY + ty + k*G*TY and chunks tx + j*TX of each plane; the block merges over all.
// (__launch_bounds__ minBlocks = 1: with the bare thread bound, ptxas 13 spills a register inside the
// loop on sm_90a to reach a higher occupancy target.)
template <class Op, bool kChannelsLast, int V>
__global__ void __launch_bounds__(kThreads, 1) reduce_partials_kernel(const Op op, const ActShape s,
                                                                    typename Op::Acc* __restrict__ ws) {
  using State = typename Op::State;
  __shared__ State st[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t G = gridDim.y;

  State acc;
  op.init(acc);
  typename Op::Consts k;
  bool active = true;
  int64_t c0;
  if constexpr (kChannelsLast) {
    const int64_t cv = int64_t(blockIdx.x) * TX + tx;
    active = cv < s.C / V;
    c0 = cv * V;
    if (active) {
      op.load_consts(k, c0);
      const int64_t rows = s.N * s.HW;
      for (int64_t r = int64_t(blockIdx.y) * TY + ty; r < rows; r += G * TY) op.row(acc, k, r * s.C + c0);
    }
  } else {
    c0 = blockIdx.x;
    op.load_consts(k, c0);
    const int64_t hwv = s.HW / V;
    for (int64_t n = int64_t(blockIdx.y) * TY + ty; n < s.N; n += G * TY) {
      const int64_t base = (n * s.C + c0) * s.HW;
      for (int64_t j = tx; j < hwv; j += TX) op.template chunk<V>(acc, k, base + j * V);
    }
  }

  // Fixed-order tree over the block's members of a group (same channel(s)).
  const int group = kChannelsLast ? tx : 0;
  const int member = kChannelsLast ? ty : ty * TX + tx;
  const int members = kChannelsLast ? TY : TX * TY;
  const int stride = kChannelsLast ? TX : 1;
  st[member * stride + group] = acc;
  for (int h = members / 2; h > 0; h /= 2) {
    __syncthreads();
    if (member < h) Op::merge(st[member * stride + group], st[(member + h) * stride + group]);
  }
  if (member == 0 && active) op.store(st[group], ws, G, s.C, blockIdx.y, c0);
}

// ---- merging partials --------------------------------------------------------------------------
template <typename Acc_> struct MomentsFinal {
  using Acc = Acc_;
  using State = Moments<Acc>;
  Acc* mean;
  Acc* var;
  __device__ __forceinline__ static State zero() { return {Acc(0), Acc(0), Acc(0)}; }
  __device__ __forceinline__ static State load(const Acc* ws, int64_t G, int64_t C, int64_t p, int64_t c) {
    return {ws[(0 * G + p) * C + c], ws[(1 * G + p) * C + c], ws[(2 * G + p) * C + c]};
  }
  __device__ __forceinline__ static void merge(State& a, const State& b) { a.merge(b); }
  __device__ __forceinline__ void write(int64_t c, const State& s) const {
    const Acc nan = quiet_nan<Acc>();
    mean[c] = s.n > Acc(0) ? s.mean : nan;
    var[c] = s.n > Acc(0) ? s.m2 / s.n : nan;
  }
};

template <typename Acc_> struct SumsFinal {
  using Acc = Acc_;
  struct State {
    Acc s[3];
  };
  Acc* out[3];  // out[2] is nullptr when there is no residual
  __device__ __forceinline__ static State zero() { return {{Acc(0), Acc(0), Acc(0)}}; }
  __device__ __forceinline__ static State load(const Acc* ws, int64_t G, int64_t C, int64_t p, int64_t c) {
    return {{ws[(0 * G + p) * C + c], ws[(1 * G + p) * C + c], ws[(2 * G + p) * C + c]}};
  }
  __device__ __forceinline__ static void merge(State& a, const State& b) {
    for (int k = 0; k < 3; ++k) a.s[k] += b.s[k];
  }
  __device__ __forceinline__ void write(int64_t c, const State& s) const {
    for (int k = 0; k < 3; ++k)
      if (out[k]) out[k][c] = s.s[k];
  }
};

constexpr int kMergeTX = 32, kMergeTY = 16;

// grid ceil(C / 32), block (32, 16): thread (tx, ty) merges partials ty, ty+16, ... of channel
// blockIdx.x*32 + tx in order, then a fixed tree over ty.
template <class Final>
__global__ void __launch_bounds__(kMergeTX * kMergeTY)
    merge_partials_kernel(const Final f, const typename Final::Acc* __restrict__ ws, int64_t G, int64_t C) {
  using State = typename Final::State;
  __shared__ State st[kMergeTY][kMergeTX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kMergeTX + tx;
  State acc = Final::zero();
  if (c < C)
    for (int64_t p = ty; p < G; p += kMergeTY) Final::merge(acc, Final::load(ws, G, C, p, c));
  st[ty][tx] = acc;
  for (int h = kMergeTY / 2; h > 0; h /= 2) {
    __syncthreads();
    if (ty < h) Final::merge(st[ty][tx], st[ty + h][tx]);
  }
  if (ty == 0 && c < C) f.write(c, st[0][tx]);
}

template <class Final>
cudaError_t launch_merge(const Final& f, const typename Final::Acc* ws, int64_t G, int64_t C, cudaStream_t stream) {
  merge_partials_kernel<Final><<<unsigned(ceil_div(C, kMergeTX)), dim3(kMergeTX, kMergeTY), 0, stream>>>(f, ws, G, C);
  return cudaGetLastError();
}

// ---- pointwise ops -----------------------------------------------------------------------------
// L = V lanes of coefficients (channels_last: V channels) or L = 1 (NCHW: one channel).
template <typename T, int L> struct BnActOp {
  using Acc = acc_t<T>;
  struct Consts {
    Acc scale[L], shift[L], res_scale[L];
  };
  const T* __restrict__ x;
  const Acc* __restrict__ scale;
  const Acc* __restrict__ shift;
  const T* __restrict__ r;          // nullptr: no residual
  const Acc* __restrict__ r_scale;  // nullptr: residual added as is
  T* __restrict__ out;
  bool relu;

  __device__ __forceinline__ void load_consts(Consts& k, int64_t c0) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      k.scale[l] = scale[c0 + l];
      k.shift[l] = shift[c0 + l];
      k.res_scale[l] = r_scale ? r_scale[c0 + l] : Acc(1);
    }
  }
  template <int V> __device__ __forceinline__ void apply(const Consts& k, int64_t off) const {
    const Pack<T, V> xv = load_pack<V>(x + off);
    Pack<T, V> rv{}, ov;
    if (r) rv = load_pack<V>(r + off);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int l = L == 1 ? 0 : i;
      Acc v = to_acc(xv[i]) * k.scale[l] + k.shift[l];
      if (r) v += to_acc(rv[i]) * k.res_scale[l];
      ov[i] = from_acc<T>(relu ? relu_nan(v) : v);
    }
    store_pack<V>(out + off, ov);
  }
};

template <typename T, int L> struct BackwardApplyOp {
  using Acc = acc_t<T>;
  struct Consts {
    Acc a[L], b[L], d[L], ra[L], rb[L], rd[L];
  };
  const T* __restrict__ g;
  const T* __restrict__ out;
  const T* __restrict__ x;
  const T* __restrict__ r;
  const Acc* __restrict__ a;
  const Acc* __restrict__ b;
  const Acc* __restrict__ d;
  const Acc* __restrict__ ra;  // nullptr: grad_residual = dz
  const Acc* __restrict__ rb;
  const Acc* __restrict__ rd;
  T* __restrict__ gx;
  T* __restrict__ gr;  // nullptr: no residual gradient
  bool relu;

  __device__ __forceinline__ void load_consts(Consts& k, int64_t c0) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const int64_t c = c0 + l;
      k.a[l] = a[c], k.b[l] = b[c], k.d[l] = d[c];
      const bool res_coef = gr && ra;
      k.ra[l] = res_coef ? ra[c] : Acc(0);
      k.rb[l] = res_coef ? rb[c] : Acc(0);
      k.rd[l] = res_coef ? rd[c] : Acc(0);
    }
  }
  template <int V> __device__ __forceinline__ void apply(const Consts& k, int64_t off) const {
    const Pack<T, V> gv = load_pack<V>(g + off);
    const Pack<T, V> xv = load_pack<V>(x + off);
    const bool res_coef = gr && ra;
    Pack<T, V> ov{}, rv{}, gxv, grv;
    if (relu) ov = load_pack<V>(out + off);
    if (res_coef) rv = load_pack<V>(r + off);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int l = L == 1 ? 0 : i;
      const Acc dz = relu_grad(relu, gv[i], ov[i]);
      gxv[i] = from_acc<T>(k.a[l] * dz + k.b[l] * to_acc(xv[i]) + k.d[l]);
      if (gr) grv[i] = from_acc<T>(res_coef ? k.ra[l] * dz + k.rb[l] * to_acc(rv[i]) + k.rd[l] : dz);
    }
    store_pack<V>(gx + off, gxv);
    if (gr) store_pack<V>(gr + off, grv);
  }
};

// ---- pointwise kernel --------------------------------------------------------------------------
// channels_last: grid (ceil(C/V / TX), Gy), block (TX, TY): thread owns channel vector
//   blockIdx.x*TX + tx and walks rows (grid-stride over N*H*W).
// NCHW: grid (ceil(HW/V / TX), Gy), block (TX, TY): thread owns vector blockIdx.x*TX + tx of every
//   plane it visits (grid-stride over the N*C planes); the channel advances incrementally.
template <class Op, bool kChannelsLast, int V>
__global__ void __launch_bounds__(kThreads) pointwise_kernel(const Op op, const ActShape s) {
  const int64_t row_len = kChannelsLast ? s.C : s.HW;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= row_len / V) return;
  const int64_t outer = kChannelsLast ? s.N * s.HW : s.N * s.C;
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  int64_t o = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
  typename Op::Consts k;
  if constexpr (kChannelsLast) {
    op.load_consts(k, i * V);
    for (; o < outer; o += step) op.template apply<V>(k, o * row_len + i * V);
  } else {
    const int64_t step_c = step % s.C;
    int64_t c = o % s.C;
    for (; o < outer; o += step) {
      op.load_consts(k, c);
      op.template apply<V>(k, o * row_len + i * V);
      c += step_c;
      if (c >= s.C) c -= s.C;
    }
  }
}

// ---- launch geometry ---------------------------------------------------------------------------
int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

struct Geometry {
  dim3 grid, block;
};

// Vector width for a tensor of T: 16 bytes when every pointer is 16-byte aligned and the contiguous
// run (C for channels_last, H*W for NCHW) is a multiple of it.
template <typename T> bool use_vec(const ActShape& s, std::initializer_list<const void*> ptrs) {
  const int64_t run = s.channels_last ? s.C : s.HW;
  if (run % kVec16<T> != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

Geometry reduce_geometry(const ActShape& s, int V, int num_sms) {
  const int64_t target_blocks = int64_t(num_sms) * (2048 / kThreads);
  Geometry g;
  if (s.channels_last) {
    const int64_t cv = s.C / V;
    const int tx = pow2_at_least(cv, 32), ty = kThreads / tx;
    const int64_t gx = ceil_div(cv, tx);
    const int64_t rows_cap = ceil_div(s.N * s.HW, int64_t(ty) * kMinRowsPerThread);
    const int64_t gy = std::max<int64_t>(1, std::min({ceil_div(target_blocks, gx), rows_cap, int64_t(65535)}));
    g.grid = dim3(unsigned(gx), unsigned(gy));
    g.block = dim3(tx, ty);
  } else {
    const int tx = pow2_at_least(s.HW / V, kThreads), ty = kThreads / tx;
    const int64_t n_cap = ceil_div(s.N, ty);
    const int64_t gy = std::max<int64_t>(1, std::min({ceil_div(target_blocks, s.C), n_cap, int64_t(65535)}));
    g.grid = dim3(unsigned(s.C), unsigned(gy));
    g.block = dim3(tx, ty);
  }
  return g;
}

Geometry pointwise_geometry(const ActShape& s, int V, int num_sms) {
  const int64_t target_blocks = int64_t(num_sms) * (2048 / kThreads) * 4;
  const int64_t inner = (s.channels_last ? s.C : s.HW) / V;
  const int64_t outer = s.channels_last ? s.N * s.HW : s.N * s.C;
  const int tx = pow2_at_least(inner, s.channels_last ? 32 : kThreads), ty = kThreads / tx;
  const int64_t gx = ceil_div(inner, tx);
  const int64_t gy = std::max<int64_t>(1, std::min({ceil_div(target_blocks, gx), ceil_div(outer, ty), int64_t(65535)}));
  return {dim3(unsigned(gx), unsigned(gy)), dim3(tx, ty)};
}

bool empty(const ActShape& s) { return s.N == 0 || s.C == 0 || s.HW == 0; }

template <template <typename, int> class Op, typename T, typename MakeOp>
cudaError_t launch_reduce(const ActShape& s, bool vec, int num_sms, acc_t<T>* ws, MakeOp make_op,
                          cudaStream_t stream) {
  return BOOL_SWITCH(s.channels_last, kChannelsLast, [&] {
    return BOOL_SWITCH(vec, kVecOn, [&] {
      constexpr int V = kVecOn ? kVec16<T> : 1;
      using OpT = Op<T, kChannelsLast ? V : 1>;
      const Geometry g = reduce_geometry(s, V, num_sms);
      reduce_partials_kernel<OpT, kChannelsLast, V><<<g.grid, g.block, 0, stream>>>(make_op(OpT{}), s, ws);
      return cudaGetLastError();
    });
  });
}

template <template <typename, int> class Op, typename T, typename MakeOp>
cudaError_t launch_pointwise(const ActShape& s, bool vec, int num_sms, MakeOp make_op, cudaStream_t stream) {
  return BOOL_SWITCH(s.channels_last, kChannelsLast, [&] {
    return BOOL_SWITCH(vec, kVecOn, [&] {
      constexpr int V = kVecOn ? kVec16<T> : 1;
      using OpT = Op<T, kChannelsLast ? V : 1>;
      const Geometry g = pointwise_geometry(s, V, num_sms);
      pointwise_kernel<OpT, kChannelsLast, V><<<g.grid, g.block, 0, stream>>>(make_op(OpT{}), s);
      return cudaGetLastError();
    });
  });
}

template <typename T> bool stats_vec(const BnStatsParams& p) { return use_vec<T>(p.shape, {p.input}); }
template <typename T> bool reduce_vec(const BnBackwardReduceParams& p) {
  return use_vec<T>(p.shape, {p.grad_out, p.relu ? p.output : nullptr, p.input, p.residual});
}
int64_t reduce_parts(const ActShape& s, int V, int num_sms) {
  return int64_t(reduce_geometry(s, V, num_sms).grid.y);
}

}  // namespace

// ---- launchers ---------------------------------------------------------------------------------
template <typename T> int64_t bn_stats_workspace_elems(const BnStatsParams& p) {
  if (empty(p.shape)) return 0;
  return 3 * p.shape.C * reduce_parts(p.shape, stats_vec<T>(p) ? kVec16<T> : 1, p.num_sms);
}

template <typename T> int64_t bn_backward_reduce_workspace_elems(const BnBackwardReduceParams& p) {
  if (empty(p.shape)) return 0;
  return 3 * p.shape.C * reduce_parts(p.shape, reduce_vec<T>(p) ? kVec16<T> : 1, p.num_sms);
}

template <typename Acc>
cudaError_t merge_moments_cuda(const Acc* partials, int64_t G, int64_t C, Acc* mean, Acc* var, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  return launch_merge(MomentsFinal<Acc>{mean, var}, partials, G, C, stream);
}

template <typename T> cudaError_t bn_stats_cuda(const BnStatsParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const ActShape& s = p.shape;
  if (s.C == 0) return cudaSuccess;
  if (empty(s))  // no elements: mean and var are NaN, as torch.var_mean of an empty tensor
    return launch_merge(MomentsFinal<Acc>{static_cast<Acc*>(p.mean), static_cast<Acc*>(p.var)},
                        static_cast<const Acc*>(nullptr), 0, s.C, stream);
  const bool vec = stats_vec<T>(p);
  Acc* ws = static_cast<Acc*>(p.workspace);
  cudaError_t err = launch_reduce<StatsOp, T>(s, vec, p.num_sms, ws, [&](auto op) {
    op.x = static_cast<const T*>(p.input);
    return op;
  }, stream);
  if (err != cudaSuccess) return err;
  const int64_t G = reduce_parts(s, vec ? kVec16<T> : 1, p.num_sms);
  return merge_moments_cuda<Acc>(ws, G, s.C, static_cast<Acc*>(p.mean), static_cast<Acc*>(p.var), stream);
}

template <typename T> cudaError_t bn_backward_reduce_cuda(const BnBackwardReduceParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const ActShape& s = p.shape;
  if (s.C == 0) return cudaSuccess;
  SumsFinal<Acc> fin{{static_cast<Acc*>(p.sum_dz), static_cast<Acc*>(p.sum_dz_xmu),
                      p.residual ? static_cast<Acc*>(p.sum_dz_rmu) : nullptr}};
  if (empty(s)) return launch_merge(fin, static_cast<const Acc*>(nullptr), 0, s.C, stream);  // zero sums
  const bool vec = reduce_vec<T>(p);
  Acc* ws = static_cast<Acc*>(p.workspace);
  cudaError_t err = launch_reduce<BackwardReduceOp, T>(s, vec, p.num_sms, ws, [&](auto op) {
    op.g = static_cast<const T*>(p.grad_out);
    op.out = static_cast<const T*>(p.output);
    op.x = static_cast<const T*>(p.input);
    op.r = static_cast<const T*>(p.residual);
    op.mean = static_cast<const Acc*>(p.mean);
    op.res_mean = static_cast<const Acc*>(p.res_mean);
    op.relu = p.relu;
    return op;
  }, stream);
  if (err != cudaSuccess) return err;
  return launch_merge(fin, ws, reduce_parts(s, vec ? kVec16<T> : 1, p.num_sms), s.C, stream);
}

template <typename T> cudaError_t bn_act_cuda(const BnActParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (empty(p.shape)) return cudaSuccess;
  const bool vec = use_vec<T>(p.shape, {p.input, p.residual, p.out});
  return launch_pointwise<BnActOp, T>(p.shape, vec, p.num_sms, [&](auto op) {
    op.x = static_cast<const T*>(p.input);
    op.scale = static_cast<const Acc*>(p.scale);
    op.shift = static_cast<const Acc*>(p.shift);
    op.r = static_cast<const T*>(p.residual);
    op.r_scale = static_cast<const Acc*>(p.res_scale);
    op.out = static_cast<T*>(p.out);
    op.relu = p.relu;
    return op;
  }, stream);
}

template <typename T> cudaError_t bn_backward_apply_cuda(const BnBackwardApplyParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (empty(p.shape)) return cudaSuccess;
  const bool vec = use_vec<T>(p.shape, {p.grad_out, p.relu ? p.output : nullptr, p.input, p.residual,
                                        p.grad_input, p.grad_residual});
  return launch_pointwise<BackwardApplyOp, T>(p.shape, vec, p.num_sms, [&](auto op) {
    op.g = static_cast<const T*>(p.grad_out);
    op.out = static_cast<const T*>(p.output);
    op.x = static_cast<const T*>(p.input);
    op.r = static_cast<const T*>(p.residual);
    op.a = static_cast<const Acc*>(p.a);
    op.b = static_cast<const Acc*>(p.b);
    op.d = static_cast<const Acc*>(p.d);
    op.ra = static_cast<const Acc*>(p.res_a);
    op.rb = static_cast<const Acc*>(p.res_b);
    op.rd = static_cast<const Acc*>(p.res_d);
    op.gx = static_cast<T*>(p.grad_input);
    op.gr = static_cast<T*>(p.grad_residual);
    op.relu = p.relu;
    return op;
  }, stream);
}

#define RESFUSE_INSTANTIATE_BN(T)                                                                    \
  template int64_t bn_stats_workspace_elems<T>(const BnStatsParams&);                                \
  template int64_t bn_backward_reduce_workspace_elems<T>(const BnBackwardReduceParams&);             \
  template cudaError_t bn_stats_cuda<T>(const BnStatsParams&, cudaStream_t);                         \
  template cudaError_t bn_act_cuda<T>(const BnActParams&, cudaStream_t);                             \
  template cudaError_t bn_backward_reduce_cuda<T>(const BnBackwardReduceParams&, cudaStream_t);      \
  template cudaError_t bn_backward_apply_cuda<T>(const BnBackwardApplyParams&, cudaStream_t);
RESFUSE_INSTANTIATE_BN(float)
RESFUSE_INSTANTIATE_BN(double)
RESFUSE_INSTANTIATE_BN(__half)
RESFUSE_INSTANTIATE_BN(__nv_bfloat16)
#undef RESFUSE_INSTANTIATE_BN

template cudaError_t merge_moments_cuda<float>(const float*, int64_t, int64_t, float*, float*, cudaStream_t);
template cudaError_t merge_moments_cuda<double>(const double*, int64_t, int64_t, double*, double*, cudaStream_t);

}  // namespace resfuse::cuda
