// DMGD's memory on CUDA: the two full-size passes of torch_backend/_deep_memory.py's fused_kernel,
// each with its thin product made in the same pass (deep_memory_cuda.h says what each computes).
// Through torch's ops the write is four passes over the bucket (S − V, + νH W₂ᵀ, αS, − ηP) and the
// read two (αS + α hq W₂ᵀ, + ηV), and the outer step a third; here each is one. The other thin
// products (those that reduce over the rows) stay cuBLAS's.
//
// A block makes a tile of kRows rows × kCols columns of one matrix; thread t owns column t of the
// tile and accumulates its kRows sums Σₖ A[i, k] W[j, k] over the width h in kDepth-wide slices
// staged in shared memory (the slice of W read row by row, coalesced). The memory's rows run along
// n, so a warp's loads and stores of S, V, P and W are coalesced. The passes are bound by memory:
// 2h flops per element against 12–16 bytes.

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "deep_memory_cuda.h"
#include "elementwise_rules.h"   // DEEPOPT_HOST_DEVICE

namespace deepopt_cuda {
namespace {

constexpr int kRows = 16;
constexpr int kCols = 128;
constexpr int kDepth = 16;
constexpr int kMaxMatrices = 64;   // matrices per launch of the read with the outer step: their pointers are an argument

template <typename T>
struct Tile {
  T a[kRows][kDepth];
  T w[kDepth][kCols + 1];   // + 1: the transposed store spreads over the banks
};

// The phases of a block, apart so that a test runs them thread by thread on the CPU
// (tests/csrc/deep_memory_cuda_host.cu); a kernel runs them with a barrier between.
template <typename T>
DEEPOPT_HOST_DEVICE inline void load(Tile<T>& tile, const T* a, const T* w, const MemorySizes& z, int64_t b,
                                     int64_t i0, int64_t j0, int64_t k0, int t) {
  for (int idx = t; idx < kRows * kDepth; idx += kCols) {
    const int r = idx / kDepth, kk = idx % kDepth;
    const int64_t i = i0 + r, k = k0 + kk;
    tile.a[r][kk] = (i < z.m && k < z.h) ? a[(b * z.m + i) * z.h + k] : T(0);
  }
  for (int idx = t; idx < kCols * kDepth; idx += kCols) {
    const int c = idx / kDepth, kk = idx % kDepth;
    const int64_t j = j0 + c, k = k0 + kk;
    tile.w[kk][c] = (j < z.n && k < z.h) ? w[(b * z.n + j) * z.h + k] : T(0);
  }
}

template <typename T>
DEEPOPT_HOST_DEVICE inline void accumulate(const Tile<T>& tile, T (&acc)[kRows], int t) {
#pragma unroll
  for (int kk = 0; kk < kDepth; ++kk) {
    const T w = tile.w[kk][t];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] += tile.a[r][kk] * w;
  }
}

// A thread's elements of S, V (and W) for its kRows rows, read before the product is made so that
// their loads are in flight together and overlap it (read row by row after the product, each
// row's loads waited for the row before's stores, which may alias them: the passes ran at a third
// of the memory's bandwidth on an H200).
template <typename Epilogue>
DEEPOPT_HOST_DEVICE inline void fetch(const Epilogue& epilogue, const MemorySizes& z, int64_t b, int64_t i0, int64_t j,
                                      typename Epilogue::In (&in)[kRows]) {
  if (j >= z.n) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    if (i < z.m) in[r] = epilogue.read(b, i, j, (b * z.m + i) * z.n + j);
  }
}

template <typename T, typename Epilogue>
DEEPOPT_HOST_DEVICE inline void finish(const Epilogue& epilogue, const MemorySizes& z, int64_t b, int64_t i0,
                                       int64_t j, const T (&acc)[kRows], const typename Epilogue::In (&in)[kRows]) {
  if (j >= z.n) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    if (i < z.m) epilogue.write(b, i, j, (b * z.m + i) * z.n + j, acc[r], in[r]);
  }
}

// P = S − V + acc, S ← αS − ηP.
template <typename T>
struct Write {
  struct In {
    T s, v;
  };
  T* s;
  const T* v;
  T* p;
  T alpha, eta;

  DEEPOPT_HOST_DEVICE In read(int64_t, int64_t, int64_t, int64_t idx) const { return {s[idx], v[idx]}; }
  DEEPOPT_HOST_DEVICE void write(int64_t, int64_t, int64_t, int64_t idx, T acc, const In& in) const {
    const T pj = (in.s - in.v) + acc;
    p[idx] = pj;
    s[idx] = alpha * in.s - eta * pj;
  }
};

// D̃ = a (S + acc) + c V (v null: a (S + acc)), into out or (out null) W ← W − γ D̃ for the matrices
// [b0, b0 + kMaxMatrices).
template <typename T>
struct Read {
  struct In {
    T s, v, w;
  };
  const T* s;
  const T* v;
  T* out;
  T* params[kMaxMatrices];
  int64_t b0, n;
  T a, c, lr;

  DEEPOPT_HOST_DEVICE In read(int64_t b, int64_t i, int64_t j, int64_t idx) const {
    return {s[idx], v != nullptr ? v[idx] : T(0), out == nullptr ? params[b - b0][i * n + j] : T(0)};
  }
  DEEPOPT_HOST_DEVICE void write(int64_t b, int64_t i, int64_t j, int64_t idx, T acc, const In& in) const {
    T d = a * (in.s + acc);
    if (v != nullptr) d += c * in.v;
    if (out != nullptr) out[idx] = d;
    else params[b - b0][i * n + j] = in.w - lr * d;
  }
};

template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kCols) thin_pass(const T* a, const T* w, const MemorySizes z, const int64_t b0,
                                                  const Epilogue epilogue) {
  __shared__ Tile<T> tile;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t b = b0 + blockIdx.z, i0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kCols;
  typename Epilogue::In in[kRows];
  fetch(epilogue, z, b, i0, j0 + t, in);
  T acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = T(0);
  for (int64_t k0 = 0; k0 < z.h; k0 += kDepth) {
    load(tile, a, w, z, b, i0, j0, k0, t);
    __syncthreads();
    accumulate(tile, acc, t);
    __syncthreads();
  }
  finish<T>(epilogue, z, b, i0, j0 + t, acc, in);
}

// Launches the pass over matrices [b0, b0 + count).
template <typename T, typename Epilogue>
cudaError_t launch(const T* a, const T* w, const MemorySizes& z, int64_t b0, int64_t count, const Epilogue& epilogue,
                   void* stream) {
  const dim3 grid(static_cast<unsigned>((z.n + kCols - 1) / kCols), static_cast<unsigned>((z.m + kRows - 1) / kRows),
                  static_cast<unsigned>(count));
  thin_pass<T, Epilogue><<<grid, kCols, 0, static_cast<cudaStream_t>(stream)>>>(a, w, z, b0, epilogue);
  return cudaGetLastError();
}

const char* message(cudaError_t error) { return error == cudaSuccess ? nullptr : cudaGetErrorString(error); }

}  // namespace

template <typename T>
const char* dmgd_write(T* s, const T* v, const T* hn, const T* w2, T* p, MemorySizes z, T alpha, T eta,
                       void* stream) {
  if (z.batch == 0 || z.m == 0 || z.n == 0) return nullptr;
  return message(launch(hn, w2, z, 0, z.batch, Write<T>{s, v, p, alpha, eta}, stream));
}

template <typename T>
const char* dmgd_read(const T* s, const T* v, const T* hq, const T* w2, T* out, const std::vector<T*>& params,
                      MemorySizes z, T a, T c, T lr, void* stream) {
  if (z.batch == 0 || z.m == 0 || z.n == 0) return nullptr;
  Read<T> read{s, c != T(0) ? v : nullptr, out, {}, 0, z.n, a, c, lr};
  if (out != nullptr) return message(launch(hq, w2, z, 0, z.batch, read, stream));
  for (int64_t b0 = 0; b0 < z.batch; b0 += kMaxMatrices) {
    const int64_t count = z.batch - b0 < kMaxMatrices ? z.batch - b0 : kMaxMatrices;
    read.b0 = b0;
    for (int64_t k = 0; k < count; ++k) read.params[k] = params[b0 + k];
    if (const cudaError_t error = launch(hq, w2, z, b0, count, read, stream); error != cudaSuccess)
      return message(error);
  }
  return nullptr;
}

template const char* dmgd_write<float>(float*, const float*, const float*, const float*, float*, MemorySizes, float,
                                       float, void*);
template const char* dmgd_write<double>(double*, const double*, const double*, const double*, double*, MemorySizes,
                                        double, double, void*);
template const char* dmgd_read<float>(const float*, const float*, const float*, const float*, float*,
                                      const std::vector<float*>&, MemorySizes, float, float, float, void*);
template const char* dmgd_read<double>(const double*, const double*, const double*, const double*, double*,
                                       const std::vector<double*>&, MemorySizes, double, double, double, void*);

}  // namespace deepopt_cuda
