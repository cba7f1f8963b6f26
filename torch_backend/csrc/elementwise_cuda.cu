// deepopt's CUDA kernels for the element-wise rules torch has no fused kernel for: one pass over
// every tensor of a group that reads and writes each word once, the arithmetic of
// elementwise_rules.h (the CPU loops' too). torch_backend/_native.py builds this file, with
// elementwise_cuda.cpp (the torch op that checks the tensors and calls these), on the first CUDA
// step that needs it.
//
// Many tensors per launch, as torch's own fused optimizers do ("multi-tensor apply"): a launch
// takes up to kMaxTensors tensors, passed by value as the kernel's argument, and cuts each into
// chunks of kChunk elements, one block per chunk; a block finds its tensor by a binary search of
// the first block of each. Each thread loads kUnroll elements of every list before it computes,
// so that several loads are in flight at once.

#include <cuda_runtime.h>

#include <cstdint>

#include "elementwise_cuda.h"

namespace deepopt_cuda {
namespace {

using deepopt_rules::nadamw_element;
using deepopt_rules::NadamwScalars;
using deepopt_rules::sgd_element;
using deepopt_rules::SgdScalars;
using deepopt_rules::with_flag;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kChunk = 16384;   // 16 rounds of kThreads × kUnroll elements per block
constexpr int kMaxTensors = 64;     // the batch below is < 4 KB, the classic limit of a kernel's arguments

// A launch's tensors: list k's i-th data, each tensor's size, and the first block of each (tensor i
// is blocks [first[i], first[i + 1]); no tensor is empty).
template <typename T, int kLists>
struct Batch {
  T* data[kLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  int first[kMaxTensors + 1];
  int n;
};

// Thread ``thread`` of block ``block``: its elements of the block's chunk. Host and device code, so
// that a test can run a launch's blocks on the CPU (tests/test_native_cuda.py).
template <typename T, typename Rule>
DEEPOPT_HOST_DEVICE inline void apply_block(const Batch<T, Rule::kLists>& batch, const Rule& rule, int block,
                                            int thread) {
  constexpr int kLists = Rule::kLists;
  int lo = 0, hi = batch.n;                       // the last tensor i with first[i] <= block
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (batch.first[mid] <= block) lo = mid;
    else hi = mid;
  }
  const int64_t begin = static_cast<int64_t>(block - batch.first[lo]) * kChunk;
  const int64_t end = begin + kChunk < batch.numel[lo] ? begin + kChunk : batch.numel[lo];
  T* data[kLists];
#pragma unroll
  for (int k = 0; k < kLists; ++k) data[k] = batch.data[k][lo];
  for (int64_t base = begin + thread; base < end; base += kThreads * kUnroll) {
    T x[kUnroll][kLists];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      if (j < end) {
#pragma unroll
        for (int k = 0; k < kLists; ++k) x[u][k] = data[k][j];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      if (j < end) {
        rule(x[u]);
#pragma unroll
        for (int k = 0; k < kLists; ++k)
          if (Rule::kWritten & (1u << k)) data[k][j] = x[u][k];
      }
    }
  }
}

template <typename T, typename Rule>
__global__ void __launch_bounds__(kThreads) apply(const Batch<T, Rule::kLists> batch, const Rule rule) {
  apply_block<T, Rule>(batch, rule, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));
}

// Calls ``launch(batch)`` for each batch of the group's non-empty tensors, kMaxTensors a batch;
// stops at the first call that returns false.
template <typename T, int kLists, typename Launch>
void for_each_batch(const Group& group, Launch&& launch) {
  Batch<T, kLists> batch;
  batch.n = 0;
  batch.first[0] = 0;
  for (size_t i = 0; i < group.numel.size(); ++i) {
    const int64_t numel = group.numel[i];
    if (numel == 0) continue;
    for (int k = 0; k < kLists; ++k) batch.data[k][batch.n] = static_cast<T*>(group.lists[k][i]);
    batch.numel[batch.n] = numel;
    batch.first[batch.n + 1] = batch.first[batch.n] + static_cast<int>((numel + kChunk - 1) / kChunk);
    if (++batch.n == kMaxTensors) {
      if (!launch(batch)) return;
      batch.n = 0;
    }
  }
  if (batch.n > 0) launch(batch);
}

// Lists: the parameters, the gradients and (kBuf) the buffers; the parameters and buffers are written.
template <typename T, bool kBuf, bool kFirst, bool kNesterov, bool kCoupled>
struct SgdRule {
  static constexpr int kLists = kBuf ? 3 : 2;
  static constexpr unsigned kWritten = kBuf ? 0b101u : 0b001u;
  SgdScalars<T> s;

  DEEPOPT_HOST_DEVICE void operator()(T (&x)[kLists]) const {
    if constexpr (kBuf) {
      sgd_element<T, true, kFirst, kNesterov, kCoupled>(x[0], x[1], x[2], s);
    } else {
      T unused = 0;
      sgd_element<T, false, kFirst, kNesterov, kCoupled>(x[0], x[1], unused, s);
    }
  }
};

// Lists: the parameters, the gradients, the memory and the second moment; all but the gradients written.
template <typename T>
struct NadamwRule {
  static constexpr int kLists = 4;
  static constexpr unsigned kWritten = 0b1101u;
  NadamwScalars<T> c;

  DEEPOPT_HOST_DEVICE void operator()(T (&x)[4]) const { nadamw_element<T>(x[0], x[1], x[2], x[3], c); }
};

// Queues ``rule`` over the group; nullptr, or the first failed launch's error.
template <typename T, typename Rule>
const char* run(const Group& group, const Rule& rule, void* stream) {
  if (static_cast<int>(group.lists.size()) != Rule::kLists) return "deepopt: a group with the wrong number of lists";
  cudaError_t error = cudaSuccess;
  for_each_batch<T, Rule::kLists>(group, [&](const Batch<T, Rule::kLists>& batch) {
    apply<T, Rule><<<batch.first[batch.n], kThreads, 0, static_cast<cudaStream_t>(stream)>>>(batch, rule);
    error = cudaGetLastError();
    return error == cudaSuccess;
  });
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

template <typename T>
const char* sgd(const Group& group, const SgdFlags& flags, const SgdScalars<T>& scalars, void* stream) {
  const char* error = nullptr;
  with_flag(flags.buf, [&](auto buf) { with_flag(flags.first, [&](auto first) {
    with_flag(flags.nesterov, [&](auto nesterov) { with_flag(flags.coupled, [&](auto coupled) {
      error = run<T>(group, SgdRule<T, buf, first, nesterov, coupled>{scalars}, stream);
    }); });
  }); });
  return error;
}

template <typename T>
const char* nadamw(const Group& group, const NadamwScalars<T>& scalars, void* stream) {
  return run<T>(group, NadamwRule<T>{scalars}, stream);
}

template const char* sgd<float>(const Group&, const SgdFlags&, const SgdScalars<float>&, void*);
template const char* sgd<double>(const Group&, const SgdFlags&, const SgdScalars<double>&, void*);
template const char* nadamw<float>(const Group&, const NadamwScalars<float>&, void*);
template const char* nadamw<double>(const Group&, const NadamwScalars<double>&, void*);

}  // namespace deepopt_cuda
