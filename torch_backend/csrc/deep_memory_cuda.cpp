// DMGD's memory on CUDA, as torch ops: deep_memory_cuda.cu's two full-size passes for one bucket's
// stacks, in place of torch ops in torch_backend/_deep_memory.py's fused_kernel (see its
// docstring). Part of the ``torch.ops.deepopt_cuda`` library (elementwise_cuda.cpp defines it).
//
// Each op checks every tensor first and returns false, having written nothing, unless all are
// contiguous float32 or float64 CUDA tensors of one dtype on one device with the bucket's sizes;
// then it queues one launch on the device's current stream (the read with the outer step: one per
// 64 matrices) and returns without waiting.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "deep_memory_cuda.h"
#include "tensor_lists.h"

namespace {

bool fits(const at::Tensor& x, const at::Tensor& like, at::IntArrayRef sizes) {
  return x.defined() && x.is_cuda() && x.device() == like.device() && x.scalar_type() == like.scalar_type() &&
         x.is_contiguous() && x.sizes() == sizes && !x.is_neg() && !x.is_conj();
}

// The bucket's sizes from the stacks S (B, m, n) and the thin factor A (B, m, h), if every stack
// fits: ``full`` (B, m, n) and ``w2`` (B, n, h); else false.
bool bucket(const at::Tensor& s, const at::Tensor& a, const at::Tensor& w2, std::initializer_list<at::Tensor> full,
            deepopt_cuda::MemorySizes& z) {
  if (!s.defined() || !s.is_cuda() || s.dim() != 3 || !a.defined() || a.dim() != 3 ||
      (s.scalar_type() != at::kFloat && s.scalar_type() != at::kDouble))
    return false;
  z = {s.size(0), s.size(1), s.size(2), a.size(2)};
  if (z.h <= 0 || !fits(s, s, {z.batch, z.m, z.n}) || !fits(a, s, {z.batch, z.m, z.h}) ||
      !fits(w2, s, {z.batch, z.n, z.h}))
    return false;
  for (const at::Tensor& x : full)
    if (!fits(x, s, {z.batch, z.m, z.n})) return false;
  return true;
}

void check(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "deepopt_cuda::", op, ": a kernel failed to launch: ", error);
}

// P = S − V + νH W₂ᵀ into p, S ← αS − ηP. p may not be S.
bool dmgd_write_(const at::Tensor& s, const at::Tensor& v, const at::Tensor& hn, const at::Tensor& w2,
                 const at::Tensor& p, double alpha, double eta) {
  deepopt_cuda::MemorySizes z{};
  if (!bucket(s, hn, w2, {v, p}, z) || p.data_ptr() == s.data_ptr()) return false;
  const c10::DeviceGuard guard(s.device());
  void* stream = deepopt_lists::current_stream(s.device());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "deepopt_cuda::dmgd_write_", [&] {
    check(deepopt_cuda::dmgd_write<scalar_t>(s.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(),
                                             w2.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), z,
                                             static_cast<scalar_t>(alpha), static_cast<scalar_t>(eta), stream),
          "dmgd_write_");
  });
  deepopt_lists::written({at::TensorList(s), at::TensorList(p)});
  return true;
}

// D̃ = a (S + hq W₂ᵀ) + c V into out; or, with params (B contiguous tensors of m·n numbers, the
// bucket's parameters), W ← W − lr D̃ and out not used. out may be S or V (each element is read
// before it is written, by the same thread).
bool dmgd_read_(const at::Tensor& s, const at::Tensor& v, const at::Tensor& hq, const at::Tensor& w2,
                const c10::optional<at::Tensor>& out, at::TensorList params, double a, double c, double lr) {
  deepopt_cuda::MemorySizes z{};
  const bool outer = !params.empty();
  if (!bucket(s, hq, w2, {v}, z) || (!outer && !(out.has_value() && fits(*out, s, {z.batch, z.m, z.n}))))
    return false;
  if (outer) {
    if (static_cast<int64_t>(params.size()) != z.batch) return false;
    for (const at::Tensor& x : params)
      if (!x.defined() || !x.is_cuda() || x.device() != s.device() || x.scalar_type() != s.scalar_type() ||
          !x.is_contiguous() || x.numel() != z.m * z.n || x.is_neg() || x.is_conj())
        return false;
  }
  const c10::DeviceGuard guard(s.device());
  void* stream = deepopt_lists::current_stream(s.device());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "deepopt_cuda::dmgd_read_", [&] {
    std::vector<scalar_t*> ps;
    for (const at::Tensor& x : params) ps.push_back(x.data_ptr<scalar_t>());
    check(deepopt_cuda::dmgd_read<scalar_t>(s.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), hq.data_ptr<scalar_t>(),
                                            w2.data_ptr<scalar_t>(), outer ? nullptr : out->data_ptr<scalar_t>(), ps, z,
                                            static_cast<scalar_t>(a), static_cast<scalar_t>(c),
                                            static_cast<scalar_t>(lr), stream),
          "dmgd_read_");
  });
  if (outer) deepopt_lists::written({params});
  else deepopt_lists::written({at::TensorList(*out)});
  return true;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepopt_cuda, m) {
  m.def("dmgd_write_(Tensor(a!) s, Tensor v, Tensor hn, Tensor w2, Tensor(b!) p, float alpha, float eta) -> bool");
  m.def("dmgd_read_(Tensor s, Tensor v, Tensor hq, Tensor w2, Tensor(a!)? out, Tensor(b!)[] params, float a, "
        "float c, float lr) -> bool");
}

TORCH_LIBRARY_IMPL(deepopt_cuda, CompositeExplicitAutograd, m) {
  m.impl("dmgd_write_", &dmgd_write_);
  m.impl("dmgd_read_", &dmgd_read_);
}
