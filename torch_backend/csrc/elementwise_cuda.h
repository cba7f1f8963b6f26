// The interface between deepopt's CUDA op (elementwise_cuda.cpp, compiled by the host compiler
// with torch's headers) and its kernels (elementwise_cuda.cu, compiled by nvcc without them).
// No torch and no CUDA types here: pointers, sizes, the scalars of elementwise_rules.h and a stream
// (a cudaStream_t, passed as void*), queued on with the group's device current.

#pragma once

#include <cstdint>
#include <vector>

#include "elementwise_rules.h"

namespace deepopt_cuda {

// A group of tensors of one dtype on one device, in the order of a rule's lists (parameters,
// gradients, then its state), with one number of elements per tensor: ``lists[k][i]`` is the
// data of list k's i-th tensor.
struct Group {
  std::vector<std::vector<void*>> lists;
  std::vector<int64_t> numel;
};

// The flags an SGD step is compiled for (elementwise_rules.h: sgd_element).
struct SgdFlags {
  bool buf, first, nesterov, coupled;
};

// One step over the group, queued on ``stream`` (not waited for); the group's device must be the
// current one. Each returns nullptr, or CUDA's message for a launch that failed. SGD's lists are the
// parameters, the gradients and (with ``flags.buf``) the buffers; NAdam's the parameters, the
// gradients, the memory and the second moment.
template <typename T>
const char* sgd(const Group& group, const SgdFlags& flags, const deepopt_rules::SgdScalars<T>& scalars, void* stream);

template <typename T>
const char* nadamw(const Group& group, const deepopt_rules::NadamwScalars<T>& scalars, void* stream);

}  // namespace deepopt_cuda
