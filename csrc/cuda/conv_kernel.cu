// Fused convolution: implicit GEMM over NHWC with the BN/bias/residual/ReLU epilogue or the BN
// statistics epilogue in the same launch. Launchers declared in conv_kernel.cuh.
//
// GEMM view (groups = 1):  M = N*P*Q output pixels,  Ncol = K output channels,  Kg = R*S*C.
//   A[m][k] = x[n][p*sh - ph + r*dh][q*sw - pw + s*dw][c]   (zero outside the image),  k = (r*S + s)*C + c
//   B[k][j] = w[j][r][s][c]                                  (weights as [K, R*S*C], row-major)
//   y[m][j] = sum_k A[m][k] * B[k][j]                       ([N*P*Q, K] row-major = NHWC)
//
// One CTA computes a BM x BN tile of y:
//   1. mainloop: a kStages-deep cp.async pipeline streams BK-wide slices of A (gathered on the fly:
//      implicit im2col) and B into shared memory; each warp multiplies its slice on tensor cores
//      (MmaMath: ldmatrix + mma.sync.m16n8k16, 16-bit types) or on CUDA cores (SimtMath: float/double).
//      When C and K are multiples of 16 bytes' worth of elements (kVec) every smem fill is one
//      zero-filling 16-byte cp.async; otherwise (e.g. a C = 3 stem) elements are gathered one by one.
//   2. the accumulators go to shared memory (a [BM][BN] tile of acc_t<T>, aliasing the pipeline);
//   3. epilogue, all threads, coalesced 16-byte stores along K:
//      inference   y = act(acc * scale[k] + bias[k] + residual);
//      statistics  y = acc rounded to T; then each column (channel) of the tile is reduced exactly
//                  (two-pass mean, then M2 over the rows this CTA owns) and written as one
//                  (count, mean, M2) partial per (M tile, channel). merge_moments_cuda combines the
//                  partials of each channel in a fixed order (Chan's formula): no atomics, deterministic.
#include "bn_act_kernel.cuh"
#include "common.cuh"
#include "conv_kernel.cuh"

namespace resfuse::cuda {
namespace {

// ---- tensor-core primitives (sm_80+) -----------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T> struct Mma16816;
#define RESFUSE_MMA_16816(T, PTX_TYPE)                                                                 \
  template <> struct Mma16816<T> {                                                                     \
    __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "                \
                   "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                   \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                     \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));                 \
    }                                                                                                  \
  };
RESFUSE_MMA_16816(__half, "f16")
RESFUSE_MMA_16816(__nv_bfloat16, "bf16")
#undef RESFUSE_MMA_16816

// ---- warp-level math ---------------------------------------------------------------------------
// Tensor cores: WARPS_M x WARPS_N warps, each owning a WM x WN sub-tile = MT x NT mma tiles of 16x8.
// Shared memory holds A as [BM][ld] and B as [BN][ld] (k contiguous, ld = padded BK), which are the
// row-major A and "col-major" B operands of mma.row.col, both loaded with non-transposed ldmatrix.
template <typename T, int BM, int BN, int BK, int WARPS_M, int WARPS_N> struct MmaMath {
  using Acc = float;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MT = WM / 16, NT = WN / 8;
  static constexpr int kCPad = 8;  // [BM][BN + 8] float tile: the float2 fragment stores are conflict-free
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0, "mma tile shape");
  float acc[MT][NT][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  __device__ __forceinline__ void compute(const T* As, const T* Bs, int ld) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MT][4], b[NT][2];
      // A 16x16: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0..a3; lane l addresses row l%16, k 8*(l/16).
#pragma unroll
      for (int i = 0; i < MT; ++i) ldmatrix_x4(a[i], As + (wm + i * 16 + lane % 16) * ld + kk + (lane / 16) * 8);
      // B two n8 tiles: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, Bs + (wn + j * 8 + (lane / 16) * 8 + lane % 8) * ld + kk + ((lane / 8) % 2) * 8);
        b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) Mma16816<T>::run(acc[i][j], a[i], b[j]);
    }
  }

  // Accumulator fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g+8 (g = lane/4, t = lane%4).
  __device__ __forceinline__ void store(float* Cs, int ldc) const {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float* c = Cs + (wm + i * 16 + lane / 4) * ldc + wn + j * 8 + (lane % 4) * 2;
        *reinterpret_cast<float2*>(c) = make_float2(acc[i][j][0], acc[i][j][1]);
        *reinterpret_cast<float2*>(c + 8 * ldc) = make_float2(acc[i][j][2], acc[i][j][3]);
      }
  }
};

// CUDA cores (float, double): thread (ty, tx) of a TROWS x TCOLS grid owns rows ty + i*TROWS and
// columns tx + j*TCOLS of the tile; operands are read from shared memory as 16-byte vectors along k.
template <typename T, int BM, int BN, int BK, int TM, int TN> struct SimtMath {
  using Acc = acc_t<T>;
  static constexpr int V = kVec16<T>;
  static constexpr int TROWS = BM / TM, TCOLS = BN / TN, kThreads = TROWS * TCOLS;
  static constexpr int kCPad = V;
  static_assert(BK % V == 0, "simt tile shape");
  Acc acc[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);
  }

  __device__ __forceinline__ void compute(const T* As, const T* Bs, int ld) {
    const int ty = threadIdx.x / TCOLS, tx = threadIdx.x % TCOLS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += V) {
      Pack<T, V> a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = load_pack<V>(As + (ty + i * TROWS) * ld + kk);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = load_pack<V>(Bs + (tx + j * TCOLS) * ld + kk);
#pragma unroll
      for (int e = 0; e < V; ++e)
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a[i][e] * b[j][e];
    }
  }

  __device__ __forceinline__ void store(Acc* Cs, int ldc) const {
    const int ty = threadIdx.x / TCOLS, tx = threadIdx.x % TCOLS;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(ty + i * TROWS) * ldc + tx + j * TCOLS] = acc[i][j];
  }
};

// ---- CTA tile ----------------------------------------------------------------------------------
template <typename T, int BM_, int BN_, int BK_, int kStages_, class Math_> struct ConvTile {
  using Math = Math_;
  using Acc = typename Math::Acc;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kStages = kStages_;
  static constexpr int kThreads = Math::kThreads;
  static constexpr int V = kVec16<T>;         // elements per 16-byte chunk
  static constexpr int BKP = BK + V;          // padded smem row of A/B: 16-byte aligned, rows spread over banks
  static constexpr int BNP = BN + Math::kCPad;
  static constexpr int kParts = kThreads / BN;  // threads per channel in the statistics pass
  static constexpr size_t kPipeBytes = size_t(kStages) * (BM + BN) * BKP * sizeof(T);
  static constexpr size_t kCBytes = size_t(BM) * BNP * sizeof(Acc);
  static constexpr size_t kStatBytes = size_t(3) * kParts * BN * sizeof(Acc);
  static constexpr size_t smem_bytes(bool stats) {
    return kPipeBytes > kCBytes + (stats ? kStatBytes : 0) ? kPipeBytes : kCBytes + (stats ? kStatBytes : 0);
  }
  static_assert(kThreads % BN == 0 && BM % kParts == 0, "statistics pass shape");
};

// Tile per element type: 16-bit types on tensor cores (a narrower N tile when K <= 64, the common
// ResNet stage-1 width, so that half of each CTA does not multiply padding); float/double on CUDA cores.
template <typename T, bool kNarrow> struct TileFor {
  using type = ConvTile<T, 64, 64, 16, 3, SimtMath<T, 64, 64, 16, 4, 4>>;
};
template <typename T> inline constexpr bool kTensorCore = sizeof(T) == 2;
template <> struct TileFor<__half, false> { using type = ConvTile<__half, 128, 128, 32, 3, MmaMath<__half, 128, 128, 32, 2, 4>>; };
template <> struct TileFor<__half, true> { using type = ConvTile<__half, 128, 64, 32, 3, MmaMath<__half, 128, 64, 32, 4, 2>>; };
template <> struct TileFor<__nv_bfloat16, false> {
  using type = ConvTile<__nv_bfloat16, 128, 128, 32, 3, MmaMath<__nv_bfloat16, 128, 128, 32, 2, 4>>;
};
template <> struct TileFor<__nv_bfloat16, true> {
  using type = ConvTile<__nv_bfloat16, 128, 64, 32, 3, MmaMath<__nv_bfloat16, 128, 64, 32, 4, 2>>;
};

// ---- global -> shared loads (implicit im2col) --------------------------------------------------
// Thread t fills 16-byte chunk column kc = t % CPR of rows t / CPR + i * ROWS of the A and B slices;
// its rows are fixed for the whole mainloop, so their image coordinates are computed once.
template <typename T, class Tile, bool kVec> struct TileLoader {
  static constexpr int V = Tile::V, BK = Tile::BK, BKP = Tile::BKP;
  static constexpr int CPR = BK / V, ROWS = Tile::kThreads / CPR;
  static constexpr int A_ITERS = Tile::BM / ROWS, B_ITERS = Tile::BN / ROWS;
  static_assert(Tile::kThreads % CPR == 0 && Tile::BM % ROWS == 0 && Tile::BN % ROWS == 0, "loader shape");
  static constexpr int kInvalidRow = -(1 << 30);  // h0 of a row past M: never inside the image

  const T* __restrict__ x;
  const T* __restrict__ w;
  int H, W, C, S, Kg, dil_h, dil_w;
  int kc, row0;
  int64_t a_base[A_ITERS];  // n * H * W * C
  int a_h0[A_ITERS], a_w0[A_ITERS];
  int64_t b_base[B_ITERS];  // j * Kg, or -1 for a column past K

  __device__ __forceinline__ TileLoader(const ConvParams& p, int m0, int n0)
      : x(static_cast<const T*>(p.x)), w(static_cast<const T*>(p.w)), H(p.H), W(p.W), C(p.C), S(p.S),
        Kg(p.R * p.S * p.C), dil_h(p.dil_h), dil_w(p.dil_w) {
    kc = threadIdx.x % CPR;
    row0 = threadIdx.x / CPR;
    const int M = p.N * p.P * p.Q, PQ = p.P * p.Q;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      const int m = m0 + row0 + i * ROWS;
      const int n = m / PQ, pq = m - n * PQ, oh = pq / p.Q, ow = pq - oh * p.Q;
      a_base[i] = int64_t(n) * H * W * C;
      a_h0[i] = m < M ? oh * p.stride_h - p.pad_h : kInvalidRow;
      a_w0[i] = ow * p.stride_w - p.pad_w;
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int j = n0 + row0 + i * ROWS;
      b_base[i] = j < p.K ? int64_t(j) * Kg : -1;
    }
  }

  // Offset of A element (row i, k) in x, or -1 when it is padding / past the end.
  __device__ __forceinline__ int64_t a_offset(int i, int k) const {
    if (k >= Kg) return -1;
    const int rs = k / C, c = k - rs * C, r = rs / S, s = rs - r * S;
    const int h = a_h0[i] + r * dil_h, ww = a_w0[i] + s * dil_w;
    if (unsigned(h) >= unsigned(H) || unsigned(ww) >= unsigned(W)) return -1;
    return a_base[i] + (int64_t(h) * W + ww) * C + c;
  }

  __device__ __forceinline__ void load(T* As, T* Bs, int kt) const {
    const int k = kt * BK + kc * V;
    if constexpr (kVec) {  // C % V == 0: a chunk is V channels of one filter tap
#pragma unroll
      for (int i = 0; i < A_ITERS; ++i) {
        const int64_t off = a_offset(i, k);
        cp_async_16(As + (row0 + i * ROWS) * BKP + kc * V, off >= 0 ? x + off : x, off >= 0);
      }
#pragma unroll
      for (int i = 0; i < B_ITERS; ++i) {
        const bool ok = b_base[i] >= 0 && k < Kg;
        cp_async_16(Bs + (row0 + i * ROWS) * BKP + kc * V, ok ? w + b_base[i] + k : w, ok);
      }
    } else {  // element by element (synchronous); visible after the next __syncthreads
#pragma unroll
      for (int e = 0; e < V; ++e) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
          const int64_t off = a_offset(i, k + e);
          As[(row0 + i * ROWS) * BKP + kc * V + e] = off >= 0 ? x[off] : from_acc<T>(0);
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
          const bool ok = b_base[i] >= 0 && k + e < Kg;
          Bs[(row0 + i * ROWS) * BKP + kc * V + e] = ok ? w[b_base[i] + k + e] : from_acc<T>(0);
        }
      }
    }
  }
};

// ---- epilogues ---------------------------------------------------------------------------------
// Threads walk the [BM][BN] accumulator tile in EV-element vectors along K (coalesced stores).
template <typename T, class Tile, bool kVec, bool kStats>
__device__ __forceinline__ void epilogue(const ConvParams& p, typename Tile::Acc* Cs, unsigned char* smem,
                                         int m0, int n0, int M) {
  using Acc = typename Tile::Acc;
  constexpr int BM = Tile::BM, BN = Tile::BN, BNP = Tile::BNP, kThreads = Tile::kThreads;
  constexpr int EV = kVec ? Tile::V : 1;
  constexpr int TPR = BN / EV, RPP = kThreads / TPR;
  static_assert(kThreads % TPR == 0 && BM % RPP == 0, "epilogue shape");
  const int tid = threadIdx.x;
  const int vc = tid % TPR, n = n0 + vc * EV;
  const bool n_ok = n < p.K;  // with kVec, K % EV == 0: the whole vector is in range
  T* __restrict__ y = static_cast<T*>(p.y);

  Acc sc[EV], bi[EV];
  if constexpr (!kStats) {
    const Acc* scale = static_cast<const Acc*>(p.scale);
    const Acc* bias = static_cast<const Acc*>(p.bias);
#pragma unroll
    for (int e = 0; e < EV; ++e) {
      sc[e] = scale && n_ok ? scale[n + e] : Acc(1);
      bi[e] = bias && n_ok ? bias[n + e] : Acc(0);
    }
  }
  const T* __restrict__ res = static_cast<const T*>(p.residual);

#pragma unroll 4
  for (int row = tid / TPR; row < BM; row += RPP) {
    const int m = m0 + row;
    if (m >= M || !n_ok) continue;
    Acc* c = Cs + row * BNP + vc * EV;
    Pack<Acc, EV> v = load_pack<EV>(c);
    Pack<T, EV> out;
    const int64_t off = int64_t(m) * p.K + n;
    if constexpr (kStats) {
#pragma unroll
      for (int e = 0; e < EV; ++e) {
        out[e] = from_acc<T>(v[e]);
        v[e] = to_acc(out[e]);  // the statistics describe y as stored
      }
      store_pack<EV>(c, v);
    } else {
      Pack<T, EV> rv{};
      if (res) rv = load_pack<EV>(res + off);
#pragma unroll
      for (int e = 0; e < EV; ++e) {
        Acc o = v[e] * sc[e] + bi[e];
        if (res) o += to_acc(rv[e]);
        out[e] = from_acc<T>(p.relu ? relu_nan(o) : o);
      }
    }
    store_pack<EV>(y + off, out);
  }

  if constexpr (kStats) {
    // Column statistics of this CTA's valid rows: kParts threads per column, each an exact two-pass
    // mean / M2 over BM / kParts rows, merged in part order by part 0.
    constexpr int kParts = Tile::kParts, RP = BM / kParts;
    __syncthreads();
    const int col = tid % BN, part = tid / BN;
    const int valid = min(BM, M - m0);
    const int r0 = part * RP, r1 = min(r0 + RP, valid);
    Acc sum = Acc(0);
    for (int r = r0; r < r1; ++r) sum += Cs[r * BNP + col];
    const Acc cnt = Acc(max(r1 - r0, 0));
    const Acc mean = cnt > Acc(0) ? sum / cnt : Acc(0);
    Acc m2 = Acc(0);
    for (int r = r0; r < r1; ++r) {
      const Acc d = Cs[r * BNP + col] - mean;
      m2 += d * d;
    }
    Acc* scratch = reinterpret_cast<Acc*>(smem + Tile::kCBytes);  // [3][kParts][BN]
    scratch[(0 * kParts + part) * BN + col] = cnt;
    scratch[(1 * kParts + part) * BN + col] = mean;
    scratch[(2 * kParts + part) * BN + col] = m2;
    __syncthreads();
    if (part == 0 && n0 + col < p.K) {
      Moments<Acc> mo{cnt, mean, m2};
#pragma unroll
      for (int q = 1; q < kParts; ++q)
        mo.merge(scratch[(0 * kParts + q) * BN + col], scratch[(1 * kParts + q) * BN + col],
                 scratch[(2 * kParts + q) * BN + col]);
      Acc* ws = static_cast<Acc*>(p.workspace);
      const int64_t tiles = gridDim.x, t = blockIdx.x, K = p.K, j = n0 + col;
      ws[(0 * tiles + t) * K + j] = mo.n;
      ws[(1 * tiles + t) * K + j] = mo.mean;
      ws[(2 * tiles + t) * K + j] = mo.m2;
    }
  }
}

// ---- the kernel --------------------------------------------------------------------------------
// grid (ceil(M / BM), ceil(K / BN)), block Tile::kThreads, dynamic smem Tile::smem_bytes(kStats).
template <typename T, class Tile, bool kVec, bool kStats>
__global__ void __launch_bounds__(Tile::kThreads) conv_kernel(const ConvParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async / mma.sync need sm_80; the bindings reject older devices
#else
  using Acc = typename Tile::Acc;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, BKP = Tile::BKP, kStages = Tile::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);            // [kStages][BM][BKP]
  T* Bs = As + kStages * BM * BKP;               // [kStages][BN][BKP]
  const int M = p.N * p.P * p.Q, Kg = p.R * p.S * p.C;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int KT = int(ceil_div(Kg, BK));

  const TileLoader<T, Tile, kVec> loader(p, m0, n0);
  typename Tile::Math math;
  math.zero();

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) loader.load(As + s * BM * BKP, Bs + s * BN * BKP, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // slice kt has landed (this thread's copies) ...
    __syncthreads();               // ... for every thread; and slice kt-1 is no longer being read
    const int next = kt + kStages - 1;
    if (next < KT) loader.load(As + (next % kStages) * BM * BKP, Bs + (next % kStages) * BN * BKP, next);
    cp_async_commit();
    math.compute(As + (kt % kStages) * BM * BKP, Bs + (kt % kStages) * BN * BKP, BKP);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the accumulator tile

  Acc* Cs = reinterpret_cast<Acc*>(smem);  // [BM][BNP]
  math.store(Cs, Tile::BNP);
  __syncthreads();
  epilogue<T, Tile, kVec, kStats>(p, Cs, smem, m0, n0, M);
#endif
}

// Calls f(Tile{}) with the tile configuration for T and K.
template <typename T, typename F> cudaError_t with_tile(int K, F&& f) {
  if constexpr (kTensorCore<T>) {
    if (K <= 64) return f(typename TileFor<T, true>::type{});
    return f(typename TileFor<T, false>::type{});
  } else {
    return f(typename TileFor<T, false>::type{});
  }
}

template <typename T, bool kStats> cudaError_t launch_conv(const ConvParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int64_t M = int64_t(p.N) * p.P * p.Q;
  if (p.K == 0) return cudaSuccess;
  if (M == 0)  // no output pixels: statistics of an empty set are NaN
    return kStats ? merge_moments_cuda<Acc>(nullptr, 0, p.K, static_cast<Acc*>(p.mean), static_cast<Acc*>(p.var), stream)
                  : cudaSuccess;
  constexpr int V = kVec16<T>;
  const bool vec = p.C % V == 0 && p.K % V == 0 && aligned16(p.x) && aligned16(p.w) && aligned16(p.y) &&
                   (p.residual == nullptr || aligned16(p.residual));
  return with_tile<T>(p.K, [&](auto tile) {
    using Tile = decltype(tile);
    return BOOL_SWITCH(vec, kVec, [&] {
      const auto kernel = conv_kernel<T, Tile, kVec, kStats>;
      const size_t smem = Tile::smem_bytes(kStats);
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      const dim3 grid(unsigned(ceil_div(M, Tile::BM)), unsigned(ceil_div(p.K, Tile::BN)));
      kernel<<<grid, Tile::kThreads, smem, stream>>>(p);
      err = cudaGetLastError();
      if (err != cudaSuccess || !kStats) return err;
      return merge_moments_cuda<Acc>(static_cast<const Acc*>(p.workspace), grid.x, p.K, static_cast<Acc*>(p.mean),
                                     static_cast<Acc*>(p.var), stream);
    });
  });
}

}  // namespace

template <typename T> int64_t conv_workspace_elems(const ConvParams& p, bool stats) {
  if (!stats) return 0;
  const int64_t M = int64_t(p.N) * p.P * p.Q;
  int64_t elems = 0;
  with_tile<T>(p.K, [&](auto tile) {
    elems = 3 * ceil_div(M, decltype(tile)::BM) * p.K;
    return cudaSuccess;
  });
  return elems;
}

template <typename T> cudaError_t conv_bias_act_cuda(const ConvParams& p, cudaStream_t stream) {
  return launch_conv<T, false>(p, stream);
}

template <typename T> cudaError_t conv_stats_cuda(const ConvParams& p, cudaStream_t stream) {
  return launch_conv<T, true>(p, stream);
}

#define RESFUSE_INSTANTIATE_CONV(T)                                                  \
  template int64_t conv_workspace_elems<T>(const ConvParams&, bool);                 \
  template cudaError_t conv_bias_act_cuda<T>(const ConvParams&, cudaStream_t);       \
  template cudaError_t conv_stats_cuda<T>(const ConvParams&, cudaStream_t);
RESFUSE_INSTANTIATE_CONV(float)
RESFUSE_INSTANTIATE_CONV(double)
RESFUSE_INSTANTIATE_CONV(__half)
RESFUSE_INSTANTIATE_CONV(__nv_bfloat16)
#undef RESFUSE_INSTANTIATE_CONV

}  // namespace resfuse::cuda
