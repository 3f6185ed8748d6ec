// Shared helpers for the himnet_fast CUDA kernels: dtype codes, conversions to the
// accumulation type, and the dtype dispatch used by every launcher.
//
// Storage dtypes: float32, float16, bfloat16 (accumulated in float32) and float64
// (accumulated in float64). Kernels read storage values, convert once, compute in the
// accumulation type and convert back only when writing the output.
#pragma once

#ifdef HIMNET_EMULATION
#include "emulation/emu_cuda.h"  // CPU emulation for tests (csrc/emulation/README.md)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Dynamic shared memory of a kernel, as a byte array named `name`.
#define HIMNET_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// kernel<<<grid, block, smem, stream>>>(args...). A macro so that csrc/emulation can run the
// very same launchers on the CPU, where it expands to a host-thread emulation of the launch.
#define HIMNET_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <cstdint>

namespace himnet {

// Must match himnet_fast/ops/_cuda_backend.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Must match _cuda_backend.py (_AXIS_CODES): which query row drives output row r = b * N + n.
enum MetaAxis : int { kAxisT = 0, kAxisS = 1, kAxisST = 2 };

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Storage -> accumulation type.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Accumulation type -> storage (round to nearest even for the 16-bit types).
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Precise transcendental functions in the accumulation type (no fast-math: the outputs are
// compared with PyTorch's at fp32 tolerance).
__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double acc_tanh(double v) { return tanh(v); }
template <typename A> __device__ __forceinline__ A acc_sigmoid(A v) {
  // 1 / (1 + e^-v): for v -> -inf, e^-v overflows to inf and the result is exactly 0.
  return A(1) / (A(1) + acc_exp(-v));
}

// Minimum resident CTAs per SM for the register-tiled kernels (__launch_bounds__): 2 caps
// registers at 128 per thread for 256 threads; fp64 accumulators need twice the registers.
template <typename T> struct MinBlocks { static constexpr int value = 2; };
template <> struct MinBlocks<double> { static constexpr int value = 1; };

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the storage type named by `dtype`.
template <typename F> cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(TypeTag<float>{});
    case kFloat16: return f(TypeTag<__half>{});
    case kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    case kFloat64: return f(TypeTag<double>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace himnet
