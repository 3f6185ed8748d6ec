// pybind11 module himnet_fast._cuda_ext: the CUDA forward kernels behind the "cuda" backend.
//
// The module deliberately does not use PyTorch's C++ API: Python passes device pointers
// (tensor.data_ptr()), sizes, a dtype code, the device index and the current stream handle
// (torch.cuda.current_stream().cuda_stream). So it builds where only a CPU PyTorch is
// installed and keeps working across PyTorch upgrades. Buffers must be contiguous, on the
// given device, of the given dtype; himnet_fast/ops/_cuda_backend.py guarantees that.
//
// Errors: bad sizes/codes raise ValueError before anything is launched; a CUDA error (no
// device, driver too old, no kernel image for the GPU, launch failure) raises RuntimeError
// with the CUDA error name. Kernels never assert on the device.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "himnet_kernels.h"

namespace py = pybind11;

#ifndef HIMNET_CUDA_ARCHS
#define HIMNET_CUDA_ARCHS "unknown"
#endif

namespace {

constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kTile = 64;  // rows / columns per CTA of the tiled kernels (grid limits)

void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear the non-sticky error so later calls start clean
  throw std::runtime_error(std::string("himnet_fast CUDA extension: ") + what + " failed: " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("himnet_fast CUDA extension: " + msg);
}

void require_size(const char* name, int64_t value, int64_t max_value = INT64_MAX) {
  require(value >= 0 && value <= max_value, std::string(name) + " must be in [0, " + std::to_string(max_value) +
                                                "], got " + std::to_string(value));
}

void require_ptr(const char* name, uintptr_t ptr, bool needed) {
  require(!needed || ptr != 0, std::string(name) + " is a null pointer but the buffer is not empty");
}

void require_dtype(int dtype) {
  require(dtype >= 0 && dtype <= 3,
          "dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64), got " + std::to_string(dtype));
}

template <typename P> P ptr(uintptr_t p) { return reinterpret_cast<P>(p); }
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Makes `device` current for the launch and restores the caller's device afterwards, so a
// tensor on another GPU than PyTorch's current one launches where its memory is.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    require(device >= 0, "device index must be >= 0, got " + std::to_string(device));
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

void meta_linear(uintptr_t x, uintptr_t q, uintptr_t pool, uintptr_t bias_pool, uintptr_t y, int64_t rows,
                 int64_t nodes, int64_t in_dim, int64_t out_dim, int64_t pool_dim, int axis, int dtype, int device,
                 uintptr_t stream) {
  require_size("rows", rows, (int64_t(INT_MAX) - 1) * kTile);
  require_size("nodes", nodes);
  require_size("in_dim", in_dim, INT_MAX);
  require_size("out_dim", out_dim, kMaxGridYZ * kTile);
  require_size("pool_dim", pool_dim, INT_MAX);
  require_dtype(dtype);
  require(axis >= 0 && axis <= 2, "axis code must be 0 (T), 1 (S) or 2 (ST), got " + std::to_string(axis));
  require(rows == 0 || nodes > 0, "nodes must be > 0 when rows > 0");
  require(axis != 0 || nodes == 0 || rows % nodes == 0, "rows must be a multiple of nodes for axis T");
  const bool work = rows > 0 && out_dim > 0;
  require_ptr("x", x, work && in_dim > 0);
  require_ptr("query", q, work && pool_dim > 0);
  require_ptr("weight_pool", pool, work && pool_dim > 0 && in_dim > 0);
  require_ptr("y", y, work);
  DeviceGuard guard(device);
  check_cuda(himnet::meta_linear_forward(ptr<const void*>(x), ptr<const void*>(q), ptr<const void*>(pool),
                                         ptr<const void*>(bias_pool), ptr<void*>(y), rows, nodes, in_dim, out_dim,
                                         pool_dim, axis, dtype, stream_of(stream)),
             "meta_linear launch");
}

void adaptive_matmul(uintptr_t e, uintptr_t v, uintptr_t out, uintptr_t stats, int64_t groups, int64_t nodes,
                     int64_t embed_dim, int64_t width, int dtype, int device, uintptr_t stream) {
  require_size("groups", groups, kMaxGridYZ);
  require_size("nodes", nodes, (int64_t(INT_MAX) - 1) * kTile);
  require_size("width", width, kMaxGridYZ * kTile);
  require_size("embed_dim", embed_dim, INT_MAX);
  require_dtype(dtype);
  const bool work = groups > 0 && nodes > 0 && width > 0;
  require_ptr("embedding", e, work && embed_dim > 0);
  require_ptr("v", v, work);
  require_ptr("out", out, work);
  require_ptr("stats", stats, work);
  DeviceGuard guard(device);
  if (work) {
    const int64_t max_d = himnet::adaptive_matmul_max_embed_dim(dtype);
    require(embed_dim <= max_d, "embedding size " + std::to_string(embed_dim) +
                                    " exceeds what the kernel's shared-memory tiles hold on this device (" +
                                    std::to_string(max_d) + ")");
  }
  check_cuda(himnet::adaptive_matmul_forward(ptr<const void*>(e), ptr<const void*>(v), ptr<void*>(out),
                                             ptr<void*>(stats), groups, nodes, embed_dim, width, dtype,
                                             stream_of(stream)),
             "adaptive_matmul launch");
}

void gcru_gate(uintptr_t pre, uintptr_t h, uintptr_t zh, uintptr_t r, int64_t rows, int64_t hidden, int dtype,
               int device, uintptr_t stream) {
  require_size("rows", rows);
  require_size("hidden", hidden);
  require(hidden == 0 || rows <= INT64_MAX / (2 * hidden), "rows * 2 * hidden overflows int64");
  require_dtype(dtype);
  const bool work = rows > 0 && hidden > 0;
  require_ptr("pre", pre, work);
  require_ptr("h", h, work);
  require_ptr("zh", zh, work);
  require_ptr("r", r, work);
  DeviceGuard guard(device);
  check_cuda(himnet::gcru_gate_forward(ptr<const void*>(pre), ptr<const void*>(h), ptr<void*>(zh), ptr<void*>(r),
                                       rows, hidden, dtype, stream_of(stream)),
             "gcru_gate launch");
}

void gcru_update(uintptr_t pre_c, uintptr_t r, uintptr_t h, uintptr_t out, int64_t numel, int dtype, int device,
                 uintptr_t stream) {
  require_size("numel", numel);
  require_dtype(dtype);
  for (auto [name, p] : {std::pair<const char*, uintptr_t>{"pre_c", pre_c}, {"r", r}, {"h", h}, {"out", out}})
    require_ptr(name, p, numel > 0);
  DeviceGuard guard(device);
  check_cuda(himnet::gcru_update_forward(ptr<const void*>(pre_c), ptr<const void*>(r), ptr<const void*>(h),
                                         ptr<void*>(out), numel, dtype, stream_of(stream)),
             "gcru_update launch");
}

int device_count() {
  int n = 0;
  check_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  return n;
}

void probe(int device) {
  DeviceGuard guard(device);
  check_cuda(himnet::probe_kernel_image(), "loading the kernels for this GPU");
}

int64_t max_embed_dim(int dtype, int device) {
  require_dtype(dtype);
  DeviceGuard guard(device);
  return himnet::adaptive_matmul_max_embed_dim(dtype);
}

}  // namespace

PYBIND11_MODULE(_cuda_ext, m) {
  m.doc() = "himnet_fast CUDA forward kernels (raw device pointers; see himnet_fast/ops/_cuda_backend.py)";
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("meta_linear", &meta_linear, nogil, arg("x"), arg("query"), arg("weight_pool"), arg("bias_pool"), arg("y"),
        arg("rows"), arg("nodes"), arg("in_dim"), arg("out_dim"), arg("pool_dim"), arg("axis"), arg("dtype"),
        arg("device"), arg("stream"),
        "y (rows, out_dim) = sum_d q[qrow, d] * (x @ P[d]) + q[qrow] @ Pb; qrow = r / nodes (T), r % nodes (S), r (ST)");
  m.def("adaptive_matmul", &adaptive_matmul, nogil, arg("embedding"), arg("v"), arg("out"), arg("stats"),
        arg("groups"), arg("nodes"), arg("embed_dim"), arg("width"), arg("dtype"), arg("device"), arg("stream"),
        "out[g] = softmax(relu(E[g] E[g]^T), -1) @ V[g]; stats: (groups, nodes, 2) float32 (float64 for fp64) workspace");
  m.def("gcru_gate", &gcru_gate, nogil, arg("pre"), arg("h"), arg("zh"), arg("r"), arg("rows"), arg("hidden"),
        arg("dtype"), arg("device"), arg("stream"), "zh = sigmoid(pre[:, :H]) * h, r = sigmoid(pre[:, H:])");
  m.def("gcru_update", &gcru_update, nogil, arg("pre_c"), arg("r"), arg("h"), arg("out"), arg("numel"),
        arg("dtype"), arg("device"), arg("stream"), "out = r * h + (1 - r) * tanh(pre_c)");
  m.def("device_count", &device_count, "CUDA devices visible to this module's runtime (raises without a driver)");
  m.def("probe", &probe, arg("device"), "raise RuntimeError unless the kernels can run on `device`");
  m.def("max_embed_dim", &max_embed_dim, arg("dtype"), arg("device"),
        "largest embedding size adaptive_matmul accepts on `device`");
  m.attr("cuda_version") = CUDART_VERSION;
  m.attr("cuda_archs") = HIMNET_CUDA_ARCHS;
}
