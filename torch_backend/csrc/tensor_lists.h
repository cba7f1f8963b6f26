// What deepopt's element-wise ops (elementwise.cpp on the CPU, elementwise_cuda.cpp on CUDA)
// share: the checks on a group's tensor lists, the step counts, and the version bump that tells
// autograd a tensor was written in place. Every op checks a whole group before it writes
// anything and returns false where it cannot take it; the caller then runs its other path.

#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <initializer_list>
#include <vector>

namespace deepopt_lists {

// Whether every list has the first list's length and every tensor is a contiguous float or
// double tensor on ``device`` (its index too, unless the index is -1) with its parameter's dtype
// and numel.
inline bool takes(const std::vector<at::TensorList>& lists, at::Device device) {
  const at::TensorList& params = lists.front();
  for (const at::TensorList& list : lists) {
    if (list.size() != params.size()) return false;
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& x = list[i];
      const at::ScalarType dtype = params[i].scalar_type();
      if (!x.defined() || x.device().type() != device.type() ||
          (device.has_index() && x.device().index() != device.index()) || x.scalar_type() != dtype ||
          (dtype != at::kFloat && dtype != at::kDouble) || !x.is_contiguous() ||
          x.numel() != params[i].numel() || x.is_neg() || x.is_conj())
        return false;
    }
  }
  return true;
}

// Whether ``steps`` holds one float32 count (a 0-d CPU tensor) per parameter, or is empty. The
// counts stay on the CPU, as torch.optim's do outside its capturable mode, whatever the device of
// the parameters: the ops read and advance them on the host, with no device synchronisation.
inline bool counts(at::TensorList steps, size_t n) {
  if (steps.empty()) return true;
  if (steps.size() != n) return false;
  for (const at::Tensor& x : steps)
    if (!x.defined() || x.device().type() != at::kCPU || x.scalar_type() != at::kFloat || x.numel() != 1)
      return false;
  return true;
}

// Adds one to the i-th count and returns t after the increment, as torch.optim's counts are.
inline double advance(at::TensorList steps, size_t i) {
  float* t = steps[i].data_ptr<float>();
  *t += 1;
  return *t;
}

// Marks the tensors as written in place, as torch's in-place ops do: autograd then refuses a
// backward through a value this step changed, instead of using the new one silently.
inline void written(std::initializer_list<at::TensorList> lists) {
  for (const at::TensorList& list : lists)
    for (const at::Tensor& x : list) x.unsafeGetTensorImpl()->bump_version();
}

// The schemas of the element-wise ops, which the CPU library (``deepopt``) and the CUDA one
// (``deepopt_cuda``) both define.
constexpr const char* kSgdSchema =
    "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor(c!)[] steps, float lr, "
    "float weight_decay, bool decoupled, float momentum, float dampening, bool nesterov, bool maximize) -> bool";
constexpr const char* kNadamwSchema =
    "nadamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] memory, Tensor(c!)[] second_moment, "
    "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> bool";

// The current stream of ``device`` as its backend's handle (a cudaStream_t on CUDA), through c10's
// device-generic interface, so that this compiles without CUDA's headers.
inline void* current_stream(at::Device device) {
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
}

}  // namespace deepopt_lists
