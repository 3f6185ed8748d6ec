// Adaptive graph propagation product, forward: out[g] = softmax(relu(E[g] E[g]^T), -1) @ V[g].
//
// Attention with query = key = E (G, N, D), value = V (G, N, W), score relu(e_i . e_j) and no
// scaling; the N x N matrix is never stored. Two passes:
//   1. softmax_stats_kernel: per row i, m_i = max_j relu(s_ij) and 1 / l_i with
//      l_i = sum_j exp(relu(s_ij) - m_i) (online over key blocks; 4 threads per row).
//   2. adaptive_matmul_fwd_kernel: per (64 rows, 64 value columns) tile, loop over blocks of
//      32 keys: recompute the scores, p_ij = exp(relu(s_ij) - m_i) / l_i exactly (no running
//      rescale needed: the statistics are final), and accumulate p @ V_block in registers.
// Splitting the statistics out means wide values (the static graph folds the batch into the
// columns: W = B * C) are tiled over the grid without recomputing the softmax statistics per
// column tile; pass 1 costs one N x N x D score evaluation.
//
// relu scores are >= 0, so the running max starts at 0 (no -inf bookkeeping) and every row
// has l_i >= 1; a row whose scores are all <= 0 becomes uniform, as softmax(zeros) does.
#include "common.cuh"
#include "himnet_kernels.h"

namespace himnet {
namespace {

constexpr int kThreads = 256;
constexpr int kStatRows = 64;   // pass 1: rows per CTA (4 threads each)
constexpr int kStatKeys = 64;   // pass 1: keys per shared-memory stage
constexpr int kRows = 64;       // pass 2: query rows per CTA
constexpr int kKeys = 32;       // pass 2: keys per stage
constexpr int kCols = 64;       // pass 2: value columns per CTA
constexpr int kMicro = 4;       // pass 2: 4 x 4 outputs per thread (16 x 16 threads)
constexpr size_t kDefaultSmem = 48 * 1024;

// Row stride of an embedding tile in shared memory: odd, so threads reading the same feature
// of consecutive rows hit distinct banks.
__host__ __device__ inline int padded(int d) { return d % 2 == 0 ? d + 1 : d; }

template <typename A> size_t stats_smem(int d) { return sizeof(A) * (kStatRows + kStatKeys) * padded(d); }
template <typename A> size_t matmul_smem(int d) { return sizeof(A) * (kRows + kKeys) * padded(d); }

// Static shared memory of pass 2 besides the embedding tiles (probabilities, values, stats).
template <typename A> constexpr size_t matmul_static_smem() {
  return sizeof(A) * (kRows * (kKeys + 1) + kKeys * kCols + 2 * kRows);
}

// Loads rows [row0, row0 + count) of eg (nodes, D) into tile (count, Dp); zero past the end.
template <typename T, typename A>
__device__ __forceinline__ void load_embedding_tile(A* tile, const T* __restrict__ eg, int64_t row0, int count,
                                                    int64_t nodes, int d, int dp, int tid) {
  for (int e = tid; e < count * d; e += kThreads) {
    const int r = e / d, k = e % d;
    const int64_t row = row0 + r;
    tile[r * dp + k] = row < nodes ? to_acc(eg[row * d + k]) : A(0);
  }
}

template <typename A>
__device__ __forceinline__ A relu_dot(const A* __restrict__ a, const A* __restrict__ b, int d) {
  A s = A(0);
  for (int k = 0; k < d; ++k) s += a[k] * b[k];
  return s > A(0) ? s : A(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
softmax_stats_kernel(const T* __restrict__ e, acc_t<T>* __restrict__ stats, int64_t nodes, int d) {
  using A = acc_t<T>;
  HIMNET_DYNAMIC_SMEM(smem_raw);
  const int dp = padded(d);
  A* qs = reinterpret_cast<A*>(smem_raw);  // (kStatRows, dp): the CTA's query rows
  A* ks = qs + kStatRows * dp;             // (kStatKeys, dp): the current key block

  const int64_t g = blockIdx.y;
  const T* eg = e + g * nodes * d;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kStatRows;
  const int tid = threadIdx.x;
  const int r = tid / 4, sub = tid % 4;  // 4 consecutive lanes share a row

  load_embedding_tile(qs, eg, row0, kStatRows, nodes, d, dp, tid);
  A m = A(0), l = A(0);  // relu scores are >= 0: 0 is a valid starting max
  for (int64_t j0 = 0; j0 < nodes; j0 += kStatKeys) {
    __syncthreads();  // query tile loaded; every reader of the previous key block is done
    load_embedding_tile(ks, eg, j0, kStatKeys, nodes, d, dp, tid);
    __syncthreads();
    const int jn = static_cast<int>(min(static_cast<int64_t>(kStatKeys), nodes - j0));
    for (int j = sub; j < jn; j += 4) {
      const A s = relu_dot(qs + r * dp, ks + j * dp, d);
      if (s > m) {
        l = l * acc_exp(m - s) + A(1);
        m = s;
      } else {
        l += acc_exp(s - m);
      }
    }
  }
  // Merge the 4 partial (max, sum) pairs of a row.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    const A mo = __shfl_xor_sync(0xffffffffu, m, off);
    const A lo = __shfl_xor_sync(0xffffffffu, l, off);
    const A mn = m > mo ? m : mo;
    l = l * acc_exp(m - mn) + lo * acc_exp(mo - mn);
    m = mn;
  }
  const int64_t row = row0 + r;
  if (sub == 0 && row < nodes) {
    stats[(g * nodes + row) * 2] = m;
    stats[(g * nodes + row) * 2 + 1] = A(1) / l;  // l >= 1: the max term contributes exp(0)
  }
}

// Explicit occupancy target: without it ptxas caps registers at 64 and spills the 4x4
// accumulators.
template <typename T>
__global__ void __launch_bounds__(kThreads, MinBlocks<T>::value)
adaptive_matmul_fwd_kernel(const T* __restrict__ e, const T* __restrict__ v, const acc_t<T>* __restrict__ stats,
                           T* __restrict__ out, int64_t nodes, int d, int64_t width) {
  using A = acc_t<T>;
  HIMNET_DYNAMIC_SMEM(smem_raw);
  const int dp = padded(d);
  A* qs = reinterpret_cast<A*>(smem_raw);  // (kRows, dp): query rows, loaded once
  A* ks = qs + kRows * dp;                 // (kKeys, dp): current key block
  __shared__ A ps[kRows][kKeys + 1];       // probabilities of the key block; +1: no 2-way conflicts
  __shared__ A vs[kKeys][kCols];           // value block
  __shared__ A row_max[kRows], row_inv[kRows];

  const int64_t g = blockIdx.z;
  const T* eg = e + g * nodes * d;
  const T* vg = v + g * nodes * width;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * 16 + tx;

  load_embedding_tile(qs, eg, row0, kRows, nodes, d, dp, tid);
  for (int r = tid; r < kRows; r += kThreads) {
    const int64_t row = row0 + r;
    // Rows past the end get p = 0 (inv = 0): finite, never stored.
    row_max[r] = row < nodes ? stats[(g * nodes + row) * 2] : A(0);
    row_inv[r] = row < nodes ? stats[(g * nodes + row) * 2 + 1] : A(0);
  }

  A acc[kMicro][kMicro];
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) acc[m][n] = A(0);

  for (int64_t j0 = 0; j0 < nodes; j0 += kKeys) {
    __syncthreads();  // queries/stats loaded; every reader of the previous block is done
    load_embedding_tile(ks, eg, j0, kKeys, nodes, d, dp, tid);
    // Value block: 64 consecutive columns of a node row are contiguous.
    for (int idx = tid; idx < kKeys * kCols; idx += kThreads) {
      const int j = idx / kCols, c = idx % kCols;
      const int64_t node = j0 + j, col = col0 + c;
      vs[j][c] = (node < nodes && col < width) ? to_acc(vg[node * width + col]) : A(0);
    }
    __syncthreads();
    // Probabilities: a warp covers one query row and 32 keys (broadcast query reads).
    for (int idx = tid; idx < kRows * kKeys; idx += kThreads) {
      const int r = idx / kKeys, j = idx % kKeys;
      A p = A(0);
      if (j0 + j < nodes) p = acc_exp(relu_dot(qs + r * dp, ks + j * dp, d) - row_max[r]) * row_inv[r];
      ps[r][j] = p;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      A a[kMicro], b[kMicro];
#pragma unroll
      for (int m = 0; m < kMicro; ++m) a[m] = ps[ty + 16 * m][j];
#pragma unroll
      for (int n = 0; n < kMicro; ++n) b[n] = vs[j][tx + 16 * n];
#pragma unroll
      for (int m = 0; m < kMicro; ++m)
#pragma unroll
        for (int n = 0; n < kMicro; ++n) acc[m][n] += a[m] * b[n];
    }
  }

  T* og = out + g * nodes * width;
#pragma unroll
  for (int m = 0; m < kMicro; ++m) {
    const int64_t row = row0 + ty + 16 * m;
    if (row >= nodes) continue;
#pragma unroll
    for (int n = 0; n < kMicro; ++n) {
      const int64_t col = col0 + tx + 16 * n;
      if (col < width) og[row * width + col] = from_acc<T>(acc[m][n]);
    }
  }
}

#ifdef HIMNET_EMULATION
template <typename K> cudaError_t allow_smem(K, size_t, size_t) { return cudaSuccess; }
#else
// Opts the kernel in to more than the default 48 KB of shared memory per CTA (static plus
// dynamic) when a large embedding needs it; the launch would fail otherwise.
template <typename K> cudaError_t allow_smem(K kernel, size_t dynamic_bytes, size_t static_bytes) {
  if (dynamic_bytes + static_bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_bytes));
}
#endif

}  // namespace

#ifndef HIMNET_EMULATION
int64_t adaptive_matmul_max_embed_dim(int dtype) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // clear: the caller reports "no device" through its own launch
    optin = static_cast<int>(kDefaultSmem);
  }
  const size_t elem = dtype == kFloat64 ? sizeof(double) : sizeof(float);
  const size_t fixed = dtype == kFloat64 ? matmul_static_smem<double>() : matmul_static_smem<float>();
  if (static_cast<size_t>(optin) <= fixed) return 0;
  // Largest padded row stride both passes fit: pass 2 holds (kRows + kKeys) rows besides its
  // static buffers, pass 1 holds (kStatRows + kStatKeys) rows.
  const int64_t p2 = static_cast<int64_t>((optin - fixed) / (elem * (kRows + kKeys)));
  const int64_t p1 = static_cast<int64_t>(optin / (elem * (kStatRows + kStatKeys)));
  const int64_t p = p1 < p2 ? p1 : p2;
  // padded(d) <= p: d = p when p is odd (padded(p) = p), else d = p - 1.
  return p % 2 == 1 ? p : p - 1;
}
#endif

cudaError_t adaptive_matmul_forward(const void* e, const void* v, void* out, void* stats, int64_t groups,
                                    int64_t nodes, int64_t embed_dim, int64_t width, int dtype,
                                    cudaStream_t stream) {
  if (groups == 0 || nodes == 0 || width == 0) return cudaSuccess;
  const int d = static_cast<int>(embed_dim);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const size_t smem1 = stats_smem<A>(d), smem2 = matmul_smem<A>(d);
    cudaError_t err = allow_smem(softmax_stats_kernel<T>, smem1, 0);
    if (err == cudaSuccess) err = allow_smem(adaptive_matmul_fwd_kernel<T>, smem2, matmul_static_smem<A>());
    if (err != cudaSuccess) return err;

    const dim3 grid1(static_cast<unsigned>(ceil_div(nodes, kStatRows)), static_cast<unsigned>(groups));
    HIMNET_LAUNCH(softmax_stats_kernel<T>, grid1, kThreads, smem1, stream, static_cast<const T*>(e),
                  static_cast<A*>(stats), nodes, d);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;

    const dim3 grid2(static_cast<unsigned>(ceil_div(nodes, kRows)), static_cast<unsigned>(ceil_div(width, kCols)),
                     static_cast<unsigned>(groups));
    HIMNET_LAUNCH(adaptive_matmul_fwd_kernel<T>, grid2, dim3(16, 16), smem2, stream,
        static_cast<const T*>(e), static_cast<const T*>(v), static_cast<const A*>(stats), static_cast<T*>(out),
        nodes, d, width);
    return cudaGetLastError();
  });
}

}  // namespace himnet
