// Runs torch_backend/csrc/elementwise_cuda.cu's launches on the CPU, block by block and thread by
// thread, so that its batching and indexing are checked on a machine without a GPU
// (tests/test_native_cuda.py compiles this with nvcc and runs it). Prints "ok", or what failed.
//
// Checks: over groups of many sizes (empty, one element, around a chunk and a thread round, more
// tensors than one launch takes), every element is visited exactly once; and the SGD and NAdam
// rules give, bit for bit, what a plain loop over elementwise_rules.h's functions gives.

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "elementwise_cuda.cu"

namespace deepopt_cuda {
namespace {

template <typename T, typename Rule>
void run_on_host(const Group& group, const Rule& rule) {
  for_each_batch<T, Rule::kLists>(group, [&](const Batch<T, Rule::kLists>& batch) {
    for (int block = 0; block < batch.first[batch.n]; ++block)
      for (int thread = 0; thread < kThreads; ++thread) apply_block<T, Rule>(batch, rule, block, thread);
    return true;
  });
}

struct Count {
  static constexpr int kLists = 1;
  static constexpr unsigned kWritten = 1u;
  DEEPOPT_HOST_DEVICE void operator()(float (&x)[1]) const { x[0] += 1; }
};

std::vector<int64_t> sizes() {
  std::vector<int64_t> out{0, 1, 2, kThreads - 1, kThreads, kThreads + 1, kThreads * kUnroll + 3, kChunk - 1,
                           kChunk, kChunk + 1, 3 * kChunk + 17, 0, 5};
  std::mt19937 gen(7);
  while (out.size() < 2 * kMaxTensors + 9) out.push_back(std::uniform_int_distribution<int64_t>(0, 3000)(gen));
  return out;
}

int fail(const char* what, size_t i, int64_t j) {
  std::printf("%s: tensor %zu, element %lld\n", what, i, static_cast<long long>(j));
  return 1;
}

int every_element_once() {
  std::vector<std::vector<float>> xs;
  Group group;
  group.lists.resize(1);
  for (int64_t n : sizes()) xs.emplace_back(n, 0.0f);
  for (auto& x : xs) {
    group.lists[0].push_back(x.data());
    group.numel.push_back(static_cast<int64_t>(x.size()));
  }
  run_on_host<float>(group, Count{});
  for (size_t i = 0; i < xs.size(); ++i)
    for (size_t j = 0; j < xs[i].size(); ++j)
      if (xs[i][j] != 1.0f) return fail("an element not visited exactly once", i, j);
  return 0;
}

// ``lists`` random tensors per size (list 3, the second moment, nonnegative).
template <typename T>
std::vector<std::vector<std::vector<T>>> random_lists(int lists, std::mt19937& gen) {
  std::normal_distribution<double> normal;
  std::vector<std::vector<std::vector<T>>> out(lists);
  for (int64_t n : sizes())
    for (int k = 0; k < lists; ++k) {
      std::vector<T> x(n);
      for (T& v : x) v = static_cast<T>(k == 3 ? std::abs(normal(gen)) : normal(gen));   // ν ≥ 0
      out[k].push_back(x);
    }
  return out;
}

template <typename T>
Group group_of(std::vector<std::vector<std::vector<T>>>& lists) {
  Group group;
  group.lists.resize(lists.size());
  for (size_t k = 0; k < lists.size(); ++k)
    for (auto& x : lists[k]) group.lists[k].push_back(x.data());
  for (auto& x : lists[0]) group.numel.push_back(static_cast<int64_t>(x.size()));
  return group;
}

template <typename T>
int same(const std::vector<std::vector<std::vector<T>>>& a, const std::vector<std::vector<std::vector<T>>>& b,
         const char* what) {
  for (size_t k = 0; k < a.size(); ++k)
    for (size_t i = 0; i < a[k].size(); ++i)
      for (size_t j = 0; j < a[k][i].size(); ++j)
        if (a[k][i][j] != b[k][i][j]) return fail(what, i, j);
  return 0;
}

template <typename T, bool kBuf, bool kFirst, bool kNesterov, bool kCoupled>
int sgd_as_a_loop() {
  std::mt19937 gen(1);
  auto kernel = random_lists<T>(kBuf ? 3 : 2, gen);
  auto loop = kernel;
  const auto s = deepopt_rules::make_sgd<T>(0.1, 0.01, !kCoupled, 0.9, 0.2, kNesterov);
  run_on_host<T>(group_of(kernel), SgdRule<T, kBuf, kFirst, kNesterov, kCoupled>{s});
  for (size_t i = 0; i < loop[0].size(); ++i)
    for (size_t j = 0; j < loop[0][i].size(); ++j) {
      T unused = 0;
      deepopt_rules::sgd_element<T, kBuf, kFirst, kNesterov, kCoupled>(loop[0][i][j], loop[1][i][j],
                                                                       kBuf ? loop[2][i][j] : unused, s);
    }
  return same(kernel, loop, "SGD differs from the loop");
}

template <typename T>
int nadamw_as_a_loop() {
  std::mt19937 gen(2);
  auto kernel = random_lists<T>(4, gen);
  auto loop = kernel;
  const auto c = deepopt_rules::make_nadamw<T>(3.0, 1e-2, 0.9, 0.999, 1e-8, 0.1, false);
  run_on_host<T>(group_of(kernel), NadamwRule<T>{c});
  for (size_t i = 0; i < loop[0].size(); ++i)
    for (size_t j = 0; j < loop[0][i].size(); ++j)
      deepopt_rules::nadamw_element<T>(loop[0][i][j], loop[1][i][j], loop[2][i][j], loop[3][i][j], c);
  return same(kernel, loop, "NAdam differs from the loop");
}

}  // namespace
}  // namespace deepopt_cuda

int main() {
  using namespace deepopt_cuda;
  const int failures = every_element_once() + sgd_as_a_loop<float, true, false, false, true>() +
                       sgd_as_a_loop<double, true, true, true, false>() + sgd_as_a_loop<double, false, false, false, false>() +
                       nadamw_as_a_loop<float>() + nadamw_as_a_loop<double>();
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
