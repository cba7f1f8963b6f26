// deepopt's CUDA ops for the element-wise rules torch has no fused kernel for: the CPU ops of
// elementwise.cpp (same schema, same checks, same step counts) for CUDA tensors, whose kernels are
// elementwise_cuda.cu's. Registered as ``torch.ops.deepopt_cuda``; torch_backend/_native.py
// builds this library on the first CUDA step that needs it.
//
// An op first checks every tensor and returns false, having written nothing, if it cannot take
// them all: each a contiguous float32 or float64 CUDA tensor on the first parameter's device,
// with its parameter's dtype and size; each step count a 0-d float32 CPU tensor, read and
// advanced on the host (no device synchronisation). It then queues one launch per dtype and per
// step-count case (NAdam's scalars depend on t, SGD's first write on t = 1) on the device's
// current stream, and returns without waiting for the kernels.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "elementwise_cuda.h"
#include "tensor_lists.h"

namespace {

using deepopt_lists::advance;
using deepopt_lists::counts;
using deepopt_lists::written;

// The tensors ``idx`` of the lists, as the kernels take them.
deepopt_cuda::Group group_of(const std::vector<at::TensorList>& lists, const std::vector<size_t>& idx) {
  deepopt_cuda::Group group;
  group.lists.resize(lists.size());
  for (size_t i : idx) {
    for (size_t k = 0; k < lists.size(); ++k) group.lists[k].push_back(lists[k][i].data_ptr());
    group.numel.push_back(lists.front()[i].numel());
  }
  return group;
}

// Whether the lists are on one CUDA device and the ops can take them (see above).
bool takes(const std::vector<at::TensorList>& lists, at::TensorList steps) {
  const at::TensorList& params = lists.front();
  return !params.empty() && params[0].defined() && params[0].is_cuda() &&
         deepopt_lists::takes(lists, params[0].device()) && counts(steps, params.size());
}

// Runs ``launch(idx, dtype, key, stream)`` for each group of tensors that share a dtype and a key
// (``keys[i]``: the step-count case of tensor i), on the parameters' device and its current stream;
// raises CUDA's error, if any.
template <typename Key, typename Launch>
void launch_groups(const char* op, at::TensorList params, const std::vector<Key>& keys, Launch&& launch) {
  std::map<std::pair<int, Key>, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i)
    groups[{static_cast<int>(params[i].scalar_type()), keys[i]}].push_back(i);
  const at::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  void* stream = deepopt_lists::current_stream(device);
  for (const auto& [key, idx] : groups) {
    const char* error = launch(idx, static_cast<at::ScalarType>(key.first), key.second, stream);
    TORCH_CHECK(error == nullptr, "deepopt_cuda::", op, ": a kernel failed to launch: ", error);
  }
}

bool sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList steps, double lr,
          double weight_decay, bool decoupled, double momentum, double dampening, bool nesterov, bool maximize) {
  const bool has_buf = !bufs.empty();
  std::vector<at::TensorList> lists{params, grads};
  if (has_buf) lists.push_back(bufs);
  if (!takes(lists, steps)) return false;
  std::vector<bool> first(params.size(), false);        // t = 1 after this step's increment
  for (size_t i = 0; i < steps.size(); ++i) first[i] = advance(steps, i) == 1.0;
  const bool couple = !decoupled && weight_decay != 0.0;
  launch_groups("sgd_", params, first, [&](const std::vector<size_t>& idx, at::ScalarType dtype, bool first_write,
                                           void* stream) {
    const char* error = nullptr;
    AT_DISPATCH_FLOATING_TYPES(dtype, "deepopt_cuda::sgd_", [&] {
      error = deepopt_cuda::sgd<scalar_t>(
          group_of(lists, idx), {has_buf, first_write, nesterov, couple},
          deepopt_rules::make_sgd<scalar_t>(lr, weight_decay, decoupled, momentum, dampening, maximize), stream);
    });
    return error;
  });
  written({params, bufs, steps});
  return true;
}

bool nadamw_(at::TensorList params, at::TensorList grads, at::TensorList memory, at::TensorList second_moment,
             at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
             bool maximize) {
  const std::vector<at::TensorList> lists{params, grads, memory, second_moment};
  if (steps.empty() || !takes(lists, steps)) return false;
  std::vector<double> ts(params.size());                // t after this step's increment
  for (size_t i = 0; i < params.size(); ++i) ts[i] = advance(steps, i);
  launch_groups("nadamw_", params, ts, [&](const std::vector<size_t>& idx, at::ScalarType dtype, double t,
                                           void* stream) {
    const char* error = nullptr;
    AT_DISPATCH_FLOATING_TYPES(dtype, "deepopt_cuda::nadamw_", [&] {
      error = deepopt_cuda::nadamw<scalar_t>(
          group_of(lists, idx),
          deepopt_rules::make_nadamw<scalar_t>(t, lr, beta1, beta2, eps, weight_decay, maximize), stream);
    });
    return error;
  });
  written({params, memory, second_moment, steps});
  return true;
}

}  // namespace

TORCH_LIBRARY(deepopt_cuda, m) {
  m.def(deepopt_lists::kSgdSchema);
  m.def(deepopt_lists::kNadamwSchema);
}

// One kernel for every dispatch key (it refuses any tensor not on CUDA), so that a CPU list gets
// False back, not the dispatcher's error.
TORCH_LIBRARY_IMPL(deepopt_cuda, CompositeExplicitAutograd, m) {
  m.impl("sgd_", &sgd_);
  m.impl("nadamw_", &nadamw_);
}
