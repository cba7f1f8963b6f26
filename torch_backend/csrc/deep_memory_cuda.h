// The interface between deepopt's CUDA ops for DMGD's memory (deep_memory_cuda.cpp, host compiler,
// torch's headers) and their kernels (deep_memory_cuda.cu, nvcc, no torch): pointers to contiguous
// stacks, sizes, scalars and a stream (a cudaStream_t as void*), queued on with the stacks' device
// current. Each returns nullptr, or CUDA's message for a launch that failed.

#pragma once

#include <cstdint>
#include <vector>

namespace deepopt_cuda {

// A bucket: ``batch`` matrices m × n (rows of n numbers), the memory's MLP of width h.
struct MemorySizes {
  int64_t batch, m, n, h;
};

// The write's full-size pass (docs/math.md §5, l2 objective): with the thin product νH W₂ᵀ made in
// the same pass, P = S − V + (νH) W₂ᵀ into ``p`` and S ← αS − ηP. Stacks: s, v, p (B, m, n);
// hn = νH (B, m, h); w2 (B, n, h).
template <typename T>
const char* dmgd_write(T* s, const T* v, const T* hn, const T* w2, T* p, MemorySizes z, T alpha, T eta,
                       void* stream);

// The read's full-size pass: D̃ = a (S + (νσ(QW₁ᵀ)) W₂ᵀ) + c V (a = α, c = η with Nesterov's read; else
// 1, 0), into ``out`` (B, m, n); or, with ``params`` (one contiguous m × n matrix per matrix of the
// bucket) and out null, the outer step W ← W − γ D̃ in the same pass, D̃ never stored.
template <typename T>
const char* dmgd_read(const T* s, const T* v, const T* hq, const T* w2, T* out, const std::vector<T*>& params,
                      MemorySizes z, T a, T c, T lr, void* stream);

}  // namespace deepopt_cuda
