// Meta-parameter linear, forward: y[r] = sum_d q[qrow(r), d] * (x[r] @ P[d]) + q[qrow(r)] @ Pb.
//
// The generated weight W(q) = sum_d q_d P_d is never built (for axis "ST" it would be
// B x N x I x O). Instead this is one GEMM over the Khatri-Rao row product:
//     y[r, :] = sum_{d, i} (q[qrow(r), d] * x[r, i]) * P[d, i, :]
// with the A operand (q ⊗ x) formed in registers from two shared-memory tiles, so the kernel
// reads x, q and P once per tile and writes y, nothing else. The three axes differ only in
// which query row belongs to output row r = b * N + n: b ("T"), n ("S") or r itself ("ST").
//
// Tiling: a CTA owns 64 rows x 64 output columns; 256 threads as 16 x 16, each accumulating
// a 4 x 4 micro-tile in registers (rows ty + 16 m, columns tx + 16 n: conflict-free shared
// reads and coalesced stores). The reduction runs over query chunks of 16 (d0), input
// chunks of 16 (i0) and, inside, over pool slices staged DD at a time.
#include "common.cuh"
#include "himnet_kernels.h"

namespace himnet {
namespace {

constexpr int kRows = 64;      // rows of x / y per CTA
constexpr int kCols = 64;      // output columns per CTA
constexpr int kInner = 16;     // input features per shared-memory stage
constexpr int kQueryChunk = 16;  // query columns staged at once
constexpr int kThreads = 256;  // 16 x 16
constexpr int kMicro = 4;      // each thread: kMicro x kMicro outputs

// Pool slices staged per step: 4 in fp32 (24.6 KB of shared memory), 2 in fp64 (33 KB).
template <typename T> struct PoolStage { static constexpr int value = 4; };
template <> struct PoolStage<double> { static constexpr int value = 2; };

__device__ __forceinline__ int64_t query_row(int64_t row, int64_t nodes, int axis) {
  return axis == kAxisT ? row / nodes : (axis == kAxisS ? row % nodes : row);
}

// Explicit occupancy target: without it ptxas caps registers at 64 and spills the 4x4
// accumulators.
template <typename T>
__global__ void __launch_bounds__(kThreads, MinBlocks<T>::value)
meta_linear_fwd_kernel(const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ pool,
                       const T* __restrict__ bias_pool, T* __restrict__ y, int64_t rows, int64_t nodes,
                       int in_dim, int out_dim, int pool_dim, int axis) {
  using A = acc_t<T>;
  constexpr int DD = PoolStage<T>::value;
  static_assert(kQueryChunk % DD == 0, "pool stage must divide the query chunk");
  __shared__ A xs[kInner][kRows + 1];       // x tile, feature-major; +1: conflict-free transposed store
  __shared__ A qs[kRows][kQueryChunk + 1];  // query rows of the tile's output rows
  __shared__ A ps[DD][kInner][kCols];       // DD pool slices P[d, i0:i0+16, col0:col0+64]

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * 16 + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int col0 = blockIdx.y * kCols;

  A acc[kMicro][kMicro];
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) acc[m][n] = A(0);

  for (int d0 = 0; d0 < pool_dim; d0 += kQueryChunk) {
    const int dn = min(kQueryChunk, pool_dim - d0);
    __syncthreads();  // every reader of the previous query chunk is done
    // Query chunk of this tile's rows (zero outside the matrix: those rows are never stored,
    // zero keeps them finite).
    for (int e = tid; e < kRows * kQueryChunk; e += kThreads) {
      const int r = e / kQueryChunk, dd = e % kQueryChunk;
      const int64_t row = row0 + r;
      A val = A(0);
      if (row < rows && dd < dn) val = to_acc(q[query_row(row, nodes, axis) * pool_dim + d0 + dd]);
      qs[r][dd] = val;
    }
    for (int i0 = 0; i0 < in_dim; i0 += kInner) {
      __syncthreads();  // every reader of the previous x tile and pool stage is done
      // x tile: 16 consecutive features of a row are contiguous in memory.
      for (int e = tid; e < kRows * kInner; e += kThreads) {
        const int r = e / kInner, k = e % kInner;
        const int64_t row = row0 + r;
        const int i = i0 + k;
        xs[k][r] = (row < rows && i < in_dim) ? to_acc(x[row * in_dim + i]) : A(0);
      }
      for (int s0 = 0; s0 < dn; s0 += DD) {
        if (s0 > 0) __syncthreads();  // every reader of the previous pool stage is done
        // DD pool slices; 64 output columns are contiguous. Out-of-range slices, features
        // and columns load as zero so the inner loop needs no guards.
        for (int e = tid; e < DD * kInner * kCols; e += kThreads) {
          const int s = e / (kInner * kCols);
          const int k = (e / kCols) % kInner;
          const int o = e % kCols;
          const int i = i0 + k, col = col0 + o;
          A val = A(0);
          if (s0 + s < dn && i < in_dim && col < out_dim)
            val = to_acc(pool[(static_cast<int64_t>(d0 + s0 + s) * in_dim + i) * out_dim + col]);
          ps[s][k][o] = val;
        }
        __syncthreads();
#pragma unroll
        for (int s = 0; s < DD; ++s) {
          // s0 + s < kQueryChunk always (DD divides it); slices past dn are zero in ps.
          A qv[kMicro];
#pragma unroll
          for (int m = 0; m < kMicro; ++m) qv[m] = qs[ty + 16 * m][s0 + s];
#pragma unroll
          for (int k = 0; k < kInner; ++k) {
            A a[kMicro], b[kMicro];
#pragma unroll
            for (int m = 0; m < kMicro; ++m) a[m] = xs[k][ty + 16 * m] * qv[m];  // (q ⊗ x) on the fly
#pragma unroll
            for (int n = 0; n < kMicro; ++n) b[n] = ps[s][k][tx + 16 * n];
#pragma unroll
            for (int m = 0; m < kMicro; ++m)
#pragma unroll
              for (int n = 0; n < kMicro; ++n) acc[m][n] += a[m] * b[n];
          }
        }
      }
    }
  }

  // Epilogue: add the generated bias q @ Pb (D is small: read straight from global/L1).
#pragma unroll
  for (int m = 0; m < kMicro; ++m) {
    const int64_t row = row0 + ty + 16 * m;
    if (row >= rows) continue;
    const int64_t qr = query_row(row, nodes, axis);
#pragma unroll
    for (int n = 0; n < kMicro; ++n) {
      const int col = col0 + tx + 16 * n;
      if (col >= out_dim) continue;
      A val = acc[m][n];
      if (bias_pool != nullptr) {
        for (int d = 0; d < pool_dim; ++d)
          val += to_acc(q[qr * pool_dim + d]) * to_acc(bias_pool[static_cast<int64_t>(d) * out_dim + col]);
      }
      y[row * out_dim + col] = from_acc<T>(val);
    }
  }
}

}  // namespace

cudaError_t meta_linear_forward(const void* x, const void* q, const void* pool, const void* bias_pool,
                                void* y, int64_t rows, int64_t nodes, int64_t in_dim, int64_t out_dim,
                                int64_t pool_dim, int axis, int dtype, cudaStream_t stream) {
  if (rows == 0 || out_dim == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kRows)), static_cast<unsigned>(ceil_div(out_dim, kCols)));
  const dim3 block(16, 16);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    HIMNET_LAUNCH(meta_linear_fwd_kernel<T>, grid, block, 0, stream,
        static_cast<const T*>(x), static_cast<const T*>(q), static_cast<const T*>(pool),
        static_cast<const T*>(bias_pool), static_cast<T*>(y), rows, nodes, static_cast<int>(in_dim),
        static_cast<int>(out_dim), static_cast<int>(pool_dim), axis);
    return cudaGetLastError();
  });
}

}  // namespace himnet
