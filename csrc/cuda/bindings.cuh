// Host-only glue shared by the CUDA bindings (bn_act.cpp, conv.cpp): the at:: -> CUDA element type
// map, the launch check and the launch geometry inputs. It includes torch headers, so it must never
// be included from a .cu file (the kernels see raw pointers only, see common.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "../common/layout.h"
#include "bn_act_kernel.cuh"

namespace resfuse::cuda {

// AT_DISPATCH's scalar_t -> the element type of the launchers (same size and bits).
template <typename scalar_t> struct CudaType { using type = scalar_t; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
template <typename scalar_t> using cuda_t = typename CudaType<scalar_t>::type;
static_assert(sizeof(at::Half) == sizeof(__half) && sizeof(at::BFloat16) == sizeof(__nv_bfloat16));

inline void check_cuda_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// A launcher's cudaError_t as a Python RuntimeError naming the op.
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

// SM count of the current device (cached by ATen): sizes the grids of the reductions.
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline ActShape act_shape(const at::Tensor& t, Layout layout) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3), layout == Layout::NHWC};
}

}  // namespace resfuse::cuda
