// DMGD's deep memory (docs/math.md §5) for one matrix, on the CPU: the write and read as passes
// over the matrix view's rows (their norms, then the write, then the read) instead of ~40 array
// ops over a whole bucket. Plain C++ (no torch, no XLA): torch_backend/csrc/deep_memory.cpp
// serves it to torch as an op, jax_backend/csrc/deep_memory_ffi.cpp to XLA as a custom call.
//
// Why a kernel of its own. Each of the memory's seven products multiplies an m×n matrix by a
// thin n×h or m×h one (h = 16 by default). Through an array library each is a batched matmul
// over the whole bucket, and each element-wise step between them another pass: every
// full-size operand streams through the caches a dozen times a step. Here the rows of a
// matrix go by in blocks that stay in the L1/L2 cache, and every product and element-wise
// step that needs a block runs while it is there (docs/math.md §5, "Cost", says why three
// visits of the rows are the least there can be):
//
//   pass 1 (the write), per block of rows:
//     Z = (K W₁ᵀ) ⊙ r,  νH = ν σ(Z),  P = S − V + (νH) W₂ᵀ (l2; dot: P = V, no product),
//     S ← αS − ηP (dot: αS + ηV),  back = σ'(Z) ⊙ (P W₂) ⊙ r/d₁,
//     and the sums  Gw₂ += Pᵀ (νH),  Gw₁ᵀ += Kᵀ back,  ‖νH‖² += ...
//   then θ's write:  W₁ ← W₁ − (sign / 1.21m) Gw₁,  W₂ ← αW₂ − sign Gw₂ / d₂;
//   pass 2 (the read), per block of rows:
//     D = S + ν σ((G W₁ᵀ) ⊙ r) W₂ᵀ,  D̃ = αD + ηV (Nesterov), and the previous key Ĝ = r ⊙ G;
//     where the read-out is the identity, the outer step W ← W − γ D̃ too (D̃ never stored).
//
// with r the rows' 1/max(‖G row‖, ε) and d₁, d₂, sign as torch_backend/_deep_memory.py's
// fused_kernel defines them. The m×n operands are stored either as the view's rows (torch's
// m×n) or as its columns (optax's (in, out) kernels: the view's transpose, n×m); see Layout.
// Sums are kept in double; element arithmetic is in the operands' type. The products are
// register-tiled loops on the compiler's vector types (8 floats or 4 doubles per vector), and
// σ's exponential in float is a polynomial on those vectors (Cody–Waite reduction, the degree-5
// polynomial of the Cephes library, a few ulp), so results equal the array libraries' within
// float rounding, not bit for bit.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

// The loops below run a few to a few hundred times each (a tile's 16 sums, a block's rows), so
// GCC's unrolling of them pays: 2–3% of the kernel's time at --quick's shapes, alternated
// (benchmarks/README.md, "Seventeenth round"). For this header only; popped at its end.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("unroll-loops")
#endif

namespace deepopt_memory {

typedef float f8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));

// The same vectors at any address a T may have (unaligned loads and stores). Like GCC's vector
// types, they alias their element type (so their stores leave pointers to it in registers).
typedef float f8u __attribute__((vector_size(32), aligned(4)));
typedef double d4u __attribute__((vector_size(32), aligned(8)));

template <typename T> struct Vec;
template <> struct Vec<float> { using type = f8; using unaligned = f8u; static constexpr int kLanes = 8; };
template <> struct Vec<double> { using type = d4; using unaligned = d4u; static constexpr int kLanes = 4; };

template <typename T> using V = typename Vec<T>::type;
template <typename T> constexpr int kLanes = Vec<T>::kLanes;

template <typename T> inline V<T> load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
}
template <typename T> inline void store(T* p, V<T> v) { *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v; }
inline f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
inline d4 splat(double x) { return d4{x, x, x, x}; }

// Keeps a loaded vector in a register: left to itself, the compiler folds the load into every
// multiply-add that reads it (one load per use), and the tiles below become bound by loads.
template <typename T> inline void in_register(V<T>& v) {
#if defined(__x86_64__)
  __asm__("" : "+x"(v));
#endif
}

constexpr int kRows = 6;   // rows of a product's register tile (× 2 vectors of columns: 12 sums)

// out[R×hp] = X[R×n] · W[n×hp]   (X's element (r, i) at x[at(r, i)] of its layout L; W row-major, hp a
// multiple of the lanes). The tile: kRows rows × NV vectors, accumulated over the n terms in registers.
template <typename T, int RB, int NV, typename L>
inline void tile_a(const T* x, L lay, int64_t n, const T* w, int64_t hp, int64_t c0, T* out) {
  V<T> acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = V<T>{};
  for (int64_t i = 0; i < n; ++i) {
    V<T> wv[NV];
    for (int c = 0; c < NV; ++c) {
      wv[c] = load(w + i * hp + c0 + c * kLanes<T>);
      in_register<T>(wv[c]);
    }
    for (int r = 0; r < RB; ++r) {
      const V<T> xv = splat(x[lay.at(r, i)]);
      for (int c = 0; c < NV; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) store(out + r * hp + c0 + c * kLanes<T>, acc[r][c]);
}

template <typename T, int RB, typename L>
inline void rows_a(const T* x, L lay, int64_t n, const T* w, int64_t hp, T* out) {
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes<T> <= hp; c0 += 2 * kLanes<T>) tile_a<T, RB, 2>(x, lay, n, w, hp, c0, out);
  for (; c0 < hp; c0 += kLanes<T>) tile_a<T, RB, 1>(x, lay, n, w, hp, c0, out);
}

template <typename T, typename L>
void product_a(const T* x, L lay, int64_t rows, int64_t n, const T* w, int64_t hp, T* out) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) rows_a<T, kRows>(x + lay.at(r, 0), lay, n, w, hp, out + r * hp);
  for (; r < rows; ++r) rows_a<T, 1>(x + lay.at(r, 0), lay, n, w, hp, out + r * hp);
}

// Y[R×hp] · Wt[hp×n], each product handed to the epilogue ``epi(row, column, value)`` with
// ``value`` a vector of the lanes from that column on (or one number, for the last n mod lanes
// columns), which combines it with the block's other operands and stores the result.
template <typename T, int RB, int NV, typename Epi>
inline void tile_b(const T* y, int64_t hp, const T* wt, int64_t n, int64_t r0, int64_t c0, const Epi& epi) {
  V<T> acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = V<T>{};
  for (int64_t j = 0; j < hp; ++j) {
    V<T> wv[NV];
    for (int c = 0; c < NV; ++c) {
      wv[c] = load(wt + j * n + c0 + c * kLanes<T>);
      in_register<T>(wv[c]);
    }
    for (int r = 0; r < RB; ++r) {
      const V<T> yv = splat(y[r * hp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] += yv * wv[c];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) epi(r0 + r, c0 + c * kLanes<T>, acc[r][c]);
}

template <typename T, int RB, typename Epi>
inline void rows_b(const T* y, int64_t hp, const T* wt, int64_t n, int64_t r0, const Epi& epi) {
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes<T> <= n; c0 += 2 * kLanes<T>) tile_b<T, RB, 2>(y, hp, wt, n, r0, c0, epi);
  for (; c0 + kLanes<T> <= n; c0 += kLanes<T>) tile_b<T, RB, 1>(y, hp, wt, n, r0, c0, epi);
  for (; c0 < n; ++c0)
    for (int r = 0; r < RB; ++r) {
      T sum = 0;
      for (int64_t j = 0; j < hp; ++j) sum += y[r * hp + j] * wt[j * n + c0];
      epi(r0 + r, c0, sum);
    }
}

template <typename T, typename Epi>
void product_b(const T* y, int64_t rows, int64_t hp, const T* wt, int64_t n, const Epi& epi) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) rows_b<T, kRows>(y + r * hp, hp, wt, n, r, epi);
  for (; r < rows; ++r) rows_b<T, 1>(y + r * hp, hp, wt, n, r, epi);
}

// A vector of the lanes at p, or the one number at p: what an epilogue reads next to its value.
template <typename X, typename T> inline X at(const T* p) {
  if constexpr (std::is_same_v<X, T>) return *p;
  else return load(p);
}
template <typename X, typename T> inline void put(T* p, X x) {
  if constexpr (std::is_same_v<X, T>) *p = x;
  else store(p, x);
}

// out[n×hp] += X[R×n]ᵀ · Y[R×hp]   (X in its layout L): out's rows kRows at a time, in
// registers over the R terms.
template <typename T, int IB, int NV, typename L>
inline void tile_c(const T* x, L lay, int64_t rows, const T* y, int64_t hp, int64_t i0, int64_t c0, T* out) {
  V<T> acc[IB][NV];
  for (int i = 0; i < IB; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = load(out + (i0 + i) * hp + c0 + c * kLanes<T>);
  for (int64_t r = 0; r < rows; ++r) {
    V<T> yv[NV];
    for (int c = 0; c < NV; ++c) {
      yv[c] = load(y + r * hp + c0 + c * kLanes<T>);
      in_register<T>(yv[c]);
    }
    for (int i = 0; i < IB; ++i) {
      const V<T> xv = splat(x[lay.at(r, i0 + i)]);
      for (int c = 0; c < NV; ++c) acc[i][c] += xv * yv[c];
    }
  }
  for (int i = 0; i < IB; ++i)
    for (int c = 0; c < NV; ++c) store(out + (i0 + i) * hp + c0 + c * kLanes<T>, acc[i][c]);
}

template <typename T, int IB, typename L>
inline void cols_c(const T* x, L lay, int64_t rows, const T* y, int64_t hp, int64_t i0, T* out) {
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes<T> <= hp; c0 += 2 * kLanes<T>) tile_c<T, IB, 2>(x, lay, rows, y, hp, i0, c0, out);
  for (; c0 < hp; c0 += kLanes<T>) tile_c<T, IB, 1>(x, lay, rows, y, hp, i0, c0, out);
}

template <typename T, typename L>
void product_c(const T* x, L lay, int64_t rows, int64_t n, const T* y, int64_t hp, T* out) {
  int64_t i = 0;
  for (; i + kRows <= n; i += kRows) cols_c<T, kRows>(x, lay, rows, y, hp, i, out);
  for (; i < n; ++i) cols_c<T, 1>(x, lay, rows, y, hp, i, out);
}

// σ(z) = 1/(1 + e^(−z)) and the SiLU ν z σ(z) (ν H) of count pre-activations, the squares of
// ν H summed into sq. In float, e^x on 8 lanes at once: x clamped to [-87.3, 88.3] (the result
// stays finite and normal), k = round(x / ln 2), x − k ln 2 in two parts (Cody–Waite), Cephes'
// degree-5 polynomial, times 2^k made from its bits; count is a multiple of the lanes (h padded).
typedef int32_t i8 __attribute__((vector_size(32)));

inline f8 exp_of(f8 x) {
  const f8 lo = splat(-87.3f), hi = splat(88.3f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f8 t = x * 1.44269504088896341f + 0.5f;
  f8 k = __builtin_convertvector(__builtin_convertvector(t, i8), f8);   // toward zero, then floor:
  k += __builtin_convertvector(k > t, f8);                              // −1 where it rounded up
  const f8 r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i8 bits = (__builtin_convertvector(k, i8) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline void silu_rows(const float* z, float* sg, float* hn, int64_t count, float nu, double& sq) {
  f8 sum = {};
  for (int64_t i = 0; i < count; i += 8) {
    const f8 zv = load(z + i);
    const f8 s = 1.0f / (1.0f + exp_of(-zv));
    store(sg + i, s);
    const f8 h = nu * (zv * s);
    store(hn + i, h);
    sum += h * h;
  }
  for (int c = 0; c < 8; ++c) sq += sum[c];
}

inline void silu_rows(const double* z, double* sg, double* hn, int64_t count, double nu, double& sq) {
  for (int64_t i = 0; i < count; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-z[i]));
    sg[i] = s;
    hn[i] = nu * (z[i] * s);
    sq += hn[i] * hn[i];
  }
}

struct Options {
  double alpha, eta, decay, eps, slope_sq;
  bool dot, nesterov, previous, values;
};

// Where element (r, i) of an m×n matrix view lives: at r·ld + i in the rows' layout (torch's
// m×n, ld = n), or at r + i·ld in the columns' one (optax's (in, out) kernels, the view's
// transpose as stored: n×m, ld = m). A block of rows is a block of columns in the latter.
template <bool Transposed> struct Layout {
  int64_t ld;
  int64_t at(int64_t r, int64_t i) const { return Transposed ? r + i * ld : r * ld + i; }
};

// Row block: as many rows as keep one block of an m×n operand within ~64 KB (in L2: a block's
// S, V and P are read by several products each), a multiple of the product tile's rows. (32 KB,
// one L1, took 1–2% longer at --quick's shapes: the sums of Gw₂ and Gw₁ᵀ over a block's rows are
// loaded and stored once per block, so taller blocks make fewer of those round trips.) In the
// columns' layout a block's rows are the vectors of the read's product, so they are a multiple of
// its 2 vectors too (a 16-row block of a long column reads a cache line per element it uses).
template <bool Transposed>
int64_t block_rows(int64_t n, size_t item, int lanes) {
  const int64_t unit = Transposed ? std::lcm<int64_t>(kRows, 2 * lanes) : kRows;
  const int64_t rows = static_cast<int64_t>(65536 / (static_cast<size_t>(n) * item));
  return std::clamp<int64_t>(rows / unit * unit, unit, 256 / unit * unit);
}
// Σ x² over count numbers: vector sums in T (four, for the adders' latency), added up in double.
template <typename T>
double sum_squares(const T* x, int64_t count) {
  constexpr int L = kLanes<T>;
  V<T> acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * L <= count; i += 4 * L)
    for (int k = 0; k < 4; ++k) {
      const V<T> xv = load(x + i + k * L);
      acc[k] += xv * xv;
    }
  double sum = 0;
  for (int k = 0; k < 4; ++k)
    for (int c = 0; c < L; ++c) sum += double(acc[k][c]);
  for (; i < count; ++i) sum += double(x[i]) * double(x[i]);
  return sum;
}

// Scratch memory left uninitialised (every entry is written before it is read).
template <typename T> std::unique_ptr<T[]> scratch(int64_t count) { return std::unique_ptr<T[]>(new T[count]); }

// θ as the products read it, h padded to hp with zero columns: W₁ᵀ (n×hp); W₂ (n×hp) and W₂ᵀ (hp×n).
template <typename T>
void pack_w1(const T* w1, int64_t h, int64_t n, int64_t hp, T* w1t) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < h; ++j) w1t[i * hp + j] = w1[j * n + i];
    for (int64_t j = h; j < hp; ++j) w1t[i * hp + j] = T(0);
  }
}
template <typename T>
void pack_w2(const T* w2, int64_t h, int64_t n, int64_t hp, T* w2p, T* w2t) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < h; ++j) w2p[i * hp + j] = w2[i * h + j];
    for (int64_t j = h; j < hp; ++j) w2p[i * hp + j] = T(0);
  }
  for (int64_t j = 0; j < hp; ++j)
    for (int64_t i = 0; i < n; ++i) w2t[j * n + i] = w2p[i * hp + j];
}


// Visits the elements of a block of `rows` rows of an m×n view in the order they are stored:
// f(offset) for each, the offset from the block's first element.
template <bool Transposed, typename F>
inline void each_element(Layout<Transposed> lay, int64_t rows, int64_t n, const F& f) {
  if constexpr (Transposed) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < rows; ++r) f(i * lay.ld + r);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < n; ++i) f(r * lay.ld + i);
  }
}

// The read's product F = (νH) W₂ᵀ of a block (rows×n), each product handed to
// epi(offset, block offset, value): its offset in the m×n operands (layout lay) and in a block
// scratch of the same layout, rows ldb apart (rows' layout) or columns (columns' layout), with
// value a vector of the stored order's lanes there, or one number. In the rows' layout the
// vectors run along a row (hn · W₂ᵀ); in the columns' one along a column, from W₂ · (νH)ᵀ, so
// that every epilogue reads and writes whole vectors (hnt: hp×rows scratch).
template <typename T, bool Transposed, typename Epi>
void read_product(Layout<Transposed> lay, const T* hn, T* hnt, int64_t rows, int64_t hp, const T* w2p,
                  const T* w2t, int64_t n, int64_t ldb, const Epi& epi) {
  if constexpr (Transposed) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < hp; ++j) hnt[j * rows + r] = hn[r * hp + j];
    product_b(w2p, n, hp, hnt, rows, [&](int64_t c, int64_t r, auto f) { epi(c * lay.ld + r, c * ldb + r, f); });
  } else {
    product_b(hn, rows, hp, w2t, n, [&](int64_t r, int64_t c, auto f) { epi(r * lay.ld + c, r * ldb + c, f); });
  }
}

// Asks for the cache line at x + k + ahead: an epilogue of read_product, reading x at k, asks for
// the same element of the next strip of its product's tiles (ahead = kRows·ld: kRows rows further
// in the rows' layout, kRows columns in the columns'). A strip reads its kRows rows (columns) as
// as many short runs taken in turn, a pattern the hardware's prefetchers do not follow: without
// this, the loads of S and W, which come from memory, stalled the epilogues (12–15% of the
// kernel's time at --quick's shapes, benchmarks/README.md, "Seventeenth round"). The address is
// made as an integer: past a block's last strip it lies beyond the operand, where a prefetch is
// harmless but pointer arithmetic would not be defined.
template <typename T> inline void fetch(const T* x, int64_t k, int64_t ahead) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x + k) + ahead * sizeof(T)));
}

// ‖row‖² of each of the m rows of an m×n view, into sq (summed in double).
template <typename T, bool Transposed>
void row_squares(Layout<Transposed> lay, const T* g, int64_t m, int64_t n, double* sq) {
  if constexpr (Transposed) {
    for (int64_t r = 0; r < m; ++r) sq[r] = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T* col = g + i * lay.ld;
      for (int64_t r = 0; r < m; ++r) sq[r] += double(col[r]) * double(col[r]);
    }
  } else {
    for (int64_t r = 0; r < m; ++r) sq[r] = sum_squares(g + r * lay.ld, n);
  }
}

// The write and read of one matrix (see the file's header), its m×n view stored as the layout
// says (rows: m×n; columns: n×m). s, prev, out, g, v: the view's m×n numbers (v == g where
// V = G); w1: h×n; w2: n×h; nu: one number. With a parameter (m×n, the same layout), the read goes
// into the outer step W ← W − γ D̃ (γ = lr) instead of into out.
template <typename T, bool Transposed>
void one_matrix(const Options& o, int64_t m, int64_t n, int64_t h, T* s, T* w1, T* w2, T* nu_p, const T* g,
                const T* v, T* prev, T* out, T* param, double lr) {
  const Layout<Transposed> lay{Transposed ? m : n};
  const int64_t hp = (h + kLanes<T> - 1) / kLanes<T> * kLanes<T>;   // h padded with zero columns
  const int64_t rb = std::min(block_rows<Transposed>(n, sizeof(T), kLanes<T>), m);
  // A block scratch (P) in the operands' layout, rows (or columns) rb apart.
  const Layout<Transposed> blay{Transposed ? rb : n};
  auto rinv = scratch<T>(m);
  // ‖G row‖, ‖V‖_F → ν = max(βν, ‖V‖_F/√m, ε), r = 1/max(‖row‖, ε).
  double v_sq = 0;
  {
    auto sq = scratch<double>(m);
    row_squares(lay, g, m, n, sq.get());
    for (int64_t i = 0; i < m; ++i) {
      rinv[i] = T(1) / T(std::max(std::sqrt(sq[i]), o.eps));
      v_sq += sq[i];
    }
  }
  if (o.values) v_sq = sum_squares(v, m * n);
  const double nu = std::max(std::max(double(*nu_p) * o.decay, std::sqrt(v_sq) / std::sqrt(double(m))), o.eps);
  *nu_p = T(nu);
  const T nu_t = T(nu), alpha = T(o.alpha), eta = T(o.eta);

  auto w1t = scratch<T>(n * hp), w2p = scratch<T>(n * hp), w2t = scratch<T>(hp * n);
  pack_w1(w1, h, n, hp, w1t.get());
  pack_w2(w2, h, n, hp, w2p.get(), w2t.get());
  const double m_eta = o.eta != 0 ? double(m) / o.eta : INFINITY;   // η = 0: θ stays
  const double d1 = (sum_squares(w2, n * h) + m_eta / (o.slope_sq * double(m))) * nu;
  const T sign = o.dot ? T(-1) : T(1);

  std::vector<T> gw1t(n * hp, T(0)), gw2(n * hp, T(0));             // θ's gradients, summed over blocks
  auto z = scratch<T>(rb * hp), sg = scratch<T>(rb * hp), hn = scratch<T>(rb * hp), y = scratch<T>(rb * hp);
  auto hnt = scratch<T>(Transposed ? rb * hp : 0);
  auto blk = scratch<T>(o.dot ? 0 : rb * n);
  double hn_sq = 0;
  for (int64_t r0 = 0; r0 < m; r0 += rb) {                           // pass 1: the write
    const int64_t rows = std::min(rb, m - r0);
    const int64_t off = lay.at(r0, 0);
    const T* gb = g + off;
    const T* vb = v + off;
    const T* kb = o.previous ? prev + off : gb;
    T* sb = s + off;
    product_a(kb, lay, rows, n, w1t.get(), hp, z.get());             // Z = K W₁ᵀ
    if (!o.previous)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < hp; ++j) z[r * hp + j] *= rinv[r0 + r];   // ⊙ r: Ĝ's product
    silu_rows(z.get(), sg.get(), hn.get(), rows * hp, nu_t, hn_sq);   // ν H
    const int64_t ahead = kRows * lay.ld;                            // one strip on (see fetch)
    const T* p;
    if (o.dot) {                                                      // P = V: E = −ηV
      p = vb;
      each_element(lay, rows, n, [&](int64_t k) { sb[k] = alpha * sb[k] + eta * vb[k]; });
    } else {                                                          // P = S − V + ν H W₂ᵀ, S ← αS − ηP
      T* pb = blk.get();
      read_product(lay, hn.get(), hnt.get(), rows, hp, w2p.get(), w2t.get(), n, blay.ld,
                   [sb, vb, pb, alpha, eta, ahead, values = o.values](int64_t k, int64_t kp, auto f) {
                     using X = decltype(f);
                     fetch(sb, k, ahead);
                     if (values) fetch(vb, k, ahead);
                     const X sk = at<X>(sb + k);
                     const X pk = (sk - at<X>(vb + k)) + f;
                     put(pb + kp, pk);
                     put(sb + k, alpha * sk - eta * pk);
                   });
      p = pb;
    }
    const Layout<Transposed> play = o.dot ? lay : blay;
    product_a(p, play, rows, n, w2p.get(), hp, y.get());             // P W₂
    for (int64_t r = 0; r < rows; ++r) {                              // σ'(Z) ⊙ P W₂ ⊙ r/d₁
      const T scale = T((o.previous ? 1.0 : double(rinv[r0 + r])) / d1);
      for (int64_t j = 0; j < hp; ++j) {
        const int64_t k = r * hp + j;
        const T sk = sg[k];
        y[k] = y[k] * (sk * (T(1) + z[k] * (T(1) - sk))) * scale;
      }
    }
    product_c(p, play, rows, n, hn.get(), hp, gw2.data());           // Gw₂ += Pᵀ (νH)
    product_c(kb, lay, rows, n, y.get(), hp, gw1t.data());           // Gw₁ᵀ += Kᵀ back
  }
  // θ's write: W₁ ← W₁ − sign/(1.21 m) Gw₁ (no retention), W₂ ← αW₂ − sign Gw₂ / d₂.
  const double d2 = hn_sq + nu * nu * m_eta;
  const T c1 = T(-double(sign) / (o.slope_sq * double(m)));
  for (int64_t j = 0; j < h; ++j)
    for (int64_t i = 0; i < n; ++i) w1[j * n + i] += c1 * gw1t[i * hp + j];
  const T c2 = sign * T(1.0 / d2);
  const T keep = T(o.alpha);                                          // (α = 1: x·1 = x exactly)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < h; ++j) w2[i * h + j] = keep * w2[i * h + j] - c2 * gw2[i * hp + j];
  pack_w1(w1, h, n, hp, w1t.get());
  pack_w2(w2, h, n, hp, w2p.get(), w2t.get());
  for (int64_t r0 = 0; r0 < m; r0 += rb) {                           // pass 2: the read
    const int64_t rows = std::min(rb, m - r0);
    const int64_t off = lay.at(r0, 0);
    const T* gb = g + off;
    const T* vb = v + off;
    const T* sb = s + off;
    T* ob = (param ? param : out) + off;
    const int64_t ahead = kRows * lay.ld;
    const auto emit = [ob, param, step = T(-lr), ahead](int64_t k, auto d) {   // D̃, or W − γ D̃
      using X = decltype(d);
      fetch(ob, k, ahead);
      if (param) put(ob + k, at<X>(ob + k) + step * d);
      else put(ob + k, d);
    };
    product_a(gb, lay, rows, n, w1t.get(), hp, z.get());             // Q W₁ᵀ, Q = Ĝ
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < hp; ++j) z[r * hp + j] *= rinv[r0 + r];
    double unused = 0;
    silu_rows(z.get(), sg.get(), hn.get(), rows * hp, nu_t, unused);   // ν σ(Q W₁ᵀ)
    if (o.nesterov)                                                   // D̃ = α(S + ν σ(Q W₁ᵀ) W₂ᵀ) + ηV
      read_product(lay, hn.get(), hnt.get(), rows, hp, w2p.get(), w2t.get(), n, blay.ld,
                   [&](int64_t k, int64_t, auto f) {
                     using X = decltype(f);
                     fetch(sb, k, ahead);
                     if (o.values) fetch(vb, k, ahead);
                     emit(k, alpha * (at<X>(sb + k) + f) + eta * at<X>(vb + k));
                   });
    else                                                              // D = S + ν σ(Q W₁ᵀ) W₂ᵀ
      read_product(lay, hn.get(), hnt.get(), rows, hp, w2p.get(), w2t.get(), n, blay.ld,
                   [&](int64_t k, int64_t, auto f) {
                     using X = decltype(f);
                     fetch(sb, k, ahead);
                     emit(k, at<X>(sb + k) + f);
                   });
    if (o.previous) {                                                 // Ĝ, the next step's key
      T* pb = prev + off;
      if constexpr (Transposed) {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < rows; ++r) pb[i * lay.ld + r] = gb[i * lay.ld + r] * rinv[r0 + r];
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < n; ++j) pb[r * n + j] = gb[r * n + j] * rinv[r0 + r];
      }
    }
  }
}

}  // namespace deepopt_memory

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
