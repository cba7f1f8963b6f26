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

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 16384;  // elements per task at least (~1 µs of work per thread)

// Whether every list has the first list's length and every tensor is a contiguous CPU tensor
// with its parameter's dtype (float or double) and numel.
bool takes(const std::vector<at::TensorList>& lists) {
  const at::TensorList& params = lists.front();
  for (const at::TensorList& list : lists) {
    if (list.size() != params.size()) return false;
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& x = list[i];
      const at::ScalarType dtype = params[i].scalar_type();
      if (!x.defined() || x.device().type() != at::kCPU || x.scalar_type() != dtype ||
          (dtype != at::kFloat && dtype != at::kDouble) || !x.is_contiguous() ||
          x.numel() != params[i].numel() || x.is_neg() || x.is_conj())
        return false;
    }
  }
  return true;
}

// Whether ``steps`` holds one float32 count (a 0-d CPU tensor) per parameter, or is empty.
bool counts(at::TensorList steps, size_t n) {
  if (steps.empty()) return true;
  if (steps.size() != n) return false;
  for (const at::Tensor& x : steps)
    if (!x.defined() || x.device().type() != at::kCPU || x.scalar_type() != at::kFloat || x.numel() != 1)
      return false;
  return true;
}

// Adds one to the i-th count and returns t after the increment, as torch.optim's counts are.
double advance(at::TensorList steps, size_t i) {
  float* t = steps[i].data_ptr<float>();
  *t += 1;
  return *t;
}

// Marks the tensors as written in place, as torch's in-place ops do: autograd then refuses a
// backward through a value this step changed, instead of using the new one silently.
void written(std::initializer_list<at::TensorList> lists) {
  for (const at::TensorList& list : lists)
    for (const at::Tensor& x : list) x.unsafeGetTensorImpl()->bump_version();
}

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

// Calls ``f`` with the flag as a compile-time constant (std::true_type or std::false_type), so
// that each loop below is compiled branch-free for every combination of its flags.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// SGD with momentum μ, dampening δ, weight decay λ (coupled: G + λW, or decoupled: W(1 − γλ)),
// Nesterov's read G + μB, maximize, and torch's undamped first write (B = G at t = 1):
//   B ← μB + (1 − δ)G,  D = B (or G + μB),  W ← W(1 − γλ) − γD.
template <typename T, bool kBuf, bool kFirst, bool kNesterov, bool kCoupled>
void sgd_loop(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ b, int64_t lo, int64_t hi,
              T sign, T coupled, T keep, T mu, T eta, T step) {
  for (int64_t j = lo; j < hi; ++j) {
    T gj = sign * g[j];
    if (kCoupled) gj += coupled * w[j];
    T d = gj;
    if (kBuf) {
      const T bj = kFirst ? gj : mu * b[j] + eta * gj;
      b[j] = bj;
      d = kNesterov ? gj + mu * bj : bj;
    }
    w[j] = keep * w[j] - step * d;
  }
}

// A stateless rule (μ = 0, η = 1: plain SGD) passes no buffers, and D = G. ``steps``: each
// parameter's count, advanced here, for the undamped first write; empty without it.
bool sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList steps,
          double lr, double weight_decay, bool decoupled, double momentum, double dampening,
          bool nesterov, bool maximize) {
  const bool has_buf = !bufs.empty();
  std::vector<at::TensorList> lists{params, grads};
  if (has_buf) lists.push_back(bufs);
  if (!takes(lists) || !counts(steps, params.size())) return false;
  std::vector<char> first(params.size(), 0);            // t = 1 after this step's increment
  for (size_t i = 0; i < steps.size(); ++i) first[i] = advance(steps, i) == 1.0;
  const bool couple = !decoupled && weight_decay != 0.0;
  for_each_range(params, [&](size_t i, int64_t lo, int64_t hi) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "deepopt::sgd_", [&] {
      using T = scalar_t;
      T* w = params[i].data_ptr<T>();
      const T* g = grads[i].data_ptr<T>();
      T* b = has_buf ? bufs[i].data_ptr<T>() : nullptr;
      const T sign = maximize ? -1 : 1, coupled = static_cast<T>(weight_decay);
      const T keep = static_cast<T>(1.0 - (decoupled ? lr * weight_decay : 0.0));
      const T mu = static_cast<T>(momentum), eta = static_cast<T>(1.0 - dampening), step = static_cast<T>(lr);
      with_flag(has_buf, [&](auto buf) { with_flag(first[i], [&](auto first_write) {
        with_flag(nesterov, [&](auto nest) { with_flag(couple, [&](auto coupled_decay) {
          sgd_loop<T, buf, first_write, nest, coupled_decay>(w, g, b, lo, hi, sign, coupled, keep, mu, eta, step);
        }); });
      }); });
    });
  });
  written({params, bufs, steps});
  return true;
}

// AdamW with the NAdam read (docs/math.md §2):
//   S ← S + (1 − β₁)(G − S),  ν ← β₂ν + (1 − β₂)G²,
//   W ← W(1 − γλ) − γ (c₁S + c₂G) / (√ν / √(1 − β₂ᵗ) + ε),
// with c₁ = β₁/(1 − β₁ᵗ⁺¹) and c₂ = (1 − β₁)/(1 − β₁ᵗ); ``inv_root`` = 1/√(1 − β₂ᵗ), so that the
// loop divides once per element (the divisions, not the memory, bounded it).
template <typename T>
void nadamw_loop(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ s, T* __restrict__ v,
                 int64_t lo, int64_t hi, T sign, T rate, T b2, T r2, T inv_root, T keep, T c1, T c2,
                 T step, T eps) {
  for (int64_t j = lo; j < hi; ++j) {
    const T gj = sign * g[j];
    const T sj = s[j] + rate * (gj - s[j]);
    const T vj = b2 * v[j] + r2 * gj * gj;
    s[j] = sj;
    v[j] = vj;
    w[j] = keep * w[j] - step * ((c1 * sj + c2 * gj) / (std::sqrt(vj) * inv_root + eps));
  }
}

// ``steps``: each parameter's count t, advanced here (the scalars are per tensor, in double).
bool nadamw_(at::TensorList params, at::TensorList grads, at::TensorList memory,
             at::TensorList second_moment, at::TensorList steps, double lr, double beta1,
             double beta2, double eps, double weight_decay, bool maximize) {
  if (!takes({params, grads, memory, second_moment}) || steps.empty() || !counts(steps, params.size()))
    return false;
  struct Scalars { double c1, c2, inv_root; };          // per tensor, from its t (after the increment)
  std::vector<Scalars> at_t(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double t = advance(steps, i);
    at_t[i] = {beta1 / (1.0 - std::pow(beta1, t + 1.0)), (1.0 - beta1) / (1.0 - std::pow(beta1, t)),
               1.0 / std::sqrt(1.0 - std::pow(beta2, t))};
  }
  for_each_range(params, [&](size_t i, int64_t lo, int64_t hi) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "deepopt::nadamw_", [&] {
      using T = scalar_t;
      nadamw_loop<T>(params[i].data_ptr<T>(), grads[i].data_ptr<T>(), memory[i].data_ptr<T>(),
                     second_moment[i].data_ptr<T>(), lo, hi, maximize ? -1 : 1, static_cast<T>(1.0 - beta1),
                     static_cast<T>(beta2), static_cast<T>(1.0 - beta2), static_cast<T>(at_t[i].inv_root),
                     static_cast<T>(1.0 - lr * weight_decay), static_cast<T>(at_t[i].c1),
                     static_cast<T>(at_t[i].c2), static_cast<T>(lr), static_cast<T>(eps));
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
  m.def("sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor(c!)[] steps, float lr, "
        "float weight_decay, bool decoupled, float momentum, float dampening, bool nesterov, "
        "bool maximize) -> bool");
  m.def("nadamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] memory, Tensor(c!)[] second_moment, "
        "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool maximize) -> bool");
  m.def("fused_groups(Tensor[] params, Tensor[] grads, bool half) -> int[]");
}

// One kernel for every device (it refuses any tensor not on the CPU), so that a list with a CUDA
// tensor in it gets False back, not the dispatcher's error.
TORCH_LIBRARY_IMPL(deepopt, CompositeExplicitAutograd, m) {
  m.impl("sgd_", &sgd_);
  m.impl("nadamw_", &nadamw_);
  m.impl("fused_groups", &fused_groups);
}
