// deepopt's CPU kernels for the element-wise rules torch has no fused kernel for
// (torch_backend/_native.py builds this file on first use and documents when it runs).
//
// Each op takes a whole group — lists of parameters, gradients and state tensors —
// and makes one pass over each tensor, reading and writing every word once: the step that
// torch's foreach ops make in several passes (one op per tensor on the CPU), here as one loop.
// An op first checks every tensor and returns false, having written nothing, if it cannot take
// them all (another dtype or device, non-contiguous, mismatched sizes); the caller then runs
// its other path. The formulas are docs/math.md §2–§3's, in the order the foreach twin
// computes them, with the scalars in double and the element arithmetic in the tensors' type.
// ``fused_groups`` is the per-tensor check before torch's own fused kernels, in C++.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "elementwise_rules.h"
#include "tensor_lists.h"

#include <algorithm>
#include <vector>

namespace {

using deepopt_lists::advance;
using deepopt_lists::counts;
using deepopt_lists::written;
using deepopt_rules::make_nadamw;
using deepopt_rules::make_sgd;
using deepopt_rules::nadamw_element;
using deepopt_rules::NadamwScalars;
using deepopt_rules::sgd_element;
using deepopt_rules::SgdScalars;
using deepopt_rules::with_flag;

constexpr int64_t kGrain = 16384;  // elements per task at least (~1 µs of work per thread)

// Calls ``f(i, lo, hi)`` on ranges [lo, hi) of tensor i's elements that together cover every
// tensor of the list once: the whole list is one range, split once across torch's threads, so a
// step opens one parallel region (not one per tensor) and small tensors are shared out as well
// as large ones. Built without -fopenmp, at::parallel_for runs the whole range on the calling
// thread (torch_backend/_native.py: FLAGS).
template <typename F>
void for_each_range(at::TensorList params, F&& f) {
  std::vector<int64_t> start(params.size() + 1, 0);   // tensor i covers [start[i], start[i + 1])
  for (size_t i = 0; i < params.size(); ++i) start[i + 1] = start[i] + params[i].numel();
  at::parallel_for(0, start.back(), kGrain, [&](int64_t lo, int64_t hi) {
    size_t i = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; lo < hi; ++i) {
      const int64_t end = std::min(hi, start[i + 1]);
      if (end > lo) f(i, lo - start[i], end - start[i]);
      lo = end;
    }
  });
}

// SGD (elementwise_rules.h: sgd_element) over elements [lo, hi) of one tensor.
template <typename T, bool kBuf, bool kFirst, bool kNesterov, bool kCoupled>
void sgd_loop(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ b, int64_t lo, int64_t hi,
              const SgdScalars<T>& s) {
  T unused = 0;
  for (int64_t j = lo; j < hi; ++j)
    sgd_element<T, kBuf, kFirst, kNesterov, kCoupled>(w[j], g[j], kBuf ? b[j] : unused, s);
}

// A stateless rule (μ = 0, η = 1: plain SGD) passes no buffers, and D = G. ``steps``: each
// parameter's count, advanced here, for the undamped first write; empty without it.
bool sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList steps,
          double lr, double weight_decay, bool decoupled, double momentum, double dampening,
          bool nesterov, bool maximize) {
  const bool has_buf = !bufs.empty();
  std::vector<at::TensorList> lists{params, grads};
  if (has_buf) lists.push_back(bufs);
  if (!deepopt_lists::takes(lists, at::kCPU) || !counts(steps, params.size())) return false;
  std::vector<char> first(params.size(), 0);            // t = 1 after this step's increment
  for (size_t i = 0; i < steps.size(); ++i) first[i] = advance(steps, i) == 1.0;
  const bool couple = !decoupled && weight_decay != 0.0;
  for_each_range(params, [&](size_t i, int64_t lo, int64_t hi) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "deepopt::sgd_", [&] {
      using T = scalar_t;
      T* w = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      T* b = has_buf ? bufs[i].data_ptr<T>() : nullptr;
      const SgdScalars<T> s = make_sgd<T>(lr, weight_decay, decoupled, momentum, dampening, maximize);
      with_flag(has_buf, [&](auto buf) { with_flag(first[i], [&](auto first_write) {
        with_flag(nesterov, [&](auto nest) { with_flag(couple, [&](auto coupled_decay) {
          sgd_loop<T, buf, first_write, nest, coupled_decay>(w, g, b, lo, hi, s);
        }); });
      }); });
    });
  });
  written({params, bufs, steps});
  return true;
}

// AdamW with the NAdam read (elementwise_rules.h: nadamw_element) over elements [lo, hi).
template <typename T>
void nadamw_loop(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ s, T* __restrict__ v,
                 int64_t lo, int64_t hi, const NadamwScalars<T>& c) {
  for (int64_t j = lo; j < hi; ++j) nadamw_element<T>(w[j], g[j], s[j], v[j], c);
}

// ``steps``: each parameter's count t, advanced here (the scalars are per tensor, from t).
bool nadamw_(at::TensorList params, at::TensorList grads, at::TensorList memory,
             at::TensorList second_moment, at::TensorList steps, double lr, double beta1,
             double beta2, double eps, double weight_decay, bool maximize) {
  if (!deepopt_lists::takes({params, grads, memory, second_moment}, at::kCPU) || steps.empty() ||
      !counts(steps, params.size()))
    return false;
  std::vector<double> ts(params.size());                 // t after this step's increment
  for (size_t i = 0; i < params.size(); ++i) ts[i] = advance(steps, i);
  for_each_range(params, [&](size_t i, int64_t lo, int64_t hi) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "deepopt::nadamw_", [&] {
      using T = scalar_t;
      const NadamwScalars<T> c = make_nadamw<T>(ts[i], lr, beta1, beta2, eps, weight_decay, maximize);
      nadamw_loop<T>(params[i].data_ptr<T>(), grads[i].data_ptr<T>(), memory[i].data_ptr<T>(),
                     second_moment[i].data_ptr<T>(), lo, hi, c);
    });
  });
  written({params, memory, second_moment, steps});
  return true;
}

// The fused kernels' groups: for each parameter, the index of its (device, dtype) group in the
// order they first appear, if torch's fused kernels can take every pair — both strided and
// contiguous, the gradient of its parameter's dtype and device, on the CPU or CUDA, float32 or
// float64 (or half precision with ``half``); else an empty list.
std::vector<int64_t> fused_groups(at::TensorList params, at::TensorList grads, bool half) {
  std::vector<int64_t> ids;
  std::vector<std::pair<at::Device, at::ScalarType>> keys;
  if (params.size() != grads.size()) return {};
  ids.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor &p = params[i], &g = grads[i];
    const at::ScalarType dtype = p.scalar_type();
    const bool exact = dtype == at::kFloat || dtype == at::kDouble;
    const bool halfp = dtype == at::kHalf || dtype == at::kBFloat16;
    if (!p.defined() || !g.defined() || p.layout() != at::kStrided || g.layout() != at::kStrided ||
        g.scalar_type() != dtype || g.device() != p.device() || !(exact || (half && halfp)) ||
        !(p.is_cpu() || p.is_cuda()) || !p.is_contiguous() || !g.is_contiguous())
      return {};
    const std::pair<at::Device, at::ScalarType> key{p.device(), dtype};
    size_t k = 0;
    while (k < keys.size() && keys[k] != key) ++k;
    if (k == keys.size()) keys.push_back(key);
    ids.push_back(static_cast<int64_t>(k));
  }
  return ids;
}

}  // namespace

TORCH_LIBRARY(deepopt, m) {
  m.def(deepopt_lists::kSgdSchema);
  m.def(deepopt_lists::kNadamwSchema);
  m.def("fused_groups(Tensor[] params, Tensor[] grads, bool half) -> int[]");
}

// One kernel for every device (it refuses any tensor not on the CPU), so that a list with a CUDA
// tensor in it gets False back, not the dispatcher's error.
TORCH_LIBRARY_IMPL(deepopt, CompositeExplicitAutograd, m) {
  m.impl("sgd_", &sgd_);
  m.impl("nadamw_", &nadamw_);
  m.impl("fused_groups", &fused_groups);
}
