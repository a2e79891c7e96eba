// Launchers of the fused convolution (kernels in conv_kernel.cu, torch bindings in conv.cpp).
// Host-visible: raw pointers, sizes, cudaStream_t.
//
// y = conv2d(x, w) as an implicit GEMM over NHWC (channels_last) tensors, groups = 1, any
// stride / padding / dilation, with a fused epilogue in the same launch:
//   inference:  y = act(acc * scale[k] + bias[k] + residual)       (scale, bias, residual optional)
//   statistics: y = acc, plus per-(tile, channel) moment partials of y as stored (after rounding to
//               T), merged into per-channel mean and biased variance by a second small kernel.
// T is float, double, __half or __nv_bfloat16; accumulation in acc_t<T> (float; double for double).
// 16-bit types run on tensor cores (mma.sync m16n8k16, fp32 accumulators), float/double on CUDA cores
// (exact fp32/fp64 products, no TF32). Needs sm_80 or newer.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace resfuse::cuda {

struct ConvParams {
  const void* x;         // [N, H, W, C] T
  const void* w;         // [K, R, S, C] T
  const void* scale;     // [K] acc or nullptr (inference only)
  const void* bias;      // [K] acc or nullptr (inference only)
  const void* residual;  // [N, P, Q, K] T or nullptr (inference only)
  void* y;               // [N, P, Q, K] T
  void* mean;            // [K] acc (statistics only)
  void* var;             // [K] acc, biased (statistics only)
  void* workspace;       // [3][tiles][K] acc (statistics only), see conv_workspace_elems
  int N, H, W, C;        // input
  int K, R, S;           // filters
  int P, Q;              // output height, width
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool relu;             // inference only
};

// Workspace elements (of acc_t<T>) the statistics variant needs; 0 for inference.
template <typename T> int64_t conv_workspace_elems(const ConvParams& p, bool stats);

template <typename T> cudaError_t conv_bias_act_cuda(const ConvParams& p, cudaStream_t stream);
template <typename T> cudaError_t conv_stats_cuda(const ConvParams& p, cudaStream_t stream);

}  // namespace resfuse::cuda
