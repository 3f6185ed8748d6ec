// C entry points over the real launchers, for tests/test_cuda_ext.py to call through ctypes
// on CPU buffers. Each returns the launcher's cudaError_t (0 on success). Build (one shared
// library from the unmodified kernel sources, compiled as host C++):
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DHIMNET_EMULATION -Icsrc -I$CUDA_HOME/include \
//       -x c++ csrc/meta_linear.cu csrc/adaptive_matmul.cu csrc/gcru.cu -x none \
//       csrc/emulation/emu_main.cpp -o emu.so
#include "../common.cuh"
#include "../himnet_kernels.h"

// The launchers check cudaGetLastError() after each launch; emulated launches cannot fail
// asynchronously, and no CUDA runtime is linked.
extern "C" cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }

extern "C" {

int emu_meta_linear(const void* x, const void* q, const void* pool, const void* bias_pool, void* y, int64_t rows,
                    int64_t nodes, int64_t in_dim, int64_t out_dim, int64_t pool_dim, int axis, int dtype) {
  return himnet::meta_linear_forward(x, q, pool, bias_pool, y, rows, nodes, in_dim, out_dim, pool_dim, axis, dtype,
                                     nullptr);
}

int emu_adaptive_matmul(const void* e, const void* v, void* out, void* stats, int64_t groups, int64_t nodes,
                        int64_t embed_dim, int64_t width, int dtype) {
  return himnet::adaptive_matmul_forward(e, v, out, stats, groups, nodes, embed_dim, width, dtype, nullptr);
}

int emu_gcru_gate(const void* pre, const void* h, void* zh, void* r, int64_t rows, int64_t hidden, int dtype) {
  return himnet::gcru_gate_forward(pre, h, zh, r, rows, hidden, dtype, nullptr);
}

int emu_gcru_update(const void* pre_c, const void* r, const void* h, void* out, int64_t numel, int dtype) {
  return himnet::gcru_update_forward(pre_c, r, h, out, numel, dtype, nullptr);
}

}  // extern "C"
