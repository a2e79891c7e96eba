// Device helpers shared by resfuse's CUDA kernels. Pure CUDA: no torch/ATen headers (the launchers
// are called from the torch bindings in csrc/cuda/*.cpp with raw pointers and a cudaStream_t).
//
// * acc_t<T>        accumulation type: float for float/__half/__nv_bfloat16, double for double.
// * Pack<T, N>      N elements loaded/stored as one (up to 16-byte) vector access.
// * Moments<Acc>    (count, mean, M2) with Chan's merge, for numerically safe per-channel statistics.
// * cp_async_*      Ampere asynchronous global->shared copies (zero-filling), used by the conv.
// * BOOL_SWITCH     turns a runtime bool into a constexpr for a templated launch (flash-attn style).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// BOOL_SWITCH(cond, kName, ...): runs the lambda body `...` with `constexpr bool kName = cond`.
#define BOOL_SWITCH(COND, CONST_NAME, ...)                                                           \
  [&] {                                                                                              \
    if (COND) {                                                                                      \
      constexpr static bool CONST_NAME = true;                                                       \
      return __VA_ARGS__();                                                                          \
    } else {                                                                                         \
      constexpr static bool CONST_NAME = false;                                                      \
      return __VA_ARGS__();                                                                          \
    }                                                                                                \
  }()

namespace resfuse::cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// Elements per 16-byte vector access.
template <typename T> inline constexpr int kVec16 = 16 / int(sizeof(T));

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- conversions -------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename Acc> __device__ __forceinline__ Acc quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000ll); }

// ReLU that lets NaN through (torch.relu semantics): NaN < 0 is false.
template <typename Acc> __device__ __forceinline__ Acc relu_nan(Acc v) { return v < Acc(0) ? Acc(0) : v; }

// ---- vector access -----------------------------------------------------------------------------
template <typename T, int N>
struct alignas(N * sizeof(T) > 16 ? 16 : N * sizeof(T)) Pack {
  T v[N];
  __device__ __forceinline__ T& operator[](int i) { return v[i]; }
  __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};

template <int N, typename T> __device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <int N, typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// ---- statistics --------------------------------------------------------------------------------
// (count, mean, M2 = sum of squared deviations). merge() is Chan et al.'s parallel formula; merging
// in a fixed order makes every result bit-reproducible.
template <typename Acc> struct Moments {
  Acc n, mean, m2;
  __device__ __forceinline__ void merge(Acc nb, Acc mb, Acc m2b) {
    const Acc nn = n + nb;
    if (nn == Acc(0)) return;
    const Acc delta = mb - mean;
    const Acc f = nb / nn;
    mean += delta * f;
    m2 += m2b + delta * delta * n * f;
    n = nn;
  }
  __device__ __forceinline__ void merge(const Moments& b) { merge(b.n, b.mean, b.m2); }
};

// ---- Ampere asynchronous copies ----------------------------------------------------------------
// 16-byte global->shared copy; with `valid == false` nothing is read and the destination is zeroed.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace resfuse::cuda
