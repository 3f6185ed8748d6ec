// CPU emulation of the CUDA execution model, for testing the kernels on machines without a
// GPU (CI). Not a simulator of performance or of memory-model corner cases: it runs every
// thread of a CTA as a host thread, CTAs one after another, with __syncthreads as a barrier,
// __shared__ as storage shared by the CTA's threads, and warp shuffles through a CTA-wide
// exchange (valid where, as in these kernels, every thread of the CTA reaches the shuffle).
// What it checks: indexing, guards, tiling and reduction logic, numerics of the device code.
//
// Included by common.cuh when HIMNET_EMULATION is defined; compiled with a host C++20
// compiler (std::barrier) and the CUDA headers for __half / __nv_bfloat16 / dim3.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <math.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One CTA runs at a time, so function-static storage is exactly "shared by the CTA".
#define __shared__ static

namespace himnet_emu {

inline thread_local dim3 t_threadIdx;
inline thread_local dim3 t_blockIdx;
inline dim3 g_blockDim, g_gridDim;
inline unsigned char* g_dynamic_smem = nullptr;
inline std::barrier<>* g_barrier = nullptr;
inline std::vector<double> g_exchange;

inline void syncthreads() { g_barrier->arrive_and_wait(); }

inline unsigned linear_tid() {
  return t_threadIdx.x + g_blockDim.x * (t_threadIdx.y + g_blockDim.y * t_threadIdx.z);
}

template <typename T> T shfl_xor(T value, int lane_mask) {
  const unsigned tid = linear_tid();
  g_exchange[tid] = static_cast<double>(value);  // exact for float and double
  syncthreads();
  const T other = static_cast<T>(g_exchange[(tid & ~31u) | ((tid & 31u) ^ static_cast<unsigned>(lane_mask))]);
  syncthreads();
  return other;
}

// Runs kernel(args...) over the grid: block.x*y*z host threads, which walk the CTAs in order
// and meet at a barrier between CTAs (shared storage is reused by the next CTA).
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, Kernel kernel, Args... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  std::vector<double> dyn((dynamic_smem + sizeof(double) - 1) / sizeof(double) + 1);
  g_dynamic_smem = reinterpret_cast<unsigned char*>(dyn.data());
  g_blockDim = block;
  g_gridDim = grid;
  g_exchange.assign(nthreads, 0.0);
  std::barrier<> bar(nthreads);
  g_barrier = &bar;
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    threads.emplace_back([=, &bar]() {
      t_threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            t_blockIdx = dim3(x, y, z);
            kernel(args...);
            bar.arrive_and_wait();
          }
    });
  }
  for (auto& th : threads) th.join();
  g_barrier = nullptr;
}

}  // namespace himnet_emu

#define threadIdx (::himnet_emu::t_threadIdx)
#define blockIdx (::himnet_emu::t_blockIdx)
#define blockDim (::himnet_emu::g_blockDim)
#define gridDim (::himnet_emu::g_gridDim)
#define __syncthreads() ::himnet_emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::himnet_emu::shfl_xor(value, lane_mask)
#define HIMNET_DYNAMIC_SMEM(name) unsigned char* name = ::himnet_emu::g_dynamic_smem
#define HIMNET_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::himnet_emu::launch(dim3(grid), dim3(block), smem, kernel, __VA_ARGS__)

using std::max;
using std::min;
