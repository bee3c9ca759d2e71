// DPC-kNN clustering on CPU: density, delta, centre selection, assignment.
//
// Each image is processed on its own, streaming over row blocks of an
// approximate squared-distance matrix obtained from a GEMM on mean-centred
// features (||a||^2 + ||b||^2 - 2 a.b). The GEMM only proposes candidates:
// every distance that decides a result (the k nearest, the nearest denser
// token, a row's farthest token, the nearest centre) is recomputed exactly
// from differences, like the reference, over all candidates within the
// GEMM's error bound of the cut-off. So a token's distance to itself and to
// its duplicates is exactly 0, ties stay ties, and results do not depend on
// the BLAS or the thread count. Memory per image is one row block plus O(N)
// per thread; when the whole N x N block fits, it is computed once (from the
// upper triangle when there are many channels) and shared by the density,
// delta and assignment passes, and with many channels a second N x N table
// keeps the exact distances so that each pair's is computed once.
//
// Features of extreme magnitude are scaled by a power of two per image (see
// image_scale), and delta follows SeTok's column-max rule, capped for every
// token by the least farthest distance among the tokens not denser than it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "../setok.h"

namespace setok {
namespace {

// Elements of one approximate-distance block (16 MiB of float32).
constexpr int64_t kBlockElements = int64_t(1) << 22;
// Row band of the symmetric GEMM: large enough for BLAS efficiency.
constexpr int64_t kBand = 96;
// Below this many channels the whole GEMM costs less than mirroring half of it.
constexpr int64_t kSymmetricMinChannels = 256;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SETOK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SETOK_SIMD_CLONES
#endif

// ||a - b||^2 summed lane-wise (element c goes to lane c % L), then the lanes
// by a fixed tree: the order depends on C only, never on alignment or on
// which pair is computed, so equal inputs give bit-equal distances.
template <typename T, int L>
__attribute__((always_inline)) inline T sqdist_lanes(const T* a, const T* b, int64_t C) {
  T acc[L] = {};
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    for (int l = 0; l < L; ++l) {
      const T d = a[c + l] - b[c + l];
      acc[l] += d * d;
    }
  }
  for (int l = 0; c + l < C; ++l) {
    const T d = a[c + l] - b[c + l];
    acc[l] += d * d;
  }
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

SETOK_SIMD_CLONES float sqdist(const float* a, const float* b, int64_t C) {
  return sqdist_lanes<float, 64>(a, b, C);
}

SETOK_SIMD_CLONES double sqdist(const double* a, const double* b, int64_t C) {
  return sqdist_lanes<double, 32>(a, b, C);
}

// a.b in the same fixed lane order.
template <typename T, int L>
__attribute__((always_inline)) inline T dot_lanes(const T* a, const T* b, int64_t C) {
  T acc[L] = {};
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    for (int l = 0; l < L; ++l) acc[l] += a[c + l] * b[c + l];
  }
  for (int l = 0; c + l < C; ++l) acc[l] += a[c + l] * b[c + l];
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

SETOK_SIMD_CLONES float dot(const float* a, const float* b, int64_t C) {
  return dot_lanes<float, 64>(a, b, C);
}

SETOK_SIMD_CLONES double dot(const double* a, const double* b, int64_t C) {
  return dot_lanes<double, 32>(a, b, C);
}

// NaN sorts after every number (a strict weak order even with NaN).
template <typename T>
__attribute__((always_inline)) inline bool nan_last_less(T a, T b) {
  return std::isnan(b) ? !std::isnan(a) : a < b;
}

template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

inline const uint8_t* bytes(const bool* valid) {
  static_assert(sizeof(bool) == 1, "the mask is read as bytes");
  return reinterpret_cast<const uint8_t*>(valid);
}

// The highest set bit of v != 0.
template <typename U>
inline int top_bit(U v) {
  return sizeof(U) == 4 ? 31 - __builtin_clz(static_cast<uint32_t>(v)) : 63 - __builtin_clzll(static_cast<uint64_t>(v));
}

// The kk-th smallest of n non-negative floats given by their bit patterns
// (which order like the values), rounded up to the next value whose low
// `round_bits` bits are all ones (0: exact) but never above the largest:
// a bitwise binary search whose passes are branch-free counts, far cheaper
// than a comparison-based selection. The bits every value shares (those
// above the highest bit where the least and the largest differ; a row's
// distances share their sign and most exponent bits) take no pass.
template <typename U>
__attribute__((always_inline)) inline U kth_smallest_bits(const U* u, int64_t n, int64_t kk, int round_bits) {
  U lo = ~U(0), hi = 0;
  for (int64_t j = 0; j < n; ++j) {
    lo = std::min(lo, u[j]);
    hi = std::max(hi, u[j]);
  }
  if (lo == hi) return lo;
  const int top = top_bit<U>(lo ^ hi);
  U prefix = lo & ~((U(2) << top) - 1);  // U(2) << top wraps to 0 for the sign bit: no shared bits
  for (int b = top; b >= round_bits; --b) {
    const U t = prefix | (U(1) << b);
    uint32_t below = 0;
    for (int64_t j = 0; j < n; ++j) below += u[j] < t;
    if (below < static_cast<uint64_t>(kk)) prefix = t;
  }
  return std::min<U>(prefix | ((U(1) << round_bits) - 1), hi);
}

SETOK_SIMD_CLONES uint32_t kth_smallest(const uint32_t* u, int64_t n, int64_t kk, int round_bits) {
  return kth_smallest_bits(u, n, kk, round_bits);
}

SETOK_SIMD_CLONES uint64_t kth_smallest(const uint64_t* u, int64_t n, int64_t kk, int round_bits) {
  return kth_smallest_bits(u, n, kk, round_bits);
}

// The positions (ascending) and values of the u[j] <= cut with valid[j]: a
// branch-free compaction (every element is written, the count advances for
// the kept ones), so its cost does not depend on how many pass. Returns
// their number; index and kept hold N elements.
template <typename U>
__attribute__((always_inline)) inline int64_t compact_at_most_impl(const U* u, const uint8_t* valid, int64_t N, U cut,
                                                                   int64_t* index, U* kept) {
  int64_t n = 0;
  for (int64_t j = 0; j < N; ++j) {
    index[n] = j;
    kept[n] = u[j];
    n += static_cast<int64_t>(u[j] <= cut) & valid[j];
  }
  return n;
}

SETOK_SIMD_CLONES int64_t compact_at_most(const uint32_t* u, const uint8_t* valid, int64_t N, uint32_t cut,
                                          int64_t* index, uint32_t* kept) {
  return compact_at_most_impl(u, valid, N, cut, index, kept);
}

SETOK_SIMD_CLONES int64_t compact_at_most(const uint64_t* u, const uint8_t* valid, int64_t N, uint64_t cut,
                                          int64_t* index, uint64_t* kept) {
  return compact_at_most_impl(u, valid, N, cut, index, kept);
}

// Chunks of approximate distances tested at once by chunk_hits.
constexpr int64_t kChunk = 64;

// hits[c] = whether some u of chunk c (elements [c kChunk, (c + 1) kChunk))
// is <= below or >= above: one vectorized pass that lets the scans for
// candidates skip the chunks without any.
template <typename U>
__attribute__((always_inline)) inline void chunk_hits_impl(const U* u, int64_t N, U below, U above, uint8_t* hits) {
  for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
    const int64_t n = std::min(kChunk, N - c0);
    U hit = 0;
    for (int64_t j = 0; j < n; ++j) hit |= U(u[c0 + j] <= below) | U(u[c0 + j] >= above);
    hits[c0 / kChunk] = hit != 0;
  }
}

SETOK_SIMD_CLONES void chunk_hits(const uint32_t* u, int64_t N, uint32_t below, uint32_t above, uint8_t* hits) {
  chunk_hits_impl(u, N, below, above, hits);
}

SETOK_SIMD_CLONES void chunk_hits(const uint64_t* u, int64_t N, uint64_t below, uint64_t above, uint8_t* hits) {
  chunk_hits_impl(u, N, below, above, hits);
}

// Calls fn(j) for every j whose u[j] is <= below or >= above (and for some others).
template <typename U, typename F>
inline void for_each_hit(const U* u, int64_t N, U below, U above, std::vector<uint8_t>& hits, F&& fn) {
  hits.resize((N + kChunk - 1) / kChunk);
  chunk_hits(u, N, below, above, hits.data());
  for (size_t c = 0; c < hits.size(); ++c) {
    if (!hits[c]) continue;
    const int64_t j1 = std::min<int64_t>(N, (c + 1) * kChunk);
    for (int64_t j = c * kChunk; j < j1; ++j) fn(j);
  }
}

template <typename T>
inline bits_t<T> to_bits(T v) {
  bits_t<T> u;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
inline T from_bits(bits_t<T> u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// The vectorizable loops below read the mask as bytes (0 or 1) and select
// with all-ones / all-zeros integer masks: GCC does not vectorize loads of bool.

// Approximate squared distances of one row as ordered bit patterns:
// max(n_i + n_j - 2 g_j, +0) (never -0, never NaN), +inf for masked tokens.
template <typename T>
__attribute__((always_inline)) inline void approx_bits_impl(const T* g, const T* norm, const uint8_t* valid, T ni,
                                                            int64_t N, bits_t<T>* out) {
  using U = bits_t<T>;
  const U inf = to_bits(std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < N; ++j) {
    const T a = ni + norm[j] - T(2) * g[j];
    const U real = U(0) - U(valid[j]);
    out[j] = (to_bits(a > T(0) ? a : T(0)) & real) | (inf & ~real);
  }
}

SETOK_SIMD_CLONES void approx_bits(const float* g, const float* norm, const uint8_t* valid, float ni, int64_t N,
                                   uint32_t* out) {
  approx_bits_impl(g, norm, valid, ni, N, out);
}

SETOK_SIMD_CLONES void approx_bits(const double* g, const double* norm, const uint8_t* valid, double ni, int64_t N,
                                   uint64_t* out) {
  approx_bits_impl(g, norm, valid, ni, N, out);
}

// out = x - mean; returns ||out||^2 summed lane-wise like sqdist.
template <typename T, int L>
__attribute__((always_inline)) inline T centre_row_impl(const T* x, const T* mean, T* out, int64_t C) {
  T acc[L] = {};
  int64_t c = 0;
  for (; c + L <= C; c += L) {  // whole blocks of lanes, then the tail: GCC vectorizes only that form
    for (int l = 0; l < L; ++l) {
      const T d = x[c + l] - mean[c + l];
      out[c + l] = d;
      acc[l] += d * d;
    }
  }
  for (int l = 0; c + l < C; ++l) {
    const T d = x[c + l] - mean[c + l];
    out[c + l] = d;
    acc[l] += d * d;
  }
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

SETOK_SIMD_CLONES float centre_row(const float* x, const float* mean, float* out, int64_t C) {
  return centre_row_impl<float, 64>(x, mean, out, C);
}

SETOK_SIMD_CLONES double centre_row(const double* x, const double* mean, double* out, int64_t C) {
  return centre_row_impl<double, 32>(x, mean, out, C);
}

// One image: exact rows, centred rows for the GEMM, and the GEMM's error bound.
template <typename T>
struct Image {
  at::Tensor xt;  // (N, C) in the accumulation dtype, divided by `scale`
  const T* x;
  const bool* valid;
  int64_t N, C;
  int64_t num_valid = 0;
  at::Tensor xc;  // (N, C) centred over the real tokens, masked rows 0
  const T* norm;  // (N,) squared norms of xc
  T norm_max = 0;
  T gamma;  // relative error bound of a GEMM dot product
  T sqrt_c;
  T scale;  // a power of two: distances are computed in units of it

  Image(const at::Tensor& xb, const at::Tensor& vb, const at::Tensor& xcb, const at::Tensor& normb, T scale_)
      : xt(xb), x(xb.data_ptr<T>()), valid(vb.data_ptr<bool>()), N(xb.size(0)), C(xb.size(1)), xc(xcb),
        norm(normb.data_ptr<T>()), scale(scale_) {
    for (int64_t i = 0; i < N; ++i) {
      num_valid += valid[i];
      if (valid[i]) norm_max = std::max(norm_max, norm[i]);
    }
    // a typical blocked-FMA dot product errs by ~sqrt(C) eps |a||b|; the
    // margin is 16x that, and a miss would only cost a rounding difference
    gamma = T(16) * std::sqrt(static_cast<T>(C)) * std::numeric_limits<T>::epsilon();
    sqrt_c = static_cast<T>(std::sqrt(static_cast<double>(C)));
  }

  // The scaled distance ||x_i - x_j|| / sqrt(C), exactly as the reference
  // (scaling by a power of two is exact, so bit for bit when it is 1).
  T dist(int64_t i, int64_t j) const {
    return std::sqrt(sqdist(x + i * C, x + j * C, C)) / sqrt_c * scale;
  }

  // dist(i, j), remembered for both (i, j) and (j, i) in `known` (N x N, -1
  // where not computed yet) when there is one: d(i, j) and d(j, i) are
  // bit-equal, so reusing them changes nothing but the time.
  T* known = nullptr;
  T dist_once(int64_t i, int64_t j) const {
    if (known == nullptr) return dist(i, j);
    T d = known[i * N + j];
    if (!(d >= T(0))) known[i * N + j] = known[j * N + i] = d = dist(i, j);
    return d;
  }

  T tol(int64_t i) const {
    return gamma * (norm[i] + norm_max) + std::numeric_limits<T>::min();
  }

  // Gram rows [r0, r1) x all tokens. The whole matrix (into `whole`, N x N)
  // is built, for many channels, from row bands of its upper triangle and
  // mirrored: half the GEMM work.
  at::Tensor gram(int64_t r0, int64_t r1, at::Tensor whole = {}) const {
    if (!whole.defined() || r0 != 0 || r1 != N) return at::mm(xc.slice(0, r0, r1), xc.t());
    if (C < kSymmetricMinChannels) return at::mm_out(whole, xc, xc.t());
    for (int64_t i0 = 0; i0 < N; i0 += kBand) {
      const int64_t i1 = std::min(N, i0 + kBand);
      auto band = whole.slice(0, i0, i1).slice(1, i0, N);
      at::mm_out(band, xc.slice(0, i0, i1), xc.slice(0, i0, N).t());
      whole.slice(0, i1, N).slice(1, i0, i1).copy_(band.slice(1, i1 - i0, N - i0).t());
    }
    return whole;
  }

  // Approximate squared distances of rows [r0, r1) to every token as ordered
  // bit patterns (see approx_bits), computed once and read by every pass:
  // the Gram block converted in place.
  at::Tensor approx(int64_t r0, int64_t r1, at::Tensor whole = {}) const {
    at::Tensor g = gram(r0, r1, whole);
    T* gp = g.template data_ptr<T>();
    at::parallel_for(r0, r1, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        T* row = gp + (i - r0) * N;
        approx_bits(row, norm, bytes(valid), norm[i], N, reinterpret_cast<bits_t<T>*>(row));
      }
    });
    return g;
  }

  int64_t rows_per_block() const {
    return std::max<int64_t>(1, std::min(N, kBlockElements / N));
  }
};

// Per-thread buffers of the row scans, reused across rows.
template <typename T>
struct RowScratch {
  std::vector<bits_t<T>> sample, bits;
  std::vector<int64_t> index;
  std::vector<T> exact, order;
};

// Every kSample-th approximate distance of a row estimates its kk-th smallest.
constexpr int64_t kSample = 8;

// density_i = exp(-mean of the kk smallest exact d^2 over real tokens);
// u: row i of the approximate distances (masked tokens +inf). The exact
// distances are computed for the candidates, the real tokens within the
// GEMM's error bound of the kk-th smallest approximate one.
template <typename T>
T knn_row(const Image<T>& im, int64_t i, const bits_t<T>* u, int64_t kk, RowScratch<T>& s) {
  using U = bits_t<T>;
  const T tol = im.tol(i);
  auto within = [&](U v) { return to_bits<T>(from_bits<T>(v) + tol); };
  s.index.resize(im.N);
  s.bits.resize(im.N);
  int64_t n = 0;  // s.index / s.bits [0, n): the real tokens with u <= cut
  auto collect = [&](U cut) { n = compact_at_most(u, bytes(im.valid), im.N, cut, s.index.data(), s.bits.data()); };
  // a cut from a strided sample usually keeps about 2 kk tokens, so the
  // selection below runs on those instead of the whole row; it is only an
  // estimate (checked below), so it is rounded to the top 12 significant bits
  const int64_t ns = im.N / kSample, ks = 2 * ((kk + kSample - 1) / kSample) + 2;
  U cut = ~U(0);
  if (ks < ns) {
    s.sample.resize(ns);
    for (int64_t t = 0; t < ns; ++t) s.sample[t] = u[t * kSample];
    cut = within(kth_smallest(s.sample.data(), ns, ks, std::numeric_limits<T>::digits - 12));
  }
  collect(cut);
  if (n < kk) collect(cut = ~U(0));
  // kth is the row's kk-th smallest whenever the kept tokens include kk
  U bound = within(kth_smallest(s.bits.data(), n, kk, 0));
  if (bound > cut) collect(cut = bound);  // candidates above the sampled cut
  s.exact.clear();
  for (int64_t t = 0; t < n; ++t) {
    if (s.bits[t] > bound) continue;
    const T d = im.dist_once(i, s.index[t]);
    s.exact.push_back(d * d);
  }
  // the candidates always include the kk nearest: sum those in index order
  // (the kk-th smallest value's equals by index as well), a canonical order
  // found without sorting
  auto less = [](T a, T b) { return nan_last_less(a, b); };
  s.order.assign(s.exact.begin(), s.exact.end());
  std::nth_element(s.order.begin(), s.order.begin() + (kk - 1), s.order.end(), less);
  const T kth_exact = s.order[kk - 1];
  int64_t below = 0;
  for (T e : s.exact) below += less(e, kth_exact);
  int64_t ties = kk - below;
  T total = 0;
  for (T e : s.exact) {
    if (less(e, kth_exact)) {
      total += e;
    } else if (ties > 0 && !less(kth_exact, e)) {
      total += e;
      --ties;
    }
  }
  return std::exp(-total / static_cast<T>(kk));
}

// Whether token j counts as denser than a token of density di whose ties
// are won by the tokens below index tie_below (0: ties never count).
template <typename T>
__attribute__((always_inline)) inline bool denser_than(const T* dens, int64_t j, T di, int64_t tie_below) {
  return j < tie_below ? dens[j] >= di : dens[j] > di;
}

// Over real tokens: the smallest approximate-distance bits among denser
// tokens (all ones if none) and the largest among all. Branch-free integer
// reductions, so they vectorize: one loop per side of tie_below.
template <typename T>
__attribute__((always_inline)) inline void row_extrema_impl(const bits_t<T>* u, const T* dens, T di, int64_t tie_below,
                                                            const uint8_t* valid, int64_t N, bits_t<T>* lo,
                                                            bits_t<T>* hi) {
  using U = bits_t<T>;
  // one pair of accumulators per loop (GCC vectorizes neither loop otherwise)
  U l0 = ~U(0), h0 = 0, l1 = ~U(0), h1 = 0;
  for (int64_t j = 0; j < tie_below; ++j) {
    const U real = U(0) - U(valid[j]);
    const U denser = dens[j] >= di ? ~U(0) : U(0);
    l0 = std::min(l0, u[j] | ~(real & denser));
    h0 = std::max(h0, u[j] & real);
  }
  for (int64_t j = tie_below; j < N; ++j) {
    const U real = U(0) - U(valid[j]);
    const U denser = dens[j] > di ? ~U(0) : U(0);
    l1 = std::min(l1, u[j] | ~(real & denser));
    h1 = std::max(h1, u[j] & real);
  }
  *lo = std::min(l0, l1);
  *hi = std::max(h0, h1);
}

SETOK_SIMD_CLONES void row_extrema(const uint32_t* u, const float* dens, float di, int64_t tie_below,
                                   const uint8_t* valid, int64_t N, uint32_t* lo, uint32_t* hi) {
  row_extrema_impl<float>(u, dens, di, tie_below, valid, N, lo, hi);
}

SETOK_SIMD_CLONES void row_extrema(const uint64_t* u, const double* dens, double di, int64_t tie_below,
                                   const uint8_t* valid, int64_t N, uint64_t* lo, uint64_t* hi) {
  row_extrema_impl<double>(u, dens, di, tie_below, valid, N, lo, hi);
}

// delta_i / parent_i over the denser real tokens (ties won by lower indices
// when tie_index), and rmax_i, the exact distance to the farthest real token.
template <typename T>
void delta_row(const Image<T>& im, int64_t i, const bits_t<T>* u, const T* dens, bool tie_index,
               std::vector<uint8_t>& hits, T* delta, int64_t* parent, T* row_max) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const int64_t tie_below = tie_index ? i : 0;
  bits_t<T> lo, hi;
  row_extrema(u, dens, dens[i], tie_below, bytes(im.valid), im.N, &lo, &hi);
  // candidates: denser tokens within the error bound of the nearest, and
  // tokens within it of the farthest
  const T tol = im.tol(i);
  const bool has_denser = lo != ~bits_t<T>(0);
  const bits_t<T> near_bound = has_denser ? to_bits<T>(from_bits<T>(lo) + tol) : bits_t<T>(0);
  const T far_floor = from_bits<T>(hi) - tol;
  const bits_t<T> far_bound = to_bits<T>(far_floor > T(0) ? far_floor : T(0));
  T best = inf, far = -inf;
  int64_t arg = -1;
  for_each_hit(u, im.N, near_bound, far_bound, hits, [&](int64_t j) {
    const bool near_candidate =
        has_denser && u[j] <= near_bound && im.valid[j] && denser_than(dens, j, dens[i], tie_below);
    const bool far_candidate = u[j] >= far_bound && im.valid[j];
    if (!near_candidate && !far_candidate) return;
    const T d = im.dist_once(i, j);
    if (near_candidate && (d < best || arg < 0)) {  // ascending j: first index on ties
      best = d;
      arg = j;
    }
    if (far_candidate && !(d <= far)) far = d;
  });
  *delta = best;
  *parent = arg;
  *row_max = far;
}

template <typename T>
const bits_t<T>* bits_of(const at::Tensor& approx) {
  return reinterpret_cast<const bits_t<T>*>(approx.data_ptr<T>());
}

// Runs fn(r0, r1, u) over the image's row blocks; u holds the block's
// (r1 - r0, N) approximate distances.
template <typename T, typename F>
void for_each_block(const Image<T>& im, const at::Tensor* whole, F&& fn) {
  if (whole != nullptr) {
    fn(int64_t(0), im.N, bits_of<T>(*whole));
    return;
  }
  const int64_t R = im.rows_per_block();
  for (int64_t r0 = 0; r0 < im.N; r0 += R) {
    const int64_t r1 = std::min(im.N, r0 + R);
    fn(r0, r1, bits_of<T>(im.approx(r0, r1)));
  }
}

template <typename T>
void density_pass(const Image<T>& im, const at::Tensor* whole, int64_t k, T* density) {
  const int64_t kk = std::min(k, im.num_valid);
  for_each_block(im, whole, [&](int64_t r0, int64_t r1, const bits_t<T>* u) {
    at::parallel_for(r0, r1, 1, [&](int64_t b0, int64_t b1) {
      RowScratch<T> s;
      for (int64_t i = b0; i < b1; ++i) {
        density[i] = im.valid[i] ? knn_row(im, i, u + (i - r0) * im.N, kk, s) : T(0);
      }
    });
  });
}

// "column_max": cap_i = min of rmax_j over the real tokens j not denser than
// i (j = i included), a running minimum over the tokens in ascending density
// order. Without tie_index, tokens of equal density (NaN with NaN) form one
// group sharing its cap; with it, equal densities order by descending index.
template <typename T>
void column_max_cap(const bool* valid, int64_t N, const T* dens, const T* rmax, bool tie_index, T* cap) {
  std::vector<int64_t> order;
  order.reserve(N);
  for (int64_t i = 0; i < N; ++i) {
    if (valid[i]) order.push_back(i);
  }
  auto less = [&](int64_t i, int64_t j) { return nan_last_less(dens[i], dens[j]); };
  std::sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
    return less(i, j) || (!less(j, i) && (tie_index ? i > j : i < j));
  });
  T running = std::numeric_limits<T>::infinity();
  for (size_t g0 = 0; g0 < order.size();) {
    size_t g1 = g0 + 1;
    if (!tie_index) {
      while (g1 < order.size() && !less(order[g0], order[g1])) ++g1;
    }
    for (size_t t = g0; t < g1; ++t) running = std::min(running, rmax[order[t]]);
    for (size_t t = g0; t < g1; ++t) cap[order[t]] = running;
    g0 = g1;
  }
}

template <typename T>
void delta_pass(const Image<T>& im, const at::Tensor* whole, const T* dens, bool column_max, bool tie_index, T* delta,
                int64_t* parent) {
  std::vector<T> rmax(im.N, T(0));
  for_each_block(im, whole, [&](int64_t r0, int64_t r1, const bits_t<T>* u) {
    at::parallel_for(r0, r1, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> hits;
      for (int64_t i = b0; i < b1; ++i) {
        if (im.valid[i]) delta_row(im, i, u + (i - r0) * im.N, dens, tie_index, hits, delta + i, parent + i, &rmax[i]);
      }
    });
  });
  // "column_max" caps every delta; "global_max" fills in the largest rmax
  // where there is no denser token (it never undercuts a real distance)
  std::vector<T> fill(im.N, -std::numeric_limits<T>::infinity());
  if (column_max) {
    column_max_cap(im.valid, im.N, dens, rmax.data(), tie_index, fill.data());
  } else {
    for (int64_t i = 0; i < im.N; ++i) {
      if (im.valid[i]) fill[0] = std::max(fill[0], rmax[i]);
    }
    std::fill(fill.begin() + 1, fill.end(), fill[0]);
  }
  for (int64_t i = 0; i < im.N; ++i) {
    if (!im.valid[i]) {
      delta[i] = 0;
      parent[i] = -1;
    } else if (parent[i] < 0) {
      delta[i] = fill[i];
    } else if (column_max) {
      delta[i] = std::min(delta[i], fill[i]);
    }
  }
}

// labels_i = position of the nearest of the first nc centres (earlier on
// ties). Approximate distances to the centres come from the image's whole
// matrix when there is one, else from an (N, nc) GEMM.
template <typename T>
void assign_image(const Image<T>& im, const int64_t* centers, int64_t nc, int64_t* labels, const at::Tensor* whole) {
  if (nc <= 0) {
    std::fill(labels, labels + im.N, int64_t(-1));
    return;
  }
  std::vector<int64_t> cs(centers, centers + nc);
  for (auto& c : cs) c = std::min(std::max<int64_t>(c, 0), im.N - 1);
  at::Tensor g;
  const bits_t<T>* u = nullptr;
  const T* gp = nullptr;
  if (whole != nullptr) {
    u = bits_of<T>(*whole);
  } else {
    auto idx = at::tensor(at::ArrayRef<int64_t>(cs), at::TensorOptions().dtype(at::kLong));
    g = at::mm(im.xc, im.xc.index_select(0, idx).t()).contiguous();
    gp = g.template data_ptr<T>();
  }
  at::parallel_for(0, im.N, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> approx(nc);
    for (int64_t i = b0; i < b1; ++i) {
      if (!im.valid[i]) {
        labels[i] = -1;
        continue;
      }
      T lo = std::numeric_limits<T>::infinity();
      for (int64_t m = 0; m < nc; ++m) {
        const T a = u != nullptr ? from_bits<T>(u[i * im.N + cs[m]])
                                 : im.norm[i] + im.norm[cs[m]] - T(2) * gp[i * nc + m];
        approx[m] = std::isnan(a) ? std::numeric_limits<T>::infinity() : a;
        lo = std::min(lo, approx[m]);
      }
      const T bound = lo + im.tol(i);
      T best = std::numeric_limits<T>::infinity();
      int64_t arg = -1;
      for (int64_t m = 0; m < nc; ++m) {
        if (approx[m] > bound) continue;
        const T d = im.dist_once(i, cs[m]);
        if (arg < 0 || d < best) {
          best = d;
          arg = m;
        }
      }
      labels[i] = arg < 0 ? 0 : arg;
    }
  });
  for (int64_t m = 0; m < nc; ++m) labels[cs[m]] = m;  // a centre labels itself
}

// metric "cosine": labels_i = position of the centre of largest x_i.x_c /
// (|x_i| |x_c|) on the uncentred features (a zero row has similarity 0;
// earlier centre on ties). Candidates come from a GEMM of unit rows and are
// recomputed in a fixed order within its error bound of the best.
template <typename T>
void assign_image_cosine(const Image<T>& im, const int64_t* centers, int64_t nc, int64_t* labels) {
  if (nc <= 0) {
    std::fill(labels, labels + im.N, int64_t(-1));
    return;
  }
  constexpr T tiny = std::numeric_limits<T>::min();
  std::vector<int64_t> cs(centers, centers + nc);
  for (auto& c : cs) c = std::min(std::max<int64_t>(c, 0), im.N - 1);
  std::vector<T> len(im.N);
  for (int64_t i = 0; i < im.N; ++i) len[i] = std::max(std::sqrt(dot(im.x + i * im.C, im.x + i * im.C, im.C)), tiny);
  auto inv = at::tensor(at::ArrayRef<T>(len), im.xt.options()).reciprocal_();
  auto unit = im.xt * inv.unsqueeze(1);
  auto idx = at::tensor(at::ArrayRef<int64_t>(cs), at::TensorOptions().dtype(at::kLong));
  const auto g = at::mm(unit, unit.index_select(0, idx).t()).contiguous();
  const T* gp = g.template data_ptr<T>();
  const T tol = T(2) * im.gamma;
  at::parallel_for(0, im.N, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      if (!im.valid[i]) {
        labels[i] = -1;
        continue;
      }
      const T* row = gp + i * nc;
      T hi = -std::numeric_limits<T>::infinity();
      for (int64_t m = 0; m < nc; ++m) {
        if (row[m] > hi) hi = row[m];
      }
      T best = 0;
      int64_t arg = -1;
      for (int64_t m = 0; m < nc; ++m) {
        if (row[m] < hi - tol) continue;
        const T sim = dot(im.x + i * im.C, im.x + cs[m] * im.C, im.C) / len[i] / len[cs[m]];
        if (arg < 0 || sim > best) {
          best = sim;
          arg = m;
        }
      }
      labels[i] = arg < 0 ? 0 : arg;
    }
  });
  for (int64_t m = 0; m < nc; ++m) labels[cs[m]] = m;
}

// NaN ranks first, as in a descending torch.sort; then higher score, then lower index.
template <typename S>
inline bool ranks_before(S a, int64_t i, S b, int64_t j) {
  const bool na = std::isnan(static_cast<double>(a)), nb = std::isnan(static_cast<double>(b));
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return i < j;
}

// Centres of one image, -1 padded to M; returns their number. num_centers
// > 0: the top num_centers real tokens, no threshold. Centres are numbered
// by ascending index, or by rank when by_score.
template <typename S>
int64_t select_image(const S* score, const bool* valid, int64_t N, S threshold, int64_t min_clusters, int64_t M,
                     int64_t num_centers, bool by_score, int64_t* centers) {
  std::vector<int64_t> chosen;
  if (num_centers == 0) {
    for (int64_t i = 0; i < N; ++i) {
      if (valid[i] && score[i] > threshold) chosen.push_back(i);
    }
  }
  int64_t limit = M;
  if (chosen.empty()) {  // the top min_clusters (or num_centers) real tokens
    for (int64_t i = 0; i < N; ++i) {
      if (valid[i]) chosen.push_back(i);
    }
    limit = std::min(num_centers > 0 ? num_centers : min_clusters, M);
  }
  auto rank_less = [&](int64_t i, int64_t j) { return ranks_before(score[i], i, score[j], j); };
  if (static_cast<int64_t>(chosen.size()) > limit) {
    std::nth_element(chosen.begin(), chosen.begin() + limit, chosen.end(), rank_less);
    chosen.resize(limit);
    std::sort(chosen.begin(), chosen.end());
  }
  if (by_score) std::sort(chosen.begin(), chosen.end(), rank_less);
  const int64_t n = static_cast<int64_t>(chosen.size());
  std::copy(chosen.begin(), chosen.end(), centers);
  std::fill(centers + n, centers + M, int64_t(-1));
  return n;
}

// ------------------------------------------------------------------ ops

// Images run in parallel when there are enough to keep every thread busy
// (each image's GEMMs and row loops then run single-threaded inside);
// otherwise one after another, each parallel over its rows. Either way every
// row's result is computed the same way: thread counts never change it.
template <typename F>
void for_each_image(int64_t B, const F& fn) {
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fn(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) fn(b);
  }
}

// The largest finite |x| of n values, as its bit pattern (NaN and inf have
// no scale): an integer max, which vectorizes where a float one does not.
template <typename T>
__attribute__((always_inline)) inline bits_t<T> max_finite_abs_impl(const T* x, int64_t n) {
  using U = bits_t<T>;
  const U magnitude = ~U(0) >> 1, inf = to_bits(std::numeric_limits<T>::infinity());
  U top = 0;
  for (int64_t c = 0; c < n; ++c) {
    const U a = to_bits(x[c]) & magnitude;
    top = std::max(top, a & (U(0) - U(a < inf)));  // a mask, not a select: GCC vectorizes only that
  }
  return top;
}

SETOK_SIMD_CLONES uint32_t max_finite_abs(const float* x, int64_t n) {
  return max_finite_abs_impl(x, n);
}

SETOK_SIMD_CLONES uint64_t max_finite_abs(const double* x, int64_t n) {
  return max_finite_abs_impl(x, n);
}

// Per-image power of two that brings features of extreme magnitude near 1,
// so that squared distances neither overflow nor underflow (it cancels
// exactly in every comparison); 1 for everything else, keeping results bit
// for bit (scaling by a power of two is exact wherever nothing overflows or
// underflows, so any such scale gives the reference's results).
template <typename T>
T image_scale(const T* x, const bool* valid, int64_t N, int64_t C) {
  bits_t<T> top_bits = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (valid[i]) top_bits = std::max(top_bits, max_finite_abs(x + i * C, C));
  }
  const T top = from_bits<T>(top_bits);
  if (top == 0 || (top >= std::ldexp(T(1), -32) && top <= std::ldexp(T(1), 32))) return T(1);
  int e;
  std::frexp(top, &e);  // top = m 2^e, m in [0.5, 1): top / 2^(e - 1) lies in [1, 2)
  using L = std::numeric_limits<T>;
  return std::ldexp(T(1), std::min(std::max(e - 1, L::min_exponent - 1), L::max_exponent - 1));
}

// Features in the accumulation dtype (divided by the image's scale), the
// mask, and for the GEMM the features centred on each image's real-token
// mean (masked rows zeroed, so garbage there never reaches a real token)
// with their squared norms.
struct Prepared {
  at::Tensor x, valid, xc, norms, scales;

  Prepared(const at::Tensor& x_in, const std::optional<at::Tensor>& mask) {
    TORCH_CHECK(x_in.dim() == 3, "setok: x must be (B, N, C)");
    x = x_in.to(acc_type(x_in.scalar_type())).contiguous();
    valid = valid_mask(mask, x);
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    xc = at::empty_like(x);
    norms = at::empty({B, N}, x.options());
    scales = at::empty({B}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_scale", [&] {
      scalar_t* sp = scales.data_ptr<scalar_t>();
      const bool* vp = valid.data_ptr<bool>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) sp[b] = image_scale(xp + b * N * C, vp + b * N, N, C);
      });
      if ((scales != 1).any().item<bool>()) {
        x = x.clone();  // never write to the caller's tensor
        x.div_(scales.view({B, 1, 1}));
      }
    });
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_centre", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const bool* vp = valid.data_ptr<bool>();
      scalar_t* cp = xc.data_ptr<scalar_t>();
      scalar_t* np = norms.data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<scalar_t> mean(C);
        for (int64_t b = b0; b < b1; ++b) {
          std::fill(mean.begin(), mean.end(), scalar_t(0));
          int64_t count = 0;
          for (int64_t i = b * N; i < (b + 1) * N; ++i) {
            if (!vp[i]) continue;
            ++count;
            for (int64_t c = 0; c < C; ++c) mean[c] += xp[i * C + c];
          }
          for (auto& m : mean) m /= static_cast<scalar_t>(std::max<int64_t>(count, 1));
          for (int64_t i = b * N; i < (b + 1) * N; ++i) {
            if (vp[i]) {
              np[i] = centre_row(xp + i * C, mean.data(), cp + i * C, C);
            } else {
              std::fill(cp + i * C, cp + (i + 1) * C, scalar_t(0));
              np[i] = 0;
            }
          }
        }
      });
    });
  }

  template <typename T>
  Image<T> image(int64_t b) const {
    return Image<T>(x[b], valid[b], xc[b], norms[b], scales.data_ptr<T>()[b]);
  }
};

// N x N buffers per thread, allocated once per call, when a whole image
// fits the block budget: its approximate distances, and with many channels
// (where the exact distances cost most) a table of the exact ones.
struct GramBuffers {
  std::vector<at::Tensor> buffers, known;

  GramBuffers(const at::Tensor& x) {
    const int64_t N = x.size(1);
    if (N > kBand && N * N <= kBlockElements) {
      for (int t = 0; t < at::get_num_threads(); ++t) {
        buffers.push_back(at::empty({N, N}, x.options()));
        if (x.size(2) >= kSymmetricMinChannels) known.push_back(at::empty({N, N}, x.options()));
      }
    }
  }

  // The image's whole approximate-distance matrix when it fits (nullptr:
  // stream row blocks). When this thread alone visits the image's rows, the
  // exact distances are remembered for the image's passes (Image::known).
  template <typename T>
  const at::Tensor* whole(Image<T>& im, at::Tensor& storage) const {
    if (im.rows_per_block() != im.N) return nullptr;
    const int t = at::get_thread_num();
    storage = im.approx(0, im.N, buffers.empty() ? at::Tensor() : buffers[t]);
    if (!known.empty() && (at::in_parallel_region() || at::get_num_threads() == 1)) {
      known[t].fill_(-1);
      im.known = known[t].data_ptr<T>();
    }
    return &storage;
  }
};

#define SETOK_DISPATCH_ACC(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

at::Tensor knn_density_cpu(const at::Tensor& x_in, int64_t k, const std::optional<at::Tensor>& mask) {
  check_floating(x_in, "x", 3);
  TORCH_CHECK(k >= 1 && k <= x_in.size(1), "setok: k must lie in [1, N = ", x_in.size(1), "], got ", k);
  const Prepared prep(x_in, mask);
  const at::Tensor &x = prep.x, &valid = prep.valid;
  auto density = at::empty({x.size(0), x.size(1)}, x.options());
  const GramBuffers buffers(x);
  SETOK_DISPATCH_ACC(x.scalar_type(), "native_knn_density", [&] {
    for_each_image(x.size(0), [&](int64_t b) {
      auto im = prep.image<scalar_t>(b);
      if (im.num_valid == 0) {
        density[b].zero_();
        return;
      }
      at::Tensor storage;
      density_pass(im, buffers.whole(im, storage), k, density[b].data_ptr<scalar_t>());
    });
  });
  return density;
}

std::tuple<at::Tensor, at::Tensor> density_delta_cpu(const at::Tensor& x_in, const at::Tensor& density,
                                                     const std::optional<at::Tensor>& mask,
                                                     c10::string_view densest_delta, c10::string_view tie_break) {
  check_floating(x_in, "x", 3);
  const bool column_max = enum_flag(densest_delta, "densest_delta", "global_max", "column_max");
  const bool tie_index = enum_flag(tie_break, "tie_break", "none", "index");
  check_floating(density, "density", 2);
  TORCH_CHECK(density.size(0) == x_in.size(0) && density.size(1) == x_in.size(1),
              "setok: density must have shape (B, N) of x, got ", density.sizes());
  const Prepared prep(x_in, mask);
  const at::Tensor &x = prep.x, &valid = prep.valid;
  const int64_t B = x.size(0), N = x.size(1);
  auto dens = density.to(x.scalar_type()).contiguous();
  auto delta = at::zeros({B, N}, x.options());
  auto parent = at::full({B, N}, -1, x.options().dtype(at::kLong));
  const GramBuffers buffers(x);
  SETOK_DISPATCH_ACC(x.scalar_type(), "native_density_delta", [&] {
    for_each_image(B, [&](int64_t b) {
      auto im = prep.image<scalar_t>(b);
      if (im.num_valid == 0) return;
      at::Tensor storage;
      delta_pass(im, buffers.whole(im, storage), dens[b].data_ptr<scalar_t>(), column_max, tie_index,
                 delta[b].data_ptr<scalar_t>(), parent[b].data_ptr<int64_t>());
    });
  });
  return {delta, parent};
}

std::tuple<at::Tensor, at::Tensor> select_centers_cpu(const at::Tensor& score_in, const std::optional<at::Tensor>& mask,
                                                      double threshold, int64_t min_clusters, int64_t M,
                                                      int64_t num_centers, c10::string_view center_order) {
  check_floating(score_in, "score", 2);
  TORCH_CHECK(min_clusters >= 1, "setok: min_clusters must be >= 1, got ", min_clusters);
  check_slots(score_in.size(0), M);
  TORCH_CHECK(num_centers >= 0, "setok: num_centers must be >= 0 (0: the threshold rule), got ", num_centers);
  const bool by_score = enum_flag(center_order, "center_order", "index", "score");
  auto score = score_in.contiguous();
  auto valid = valid_mask(mask, score);
  const int64_t B = score.size(0), N = score.size(1);
  auto centers = at::empty({B, M}, score.options().dtype(at::kLong));
  auto num = at::empty({B}, score.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "native_select_centers", [&] {
    // the threshold is compared in the score's dtype, like `score > threshold`
    const scalar_t thr = static_cast<scalar_t>(threshold);
    const scalar_t* s = score.data_ptr<scalar_t>();
    const bool* v = valid.data_ptr<bool>();
    int64_t* c = centers.data_ptr<int64_t>();
    int64_t* n = num.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        n[b] = select_image(s + b * N, v + b * N, N, thr, min_clusters, M, num_centers, by_score, c + b * M);
      }
    });
  });
  return {centers, num};
}

at::Tensor assign_to_centers_cpu(const at::Tensor& x_in, const at::Tensor& centers_in, const at::Tensor& num_in,
                                 const std::optional<at::Tensor>& mask, c10::string_view metric) {
  check_floating(x_in, "x", 3);
  const bool cosine = enum_flag(metric, "metric", "euclidean", "cosine");
  TORCH_CHECK(centers_in.dim() == 2, "setok: centers must be (B, M), got ", centers_in.sizes());
  check_index(centers_in, "centers", {x_in.size(0), centers_in.size(1)}, x_in);
  check_index(num_in, "num_clusters", {x_in.size(0)}, x_in);
  const Prepared prep(x_in, mask);
  const at::Tensor &x = prep.x, &valid = prep.valid;
  const int64_t B = x.size(0), N = x.size(1), M = centers_in.size(1);
  auto centers = centers_in.to(at::kLong).contiguous();
  auto num = num_in.to(at::kLong).contiguous();
  auto labels = at::empty({B, N}, x.options().dtype(at::kLong));
  SETOK_DISPATCH_ACC(x.scalar_type(), "native_assign_to_centers", [&] {
    for_each_image(B, [&](int64_t b) {
      auto im = prep.image<scalar_t>(b);
      const int64_t nc = std::min(std::max<int64_t>(num[b].item<int64_t>(), 0), M);
      const int64_t* cb = centers[b].data_ptr<int64_t>();
      int64_t* lb = labels[b].data_ptr<int64_t>();
      if (cosine) {
        assign_image_cosine(im, cb, nc, lb);
      } else {
        assign_image(im, cb, nc, lb, nullptr);
      }
    });
  });
  return labels;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_cluster_cpu(
    const at::Tensor& x_in, int64_t k, double threshold, int64_t min_clusters, int64_t M,
    const std::optional<at::Tensor>& mask, c10::string_view densest_delta, int64_t num_centers,
    c10::string_view center_order, c10::string_view tie_break) {
  check_floating(x_in, "x", 3);
  const bool column_max = enum_flag(densest_delta, "densest_delta", "global_max", "column_max");
  const bool by_score = enum_flag(center_order, "center_order", "index", "score");
  const bool tie_index = enum_flag(tie_break, "tie_break", "none", "index");
  TORCH_CHECK(num_centers >= 0, "setok: num_centers must be >= 0 (0: the threshold rule), got ", num_centers);
  TORCH_CHECK(k >= 1 && k <= x_in.size(1), "setok: k must lie in [1, N = ", x_in.size(1), "], got ", k);
  TORCH_CHECK(min_clusters >= 1, "setok: min_clusters must be >= 1, got ", min_clusters);
  check_slots(x_in.size(0), M);
  const Prepared prep(x_in, mask);
  const at::Tensor &x = prep.x, &valid = prep.valid;
  const int64_t B = x.size(0), N = x.size(1);
  auto i64 = x.options().dtype(at::kLong);
  auto density = at::zeros({B, N}, x.options());
  auto delta = at::zeros({B, N}, x.options());
  auto score = at::zeros({B, N}, x.options());
  auto parent = at::full({B, N}, -1, i64);
  auto labels = at::full({B, N}, -1, i64);
  auto centers = at::full({B, M}, -1, i64);
  auto num = at::zeros({B}, i64);
  const GramBuffers buffers(x);
  SETOK_DISPATCH_ACC(x.scalar_type(), "native_dpc_cluster", [&] {
    const scalar_t thr = static_cast<scalar_t>(threshold);
    for_each_image(B, [&](int64_t b) {
      auto im = prep.image<scalar_t>(b);
      if (im.num_valid == 0) return;
      // one approximate-distance matrix for every pass when it fits the block budget
      at::Tensor storage;
      const at::Tensor* g = buffers.whole(im, storage);
      scalar_t* dens = density[b].data_ptr<scalar_t>();
      scalar_t* del = delta[b].data_ptr<scalar_t>();
      scalar_t* sc = score[b].data_ptr<scalar_t>();
      density_pass(im, g, k, dens);
      delta_pass(im, g, dens, column_max, tie_index, del, parent[b].data_ptr<int64_t>());
      // a density that underflowed to 0 scores 0, even if delta overflowed
      for (int64_t i = 0; i < N; ++i) sc[i] = dens[i] == 0 ? scalar_t(0) : dens[i] * del[i];
      int64_t* cb = centers[b].data_ptr<int64_t>();
      const int64_t nc = select_image(sc, im.valid, N, thr, min_clusters, M, num_centers, by_score, cb);
      num[b].fill_(nc);
      assign_image(im, cb, nc, labels[b].data_ptr<int64_t>(), g);
    });
  });
  return {labels, num, centers, score, density, delta, parent};
}

}  // namespace

TORCH_LIBRARY_IMPL(setok, CPU, m) {
  m.impl("native_knn_density", &knn_density_cpu);
  m.impl("native_density_delta", &density_delta_cpu);
  m.impl("native_select_centers", &select_centers_cpu);
  m.impl("native_assign_to_centers", &assign_to_centers_cpu);
  m.impl("native_dpc_cluster", &dpc_cluster_cpu);
}

}  // namespace setok
