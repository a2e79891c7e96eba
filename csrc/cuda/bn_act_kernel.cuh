// Launchers of the four BatchNorm primitives of docs/architecture.md on CUDA (kernels in
// bn_act_kernel.cu, torch bindings in bn_act.cpp). Host-visible: raw pointers, sizes, cudaStream_t.
//
// Activations are [N, C, H, W] tensors of T (float, double, __half, __nv_bfloat16) stored either
// NCHW-contiguous or channels_last (NHWC); per-channel vectors are acc_t<T> (float; double for double)
// and contiguous. Optional pointers are nullptr when the argument is None.
//
// The reductions (bn_stats, bn_act_backward_reduce) run in two deterministic passes: a grid of blocks
// writes per-block partials to `workspace` ([parts][G][C] of acc_t<T>), then one kernel merges the G
// partials of each channel in a fixed order. No float atomics: results are bit-identical run to run
// on a given GPU. `*_workspace_elems<T>(params)` gives the workspace size (elements of acc_t<T>) that
// the binding allocates and passes back in params.workspace.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace resfuse::cuda {

struct ActShape {
  int64_t N, C, HW;     // HW = H * W
  bool channels_last;   // NHWC storage, else NCHW
};

struct BnStatsParams {
  ActShape shape;
  const void* input;    // T
  void* mean;           // [C] acc
  void* var;            // [C] acc, biased
  void* workspace;      // [3][G][C] acc
  int num_sms;
};

struct BnActParams {
  ActShape shape;
  const void* input;      // T
  const void* scale;      // [C] acc
  const void* shift;      // [C] acc
  const void* residual;   // T or nullptr
  const void* res_scale;  // [C] acc or nullptr (only with residual)
  void* out;              // T
  bool relu;
  int num_sms;
};

struct BnBackwardReduceParams {
  ActShape shape;
  const void* grad_out;   // T
  const void* output;     // T (read only when relu)
  const void* input;      // T
  const void* mean;       // [C] acc
  const void* residual;   // T or nullptr
  const void* res_mean;   // [C] acc, with residual
  void* sum_dz;           // [C] acc
  void* sum_dz_xmu;       // [C] acc
  void* sum_dz_rmu;       // [C] acc, with residual
  void* workspace;        // [3][G][C] acc
  bool relu;
  int num_sms;
};

struct BnBackwardApplyParams {
  ActShape shape;
  const void* grad_out;   // T
  const void* output;     // T (read only when relu)
  const void* input;      // T
  const void* a;          // [C] acc
  const void* b;          // [C] acc
  const void* d;          // [C] acc
  const void* residual;   // T or nullptr (needed with res_a)
  const void* res_a;      // [C] acc or nullptr
  const void* res_b;      // [C] acc, with res_a
  const void* res_d;      // [C] acc, with res_a
  void* grad_input;       // T
  void* grad_residual;    // T or nullptr (residual_grad = false)
  bool relu;
  int num_sms;
};

template <typename T> int64_t bn_stats_workspace_elems(const BnStatsParams& p);
template <typename T> int64_t bn_backward_reduce_workspace_elems(const BnBackwardReduceParams& p);

template <typename T> cudaError_t bn_stats_cuda(const BnStatsParams& p, cudaStream_t stream);
template <typename T> cudaError_t bn_act_cuda(const BnActParams& p, cudaStream_t stream);
template <typename T> cudaError_t bn_backward_reduce_cuda(const BnBackwardReduceParams& p, cudaStream_t stream);
template <typename T> cudaError_t bn_backward_apply_cuda(const BnBackwardApplyParams& p, cudaStream_t stream);

// Merge G per-block moment partials ([3][G][C]: count, mean, M2) into mean and biased variance per
// channel (NaN for a channel without elements). Shared by bn_stats and the conv statistics epilogue.
template <typename Acc>
cudaError_t merge_moments_cuda(const Acc* partials, int64_t G, int64_t C, Acc* mean, Acc* var,
                               cudaStream_t stream);

}  // namespace resfuse::cuda
