// The elementwise tail of a HimGCRU step, fused into one pass each:
//   gate:   zh = sigmoid(pre[:, :H]) * h,  r = sigmoid(pre[:, H:])     (pre (M, 2H), h (M, H))
//   update: h' = r * h + (1 - r) * tanh(pre_c)                         (all (M, H))
// The names z/r follow the original HimNet (swapped relative to the textbook GRU).
// Memory-bound: one read of each input and one write of each output; math in the
// accumulation type, a single rounding per output.
#include "common.cuh"
#include "himnet_kernels.h"

namespace himnet {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover anything larger

template <typename T>
__global__ void __launch_bounds__(kThreads)
gcru_gate_kernel(const T* __restrict__ pre, const T* __restrict__ h, T* __restrict__ zh, T* __restrict__ r,
                 int64_t rows, int64_t hidden) {
  using A = acc_t<T>;
  const int64_t total = rows * hidden;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t m = idx / hidden, j = idx - m * hidden;
    const T* p = pre + m * 2 * hidden;
    const A z = acc_sigmoid(to_acc(p[j]));
    zh[idx] = from_acc<T>(z * to_acc(h[idx]));
    r[idx] = from_acc<T>(acc_sigmoid(to_acc(p[hidden + j])));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
gcru_update_kernel(const T* __restrict__ pre_c, const T* __restrict__ r, const T* __restrict__ h,
                   T* __restrict__ out, int64_t numel) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += stride) {
    const A rv = to_acc(r[idx]);
    out[idx] = from_acc<T>(rv * to_acc(h[idx]) + (A(1) - rv) * acc_tanh(to_acc(pre_c[idx])));
  }
}

}  // namespace

namespace {
unsigned blocks_for(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}
}  // namespace

cudaError_t gcru_gate_forward(const void* pre, const void* h, void* zh, void* r, int64_t rows, int64_t hidden,
                              int dtype, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    HIMNET_LAUNCH(gcru_gate_kernel<T>, blocks_for(rows * hidden), kThreads, 0, stream,
        static_cast<const T*>(pre), static_cast<const T*>(h), static_cast<T*>(zh), static_cast<T*>(r), rows, hidden);
    return cudaGetLastError();
  });
}

cudaError_t gcru_update_forward(const void* pre_c, const void* r, const void* h, void* out, int64_t numel,
                                int dtype, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    HIMNET_LAUNCH(gcru_update_kernel<T>, blocks_for(numel), kThreads, 0, stream,
        static_cast<const T*>(pre_c), static_cast<const T*>(r), static_cast<const T*>(h), static_cast<T*>(out), numel);
    return cudaGetLastError();
  });
}

#ifndef HIMNET_EMULATION
cudaError_t probe_kernel_image() {
  // Fails with cudaErrorNoKernelImageForDevice (or a driver/device error) when this module
  // has neither SASS for the current device nor PTX it can compile.
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, gcru_update_kernel<float>);
}
#endif

}  // namespace himnet
