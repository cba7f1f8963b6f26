// DMGD's C++ memory kernel (deepopt/csrc/deep_memory.h) at two versions, timed alternately in one
// process: the harness of benchmarks/kernel_ab.py, which builds it with -DHEADER_A="…" and
// -DHEADER_B="…" naming the two copies of the header. Each copy is included in a namespace of its
// own, so the same matrices' steps run through either kernel, one right after the other.
//
//   deep_memory_ab ROUNDS FLUSH TRANSPOSED ALPHA ETA DECAY EPS SLOPE_SQ DOT NESTEROV B M N [B M N …]
//
// Each round runs A's and B's step over every bucket (B matrices of M×N, the view's rows or, with
// TRANSPOSED, its columns as optax stores them; float32, h = 16, V = G, the outer step made in
// the read), in an order that alternates between rounds, each after a pass over 48 MB that
// evicts the caches (FLUSH = 1), as a training step's other work does. Prints one JSON object:
// the seconds of each side's rounds, and the largest difference between the two sides' parameters
// at the end (the kernels' results, which should agree within float rounding).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define deepopt_memory kernel_a
#include HEADER_A
#undef deepopt_memory
#define deepopt_memory kernel_b
#include HEADER_B
#undef deepopt_memory

namespace {

struct Matrix {
  int64_t m, n;
  std::vector<float> s, w1, w2, g, p;
  float nu;
};

constexpr int64_t kHidden = 16;

template <typename Options, typename Step>
double run(std::vector<Matrix>& mats, const Options& o, bool transposed, const Step& step) {
  const auto t0 = std::chrono::steady_clock::now();
  for (Matrix& x : mats) step(o, x, transposed);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One matrix through namespace NS's kernel (as torch's op and the XLA custom call run it).
#define STEP(NS)                                                                                        \
  [](const NS::Options& o, Matrix& x, bool transposed) {                                               \
    if (transposed)                                                                                     \
      NS::one_matrix<float, true>(o, x.m, x.n, kHidden, x.s.data(), x.w1.data(), x.w2.data(), &x.nu,   \
                                  x.g.data(), x.g.data(), nullptr, nullptr, x.p.data(), 1e-3);          \
    else                                                                                                \
      NS::one_matrix<float, false>(o, x.m, x.n, kHidden, x.s.data(), x.w1.data(), x.w2.data(), &x.nu,  \
                                   x.g.data(), x.g.data(), nullptr, nullptr, x.p.data(), 1e-3);         \
  }

void print_list(const char* name, const std::vector<double>& xs, bool last) {
  std::printf("\"%s\": [", name);
  for (size_t i = 0; i < xs.size(); ++i) std::printf(i ? ", %.9g" : "%.9g", xs[i]);
  std::printf(last ? "]" : "], ");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 14 || (argc - 11) % 3 != 0) {
    std::fprintf(stderr, "usage: %s ROUNDS FLUSH TRANSPOSED ALPHA ETA DECAY EPS SLOPE_SQ DOT NESTEROV B M N [B M N ...]\n",
                 argv[0]);
    return 2;
  }
  const int rounds = std::atoi(argv[1]);
  const bool flush = std::atoi(argv[2]) != 0, transposed = std::atoi(argv[3]) != 0;
  const double alpha = std::atof(argv[4]), eta = std::atof(argv[5]), decay = std::atof(argv[6]),
               eps = std::atof(argv[7]), slope_sq = std::atof(argv[8]);
  const bool dot = std::atoi(argv[9]) != 0, nesterov = std::atoi(argv[10]) != 0;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Matrix> a;
  for (int k = 11; k + 2 < argc; k += 3) {
    const int64_t count = std::atoll(argv[k]), m = std::atoll(argv[k + 1]), n = std::atoll(argv[k + 2]);
    for (int64_t i = 0; i < count; ++i) {
      Matrix x{m, n, std::vector<float>(m * n), std::vector<float>(kHidden * n), std::vector<float>(n * kHidden),
               std::vector<float>(m * n), std::vector<float>(m * n), 1e-3f};
      for (float& v : x.s) v = 1e-3f * normal(rng);
      for (float& v : x.g) v = 1e-3f * normal(rng);
      for (float& v : x.p) v = 0.02f * normal(rng);
      for (float& v : x.w1) v = normal(rng);
      for (float& v : x.w2) v = 1e-2f * normal(rng);
      a.push_back(std::move(x));
    }
  }
  std::vector<Matrix> b = a;
  const kernel_a::Options oa{alpha, eta, decay, eps, slope_sq, dot, nesterov, false, false};
  const kernel_b::Options ob{alpha, eta, decay, eps, slope_sq, dot, nesterov, false, false};
  std::vector<float> evict(flush ? (48 << 20) / sizeof(float) : 0);
  std::vector<double> ta, tb;
  for (int r = 0; r < rounds; ++r)
    for (int side = 0; side < 2; ++side) {
      for (size_t i = 0; i < evict.size(); i += 16) evict[i] += 1.0f;
      if ((r + side) % 2 == 0) ta.push_back(run(a, oa, transposed, STEP(kernel_a)));
      else tb.push_back(run(b, ob, transposed, STEP(kernel_b)));
    }
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[i].p.size(); ++j) {
      diff = std::max(diff, double(std::fabs(a[i].p[j] - b[i].p[j])));
      scale = std::max(scale, double(std::fabs(a[i].p[j])));
    }
  std::printf("{");
  print_list("a_seconds", ta, false);
  print_list("b_seconds", tb, false);
  std::printf("\"max_param_diff\": %.9g, \"max_param\": %.9g}\n", diff, scale);
  return 0;
}
