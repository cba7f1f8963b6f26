// Runs torch_backend/csrc/deep_memory_cuda.cu's passes on the CPU, block by block, each phase for
// every thread of a block before the next (as the barriers between them order it), so that the
// tiling is checked on a machine without a GPU (tests/test_native_cuda.py compiles and runs this).
// Prints "ok", or what failed.
//
// Sizes that end inside a tile's rows, columns and depth; more matrices than one launch of the
// read with the outer step takes. Each pass gives, bit for bit, a plain loop that sums the thin
// product in the same order.

#include <cstdio>
#include <random>
#include <vector>

#include "deep_memory_cuda.cu"

namespace deepopt_cuda {
namespace {

template <typename T, typename Epilogue>
void run_on_host(const T* a, const T* w, const MemorySizes& z, int64_t b0, int64_t count, const Epilogue& epilogue) {
  std::vector<T> acc(static_cast<size_t>(kCols) * kRows);
  std::vector<typename Epilogue::In> in(static_cast<size_t>(kCols) * kRows);
  Tile<T> tile;
  for (int64_t b = b0; b < b0 + count; ++b)
    for (int64_t i0 = 0; i0 < z.m; i0 += kRows)
      for (int64_t j0 = 0; j0 < z.n; j0 += kCols) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int t = 0; t < kCols; ++t)
          fetch(epilogue, z, b, i0, j0 + t, *reinterpret_cast<typename Epilogue::In(*)[kRows]>(&in[t * kRows]));
        for (int64_t k0 = 0; k0 < z.h; k0 += kDepth) {
          for (int t = 0; t < kCols; ++t) load(tile, a, w, z, b, i0, j0, k0, t);
          for (int t = 0; t < kCols; ++t) accumulate(tile, *reinterpret_cast<T(*)[kRows]>(&acc[t * kRows]), t);
        }
        for (int t = 0; t < kCols; ++t)
          finish<T>(epilogue, z, b, i0, j0 + t, *reinterpret_cast<T(*)[kRows]>(&acc[t * kRows]),
                    *reinterpret_cast<typename Epilogue::In(*)[kRows]>(&in[t * kRows]));
      }
}

std::vector<double> randoms(size_t count, std::mt19937& gen) {
  std::normal_distribution<double> normal;
  std::vector<double> out(count);
  for (double& x : out) x = normal(gen);
  return out;
}

// Σₖ a[b, i, k] w[b, j, k], in k's order.
double product(const std::vector<double>& a, const std::vector<double>& w, const MemorySizes& z, int64_t b, int64_t i,
               int64_t j) {
  double sum = 0;
  for (int64_t k = 0; k < z.h; ++k) sum += a[(b * z.m + i) * z.h + k] * w[(b * z.n + j) * z.h + k];
  return sum;
}

int fail(const char* what, int64_t at) {
  std::printf("%s: element %lld\n", what, static_cast<long long>(at));
  return 1;
}

int write_as_a_loop(const MemorySizes& z) {
  std::mt19937 gen(3);
  const size_t full = z.batch * z.m * z.n;
  std::vector<double> s = randoms(full, gen), v = randoms(full, gen), p(full, 0.0);
  const std::vector<double> hn = randoms(z.batch * z.m * z.h, gen), w2 = randoms(z.batch * z.n * z.h, gen);
  std::vector<double> s_ref = s, p_ref(full);
  const double alpha = 0.9, eta = 0.3;
  run_on_host(hn.data(), w2.data(), z, 0, z.batch, Write<double>{s.data(), v.data(), p.data(), alpha, eta});
  for (int64_t b = 0; b < z.batch; ++b)
    for (int64_t i = 0; i < z.m; ++i)
      for (int64_t j = 0; j < z.n; ++j) {
        const int64_t idx = (b * z.m + i) * z.n + j;
        p_ref[idx] = (s_ref[idx] - v[idx]) + product(hn, w2, z, b, i, j);
        s_ref[idx] = alpha * s_ref[idx] - eta * p_ref[idx];
      }
  for (size_t idx = 0; idx < full; ++idx)
    if (p[idx] != p_ref[idx] || s[idx] != s_ref[idx]) return fail("the write differs from the loop", idx);
  return 0;
}

int read_as_a_loop(const MemorySizes& z, bool outer) {
  std::mt19937 gen(4);
  const size_t full = z.batch * z.m * z.n;
  const std::vector<double> s = randoms(full, gen), v = randoms(full, gen);
  const std::vector<double> hq = randoms(z.batch * z.m * z.h, gen), w2 = randoms(z.batch * z.n * z.h, gen);
  std::vector<double> out(full, 0.0), params = randoms(full, gen), ref = outer ? params : out;
  const double a = 0.95, c = 0.2, lr = 0.01;
  Read<double> read{s.data(), v.data(), outer ? nullptr : out.data(), {}, 0, z.n, a, c, lr};
  for (int64_t b0 = 0; b0 < z.batch; b0 += kMaxMatrices) {   // as dmgd_read launches it
    const int64_t count = z.batch - b0 < kMaxMatrices ? z.batch - b0 : kMaxMatrices;
    read.b0 = b0;
    for (int64_t k = 0; k < count; ++k) read.params[k] = params.data() + (b0 + k) * z.m * z.n;
    run_on_host(hq.data(), w2.data(), z, b0, count, read);
  }
  for (int64_t b = 0; b < z.batch; ++b)
    for (int64_t i = 0; i < z.m; ++i)
      for (int64_t j = 0; j < z.n; ++j) {
        const int64_t idx = (b * z.m + i) * z.n + j;
        double d = a * (s[idx] + product(hq, w2, z, b, i, j));
        d += c * v[idx];
        if (outer) ref[idx] -= lr * d;
        else ref[idx] = d;
      }
  const std::vector<double>& got = outer ? params : out;
  for (size_t idx = 0; idx < full; ++idx)
    if (got[idx] != ref[idx]) return fail(outer ? "the read's outer step differs from the loop" : "the read differs", idx);
  return 0;
}

}  // namespace
}  // namespace deepopt_cuda

int main() {
  using deepopt_cuda::MemorySizes;
  const MemorySizes odd{3, 37, 300, 20}, many{70, 5, 7, 3}, exact{2, 32, 256, 16};
  int failures = 0;
  for (const MemorySizes& z : {odd, many, exact})
    failures += deepopt_cuda::write_as_a_loop(z) + deepopt_cuda::read_as_a_loop(z, false) +
                deepopt_cuda::read_as_a_loop(z, true);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
