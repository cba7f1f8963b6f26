// DMGD's deep memory (docs/math.md §5) for one bucket of same-shape leaves on the CPU, as an XLA
// custom call (jax.ffi): deepopt/csrc/deep_memory.h's passes over each matrix's rows (see its
// header), run for every matrix of the bucket. jax_backend/_native.py builds this file with the
// system's C++ compiler and registers the handler; jax_backend/_deep_memory.py calls it.
//
// Operands (XLA buffers, C order), for a bucket of B leaves of L matrices each (L > 1 for a
// leaf with batch axes), each matrix's view m×n stored as its rows (m×n) or, with transposed,
// as its columns (n×m, optax's (in, out) kernels):
//   args: S (B·L matrices), W₁ (B·L × h×n), W₂ (B·L × n×h), ν (B·L), [Ĝ_{t−1} like S],
//         then the B gradients (L matrices each), then the B values (with values) or none;
//   rets: S, W₁, W₂, ν, [Ĝ_t] (aliased to their args by the caller: written in place), and D̃,
//         a stack like S.
// Attributes: m, n, h, the memory's numbers and its flags (int64 0/1). The element type is
// float32 or float64, the same for every operand; anything else is an error (the caller never
// sends it). The matrices are shared among XLA's intra-op threads.

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "deep_memory.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using deepopt_memory::Options;
using deepopt_memory::one_matrix;

// Runs fn(k) for k in [0, count) on the calling thread and on up to threads − 1 tasks of XLA's
// pool. A task that starts after the caller ran out of work returns at once: the caller waits
// only for tasks that are running (a pool whose threads are all busy, or one thread, never
// deadlocks it).
template <typename F>
void parallel(ffi::ThreadPool& pool, int64_t count, const F& fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable done;
    int active = 0;
    bool closed = false;
  };
  auto shared = std::make_shared<Shared>();
  const int64_t tasks = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < tasks; ++t)
    pool.Schedule([shared, count, &fn] {
      {
        std::lock_guard<std::mutex> lock(shared->mu);
        if (shared->closed) return;   // fn may be gone: touch nothing else
        ++shared->active;
      }
      for (int64_t k; (k = shared->next.fetch_add(1)) < count;) fn(k);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (--shared->active == 0) shared->done.notify_all();
    });
  for (int64_t k; (k = shared->next.fetch_add(1)) < count;) fn(k);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->closed = true;
  shared->done.wait(lock, [&] { return shared->active == 0; });
}

template <typename T>
T* data(const ffi::AnyBuffer& x) {
  return static_cast<T*>(x.untyped_data());
}

template <typename T, bool Transposed>
void run(ffi::ThreadPool& pool, const Options& o, int64_t matrices, int64_t per_leaf, int64_t m, int64_t n,
         int64_t h, T* s, T* w1, T* w2, T* nu, T* prev, const std::vector<const T*>& grads,
         const std::vector<const T*>& values, T* out) {
  const int64_t mn = m * n;
  parallel(pool, matrices, [&](int64_t k) {
    const int64_t leaf = k / per_leaf, j = k % per_leaf;
    const T* g = grads[leaf] + j * mn;
    one_matrix<T, Transposed>(o, m, n, h, s + k * mn, w1 + k * h * n, w2 + k * n * h, nu + k, g,
                              o.values ? values[leaf] + j * mn : g, o.previous ? prev + k * mn : nullptr,
                              out + k * mn, nullptr, 0.0);
  });
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "deepopt_dmgd_memory: " + what);
}

ffi::Error dmgd_memory(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t m, int64_t n,
                       int64_t h, double momentum, double inner_lr, double scale_decay, double eps, double slope_sq,
                       int64_t dot, int64_t nesterov, int64_t transposed, int64_t previous, int64_t values) {
  const size_t state = previous ? 5 : 4;                            // S, W₁, W₂, ν, [Ĝ]
  if (m <= 0 || n <= 0 || h <= 0) return invalid("m, n and h must be positive");
  if (args.size() <= state || rets.size() != state + 1) return invalid("wrong number of operands");
  const size_t leaves = (args.size() - state) / (values ? 2 : 1);
  if (leaves == 0 || state + leaves * (values ? 2 : 1) != args.size()) return invalid("wrong number of leaves");

  std::vector<ffi::AnyBuffer> in, out;
  for (size_t i = 0; i < args.size(); ++i) {
    auto x = args.get<ffi::AnyBuffer>(i);
    if (x.has_error()) return x.error();
    in.push_back(*x);
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto x = rets.get<ffi::AnyBuffer>(i);
    if (x.has_error()) return x.error();
    out.push_back(**x);
  }
  const ffi::DataType dtype = in[0].element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::F64) return invalid("float32 or float64 only");
  const size_t mn = static_cast<size_t>(m * n);
  const size_t matrices = in[0].element_count() / mn;
  const size_t per_leaf = matrices / leaves;
  const size_t counts[] = {matrices * mn, matrices * h * n, matrices * n * h, matrices, matrices * mn};
  for (size_t i = 0; i < state; ++i)
    if (in[i].element_type() != dtype || out[i].element_type() != dtype || in[i].element_count() != counts[i] ||
        out[i].element_count() != counts[i])
      return invalid("a state operand has the wrong type or size");
  if (per_leaf == 0 || per_leaf * leaves != matrices || out[state].element_type() != dtype ||
      out[state].element_count() != counts[0])
    return invalid("the leaves do not match the state");
  for (size_t i = state; i < in.size(); ++i)
    if (in[i].element_type() != dtype || in[i].element_count() != per_leaf * mn)
      return invalid("a gradient or value has the wrong type or size");
  // The state is written in place: in its results, which the caller aliases to its arguments
  // (XLA copies an argument it cannot give up before the call).
  for (size_t i = 0; i < state; ++i)
    if (out[i].untyped_data() != in[i].untyped_data())
      std::memcpy(out[i].untyped_data(), in[i].untyped_data(), in[i].size_bytes());

  const Options o{momentum, inner_lr, scale_decay, eps, slope_sq, dot != 0, nesterov != 0, previous != 0,
                  values != 0};
  const auto call = [&](auto zero) {
    using T = decltype(zero);
    std::vector<const T*> gs, vs;
    for (size_t i = 0; i < leaves; ++i) gs.push_back(data<T>(in[state + i]));
    if (values)
      for (size_t i = 0; i < leaves; ++i) vs.push_back(data<T>(in[state + leaves + i]));
    T* prev = previous ? data<T>(out[4]) : nullptr;
    const auto go = [&](auto layout) {
      run<T, decltype(layout)::value>(pool, o, matrices, per_leaf, m, n, h, data<T>(out[0]), data<T>(out[1]),
                                      data<T>(out[2]), data<T>(out[3]), prev, gs, vs, data<T>(out[state]));
    };
    if (transposed) go(std::true_type{});
    else go(std::false_type{});
  };
  if (dtype == ffi::DataType::F32) call(float{});
  else call(double{});
  return ffi::Error::Success();
}

}  // namespace

// The one symbol the library exports (it is built with -fvisibility=hidden).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* DeepoptDmgdMemory(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepoptDmgdMemory, dmgd_memory,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("h")
                                  .Attr<double>("momentum")
                                  .Attr<double>("inner_lr")
                                  .Attr<double>("scale_decay")
                                  .Attr<double>("eps")
                                  .Attr<double>("slope_sq")
                                  .Attr<int64_t>("dot")
                                  .Attr<int64_t>("nesterov")
                                  .Attr<int64_t>("transposed")
                                  .Attr<int64_t>("previous")
                                  .Attr<int64_t>("values"));
