// Host-side launchers of the himnet_fast CUDA kernels (implemented in the .cu files).
//
// Every launcher takes raw device pointers to contiguous row-major buffers, the sizes, a
// dtype code (common.cuh: DType) and the CUDA stream to launch on. Launchers only enqueue
// work: they return the launch status (cudaGetLastError right after the launch) and never
// synchronise, so they can be captured into a CUDA graph. Sizes are validated by the
// pybind11 bindings before a launcher is called.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace himnet {

// y (R, O) = sum_d q[qrow(r), d] * (x[r] @ P[d]) + q[qrow(r)] @ Pb, R = rows (B * N),
// qrow(r) = r / N ("T"), r % N ("S"), r ("ST"). x (R, I), q (B|N|R, D), P (D, I, O),
// Pb (D, O) or nullptr.
cudaError_t meta_linear_forward(const void* x, const void* q, const void* pool, const void* bias_pool,
                                void* y, int64_t rows, int64_t nodes, int64_t in_dim, int64_t out_dim,
                                int64_t pool_dim, int axis, int dtype, cudaStream_t stream);

// out[g] = softmax(relu(E[g] E[g]^T), -1) @ V[g]; E (G, N, D), V (G, N, W), out (G, N, W).
// `stats` is a float32 (or float64 for dtype float64) workspace of G * N * 2 values: the
// row max and the reciprocal row sum of the softmax, written by the first pass.
cudaError_t adaptive_matmul_forward(const void* e, const void* v, void* out, void* stats, int64_t groups,
                                    int64_t nodes, int64_t embed_dim, int64_t width, int dtype,
                                    cudaStream_t stream);

// zh = sigmoid(pre[:, :H]) * h, r = sigmoid(pre[:, H:]); pre (M, 2H), h, zh, r (M, H).
cudaError_t gcru_gate_forward(const void* pre, const void* h, void* zh, void* r, int64_t rows,
                              int64_t hidden, int dtype, cudaStream_t stream);

// out = r * h + (1 - r) * tanh(pre_c); every buffer has `numel` elements.
cudaError_t gcru_update_forward(const void* pre_c, const void* r, const void* h, void* out, int64_t numel,
                                int dtype, cudaStream_t stream);

// Largest embedding size adaptive_matmul_forward accepts for `dtype` on the current device
// (its query and key tiles live in shared memory).
int64_t adaptive_matmul_max_embed_dim(int dtype);

// cudaSuccess when this module holds code the current device can run (SASS for its
// architecture, or PTX it can JIT); the error otherwise (e.g. cudaErrorNoKernelImageForDevice).
cudaError_t probe_kernel_image();

}  // namespace himnet
