// DMGD's deep memory (docs/math.md §5) for one bucket of same-shape matrices on the CPU, as a torch
// op: deepopt/csrc/deep_memory.h's passes over each matrix's rows (see its header), run for every
// matrix of the bucket, in place of torch_backend/_deep_memory.py's fused_kernel (~40 torch ops
// over the whole bucket). The op checks every tensor first and returns false, having written
// nothing, where it cannot take the bucket; the caller then runs fused_kernel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "deep_memory.h"

namespace {

using deepopt_memory::Options;
using deepopt_memory::one_matrix;

bool cpu_contiguous(const at::Tensor& x, at::ScalarType dtype) {
  return x.defined() && x.device().type() == at::kCPU && x.scalar_type() == dtype && x.is_contiguous() &&
         !x.is_neg() && !x.is_conj();
}

// The bucket: s, prev_key, out (B, m, n); w1 (B, h, n); w2 (B, n, h); nu (B numbers); grads and
// values B tensors of m·n numbers each (values empty: V = G). With params (B tensors of m·n
// numbers), the outer step W ← W − lr D̃ is made in the read's pass and out (None) is not needed.
// Returns false, writing nothing, unless every tensor is a contiguous CPU float32 or float64
// tensor of the bucket's dtype with its expected size, and h > 0.
bool dmgd_memory_(const at::Tensor& s, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& nu,
                  at::TensorList grads, at::TensorList values, const c10::optional<at::Tensor>& prev_key,
                  const c10::optional<at::Tensor>& out, at::TensorList params, double lr, double momentum, double inner_lr,
                  double scale_decay, double eps, double slope_sq, bool dot, bool nesterov) {
  const at::ScalarType dtype = s.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || s.dim() != 3 || w1.dim() != 3 || w2.dim() != 3) return false;
  const int64_t b = s.size(0), m = s.size(1), n = s.size(2), h = w1.size(1);
  const bool previous = prev_key.has_value() && prev_key->defined();
  if (h <= 0 || m <= 0 || n <= 0 || static_cast<int64_t>(grads.size()) != b ||
      (!values.empty() && static_cast<int64_t>(values.size()) != b) ||
      (!params.empty() && static_cast<int64_t>(params.size()) != b))
    return false;
  for (const at::Tensor* x : {&s, &w1, &w2, &nu})
    if (!cpu_contiguous(*x, dtype)) return false;
  if (w1.sizes() != at::IntArrayRef{b, h, n} || w2.sizes() != at::IntArrayRef{b, n, h} || nu.numel() != b)
    return false;
  const bool stores = params.empty();                          // D̃ into out, else into the step
  if (stores && !(out.has_value() && cpu_contiguous(*out, dtype) && out->sizes() == s.sizes())) return false;
  if (previous && (!cpu_contiguous(*prev_key, dtype) || prev_key->sizes() != s.sizes())) return false;
  for (at::TensorList list : {grads, values, params})
    for (const at::Tensor& x : list)
      if (!cpu_contiguous(x, dtype) || x.numel() != m * n) return false;
  const Options o{momentum, inner_lr, scale_decay, eps, slope_sq, dot, nesterov, previous, !values.empty()};
  AT_DISPATCH_FLOATING_TYPES(dtype, "dmgd_memory_", [&] {
    at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const scalar_t* g = grads[k].data_ptr<scalar_t>();
        one_matrix<scalar_t, false>(o, m, n, h, s.data_ptr<scalar_t>() + k * m * n, w1.data_ptr<scalar_t>() + k * h * n,
                             w2.data_ptr<scalar_t>() + k * n * h, nu.data_ptr<scalar_t>() + k, g,
                             o.values ? values[k].data_ptr<scalar_t>() : g,
                             previous ? prev_key->data_ptr<scalar_t>() + k * m * n : nullptr,
                             stores ? out->data_ptr<scalar_t>() + k * m * n : nullptr,
                             stores ? nullptr : params[k].data_ptr<scalar_t>(), lr);
      }
    });
  });
  for (const at::Tensor* x : {&s, &w1, &w2, &nu}) x->unsafeGetTensorImpl()->bump_version();
  if (previous) prev_key->unsafeGetTensorImpl()->bump_version();
  if (stores) out->unsafeGetTensorImpl()->bump_version();
  for (const at::Tensor& p : params) p.unsafeGetTensorImpl()->bump_version();
  return true;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepopt, m) {
  m.def("dmgd_memory_(Tensor(a!) s, Tensor(b!) w1, Tensor(c!) w2, Tensor(d!) nu, Tensor[] grads, "
        "Tensor[] values, Tensor(e!)? prev_key, Tensor(f!)? out, Tensor(g!)[] params, float lr, "
        "float momentum, float inner_lr, float scale_decay, float eps, float slope_sq, bool dot, "
        "bool nesterov) -> bool");
}

TORCH_LIBRARY_IMPL(deepopt, CompositeExplicitAutograd, m) {
  m.impl("dmgd_memory_", &dmgd_memory_);
}
