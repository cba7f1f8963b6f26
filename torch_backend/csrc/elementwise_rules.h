// The per-element arithmetic of the element-wise rules torch has no fused kernel for (docs/math.md
// §2–§3), shared by deepopt's CPU loops (elementwise.cpp) and CUDA kernels (elementwise_cuda.cu),
// so that both compute each element in the same order as the foreach twin. Plain C++ (CUDA's
// __host__ __device__ where nvcc compiles it): no torch here.
//
// The scalars are made once per tensor in double (make_*) and rounded to the tensors' type T; the
// element arithmetic is in T.

#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define DEEPOPT_HOST_DEVICE __host__ __device__
#else
#define DEEPOPT_HOST_DEVICE
#endif

namespace deepopt_rules {

// Calls ``f`` with the flag as a compile-time constant (std::true_type or std::false_type), so
// that each loop is compiled branch-free for every combination of its flags.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// SGD with momentum μ, dampening δ, weight decay λ (coupled: G + λW, or decoupled: W(1 − γλ)),
// Nesterov's read G + μB, maximize, and torch's undamped first write (B = G at t = 1):
//   B ← μB + (1 − δ)G,  D = B (or G + μB),  W ← W(1 − γλ) − γD.
// A stateless rule (μ = 0, η = 1: plain SGD) has no buffer, and D = G.
template <typename T>
struct SgdScalars {
  T sign, coupled, keep, mu, eta, step;
};

template <typename T>
SgdScalars<T> make_sgd(double lr, double weight_decay, bool decoupled, double momentum, double dampening,
                       bool maximize) {
  return {static_cast<T>(maximize ? -1 : 1), static_cast<T>(weight_decay),
          static_cast<T>(1.0 - (decoupled ? lr * weight_decay : 0.0)), static_cast<T>(momentum),
          static_cast<T>(1.0 - dampening), static_cast<T>(lr)};
}

template <typename T, bool kBuf, bool kFirst, bool kNesterov, bool kCoupled>
DEEPOPT_HOST_DEVICE inline void sgd_element(T& w, T g, T& b, const SgdScalars<T>& s) {
  T gj = s.sign * g;
  if (kCoupled) gj += s.coupled * w;
  T d = gj;
  if (kBuf) {
    const T bj = kFirst ? gj : s.mu * b + s.eta * gj;
    b = bj;
    d = kNesterov ? gj + s.mu * bj : bj;
  }
  w = s.keep * w - s.step * d;
}

// AdamW with the NAdam read, at step t (after its increment):
//   S ← S + (1 − β₁)(G − S),  ν ← β₂ν + (1 − β₂)G²,
//   W ← W(1 − γλ) − γ (c₁S + c₂G) / (√ν / √(1 − β₂ᵗ) + ε),
// with c₁ = β₁/(1 − β₁ᵗ⁺¹) and c₂ = (1 − β₁)/(1 − β₁ᵗ); ``inv_root`` = 1/√(1 − β₂ᵗ), so that each
// element divides once (on the CPU the divisions, not the memory, bounded the loop).
template <typename T>
struct NadamwScalars {
  T sign, rate, b2, r2, inv_root, keep, c1, c2, step, eps;
};

template <typename T>
NadamwScalars<T> make_nadamw(double t, double lr, double beta1, double beta2, double eps, double weight_decay,
                             bool maximize) {
  return {static_cast<T>(maximize ? -1 : 1),
          static_cast<T>(1.0 - beta1),
          static_cast<T>(beta2),
          static_cast<T>(1.0 - beta2),
          static_cast<T>(1.0 / std::sqrt(1.0 - std::pow(beta2, t))),
          static_cast<T>(1.0 - lr * weight_decay),
          static_cast<T>(beta1 / (1.0 - std::pow(beta1, t + 1.0))),
          static_cast<T>((1.0 - beta1) / (1.0 - std::pow(beta1, t))),
          static_cast<T>(lr),
          static_cast<T>(eps)};
}

template <typename T>
DEEPOPT_HOST_DEVICE inline void nadamw_element(T& w, T g, T& s, T& v, const NadamwScalars<T>& c) {
  using std::sqrt;
  const T gj = c.sign * g;
  const T sj = s + c.rate * (gj - s);
  const T vj = c.b2 * v + c.r2 * gj * gj;
  s = sj;
  v = vj;
  w = c.keep * w - c.step * ((c.c1 * sj + c.c2 * gj) / (sqrt(vj) * c.inv_root + c.eps));
}

}  // namespace deepopt_rules
