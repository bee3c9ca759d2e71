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
// per thread; when the whole N x N block fits, it is computed once from the
// upper triangle and shared by the density and delta passes.
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

// NaN sorts after every number (a strict weak order even with NaN).
template <typename T>
__attribute__((always_inline)) inline bool nan_last_less(T a, T b) {
  return std::isnan(b) ? !std::isnan(a) : a < b;
}

template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// The kk-th smallest of n non-negative floats given by their bit patterns
// (which order like the values): a bitwise binary search whose passes are
// branch-free counts, far cheaper than a comparison-based selection.
template <typename U>
__attribute__((always_inline)) inline U kth_smallest_bits(const U* u, int64_t n, int64_t kk) {
  U prefix = 0;
  for (int b = 8 * sizeof(U) - 1; b >= 0; --b) {
    const U t = prefix | (U(1) << b);
    uint32_t below = 0;
    for (int64_t j = 0; j < n; ++j) below += u[j] < t;
    if (below < static_cast<uint64_t>(kk)) prefix = t;
  }
  return prefix;
}

SETOK_SIMD_CLONES uint32_t kth_smallest(const uint32_t* u, int64_t n, int64_t kk) {
  return kth_smallest_bits(u, n, kk);
}

SETOK_SIMD_CLONES uint64_t kth_smallest(const uint64_t* u, int64_t n, int64_t kk) {
  return kth_smallest_bits(u, n, kk);
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

// Approximate squared distances of one row as ordered bit patterns:
// max(n_i + n_j - 2 g_j, +0) (never -0, never NaN), +inf for masked tokens.
template <typename T>
__attribute__((always_inline)) inline void approx_bits_impl(const T* g, const T* norm, const bool* valid, T ni,
                                                            int64_t N, bits_t<T>* out) {
  const bits_t<T> inf = to_bits(std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < N; ++j) {
    const T a = ni + norm[j] - T(2) * g[j];
    const bits_t<T> u = to_bits(a > T(0) ? a : T(0));
    out[j] = valid[j] ? u : inf;
  }
}

SETOK_SIMD_CLONES void approx_bits(const float* g, const float* norm, const bool* valid, float ni, int64_t N,
                                   uint32_t* out) {
  approx_bits_impl(g, norm, valid, ni, N, out);
}

SETOK_SIMD_CLONES void approx_bits(const double* g, const double* norm, const bool* valid, double ni, int64_t N,
                                   uint64_t* out) {
  approx_bits_impl(g, norm, valid, ni, N, out);
}

// out = x - mean; returns ||out||^2 summed lane-wise like sqdist.
template <typename T, int L>
__attribute__((always_inline)) inline T centre_row_impl(const T* x, const T* mean, T* out, int64_t C) {
  T acc[L] = {};
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    for (int l = 0; l < L && c0 + l < C; ++l) {
      const T d = x[c0 + l] - mean[c0 + l];
      out[c0 + l] = d;
      acc[l] += d * d;
    }
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
  const T* x;  // (N, C) in the accumulation dtype
  const bool* valid;
  int64_t N, C;
  int64_t num_valid = 0;
  at::Tensor xc;  // (N, C) centred over the real tokens, masked rows 0
  const T* norm;  // (N,) squared norms of xc
  T norm_max = 0;
  T gamma;  // relative error bound of a GEMM dot product
  T sqrt_c;

  Image(const at::Tensor& xb, const at::Tensor& vb, const at::Tensor& xcb, const at::Tensor& normb)
      : x(xb.data_ptr<T>()), valid(vb.data_ptr<bool>()), N(xb.size(0)), C(xb.size(1)), xc(xcb),
        norm(normb.data_ptr<T>()) {
    for (int64_t i = 0; i < N; ++i) {
      num_valid += valid[i];
      if (valid[i]) norm_max = std::max(norm_max, norm[i]);
    }
    // a typical blocked-FMA dot product errs by ~sqrt(C) eps |a||b|; the
    // margin is 16x that, and a miss would only cost a rounding difference
    gamma = T(16) * std::sqrt(static_cast<T>(C)) * std::numeric_limits<T>::epsilon();
    sqrt_c = static_cast<T>(std::sqrt(static_cast<double>(C)));
  }

  // The scaled distance ||x_i - x_j|| / sqrt(C), exactly as the reference.
  T dist(int64_t i, int64_t j) const {
    return std::sqrt(sqdist(x + i * C, x + j * C, C)) / sqrt_c;
  }

  T tol(int64_t i) const {
    return gamma * (norm[i] + norm_max) + std::numeric_limits<T>::min();
  }

  // Approximate squared distances of row i (Gram row g) to every token.
  void approx_row(int64_t i, const T* g, bits_t<T>* out) const {
    approx_bits(g, norm, valid, norm[i], N, out);
  }

  // Gram rows [r0, r1) x all tokens. The whole matrix (into `whole`, N x N)
  // is built from row bands of its upper triangle and mirrored: half the
  // GEMM work.
  at::Tensor gram(int64_t r0, int64_t r1, at::Tensor whole = {}) const {
    if (!whole.defined() || r0 != 0 || r1 != N) return at::mm(xc.slice(0, r0, r1), xc.t());
    for (int64_t i0 = 0; i0 < N; i0 += kBand) {
      const int64_t i1 = std::min(N, i0 + kBand);
      auto band = whole.slice(0, i0, i1).slice(1, i0, N);
      at::mm_out(band, xc.slice(0, i0, i1), xc.slice(0, i0, N).t());
      whole.slice(0, i1, N).slice(1, i0, i1).copy_(band.slice(1, i1 - i0, N - i0).t());
    }
    return whole;
  }

  int64_t rows_per_block() const {
    return std::max<int64_t>(1, std::min(N, kBlockElements / N));
  }
};

// Per-thread buffers, reused across rows.
template <typename T>
struct Scratch {
  std::vector<T> exact;
  std::vector<bits_t<T>> bits;
  explicit Scratch(int64_t N) : bits(N) {}
};

// density_i = exp(-mean of the kk smallest exact d^2 over real tokens).
template <typename T>
T knn_row(const Image<T>& im, int64_t i, const T* g, int64_t kk, Scratch<T>& s) {
  im.approx_row(i, g, s.bits.data());
  const T kth = from_bits<T>(kth_smallest(s.bits.data(), im.N, kk));
  const bits_t<T> bound = to_bits<T>(kth + im.tol(i));
  s.exact.clear();
  for (int64_t j = 0; j < im.N; ++j) {
    if (im.valid[j] && !(s.bits[j] > bound)) {
      const T d = im.dist(i, j);
      s.exact.push_back(d * d);
    }
  }
  // the candidates always include the kk nearest; sum them nearest first
  std::sort(s.exact.begin(), s.exact.end(), [](T a, T b) { return nan_last_less(a, b); });
  T total = 0;
  for (int64_t t = 0; t < kk; ++t) total += s.exact[t];
  return std::exp(-total / static_cast<T>(kk));
}

// Over real tokens: the smallest approximate-distance bits among strictly
// denser tokens (all ones if none) and the largest among all. Integer
// reductions without branches, so they vectorize.
template <typename T>
__attribute__((always_inline)) inline void row_extrema_impl(const bits_t<T>* u, const T* dens, T di, const bool* valid,
                                                            int64_t N, bits_t<T>* lo, bits_t<T>* hi) {
  constexpr bits_t<T> none = ~bits_t<T>(0);
  bits_t<T> l = none, h = 0;
  for (int64_t j = 0; j < N; ++j) {
    const bool denser = valid[j] & (dens[j] > di);
    l = std::min(l, denser ? u[j] : none);
    h = std::max(h, valid[j] ? u[j] : bits_t<T>(0));
  }
  *lo = l;
  *hi = h;
}

SETOK_SIMD_CLONES void row_extrema(const uint32_t* u, const float* dens, float di, const bool* valid, int64_t N,
                                   uint32_t* lo, uint32_t* hi) {
  row_extrema_impl<float>(u, dens, di, valid, N, lo, hi);
}

SETOK_SIMD_CLONES void row_extrema(const uint64_t* u, const double* dens, double di, const bool* valid, int64_t N,
                                   uint64_t* lo, uint64_t* hi) {
  row_extrema_impl<double>(u, dens, di, valid, N, lo, hi);
}

// delta_i / parent_i over strictly denser real tokens, and the exact
// distance to the farthest real token (for the densest token's delta).
template <typename T>
void delta_row(const Image<T>& im, int64_t i, const T* g, const T* dens, Scratch<T>& s, T* delta, int64_t* parent,
               T* row_max) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const bits_t<T>* u = s.bits.data();
  im.approx_row(i, g, s.bits.data());
  bits_t<T> lo, hi;
  row_extrema(u, dens, dens[i], im.valid, im.N, &lo, &hi);
  // candidates: denser tokens within the error bound of the nearest, and
  // tokens within it of the farthest
  const T tol = im.tol(i);
  const bool has_denser = lo != ~bits_t<T>(0);
  const bits_t<T> near_bound = has_denser ? to_bits<T>(from_bits<T>(lo) + tol) : bits_t<T>(0);
  const T far_floor = from_bits<T>(hi) - tol;
  const bits_t<T> far_bound = to_bits<T>(far_floor > T(0) ? far_floor : T(0));
  T best = inf, far = -inf;
  int64_t arg = -1;
  for (int64_t j = 0; j < im.N; ++j) {
    const bool near_candidate = has_denser && u[j] <= near_bound && im.valid[j] && dens[j] > dens[i];
    const bool far_candidate = u[j] >= far_bound && im.valid[j];
    if (!near_candidate && !far_candidate) continue;
    const T d = im.dist(i, j);
    if (near_candidate && (d < best || arg < 0)) {  // ascending j: first index on ties
      best = d;
      arg = j;
    }
    if (far_candidate && !(d <= far)) far = d;
  }
  *delta = best;
  *parent = arg;
  *row_max = far;
}

// Runs fn(r0, r1, g) over the image's row blocks; g is the (r1 - r0, N) Gram block.
template <typename T, typename F>
void for_each_block(const Image<T>& im, const at::Tensor* whole, F&& fn) {
  if (whole != nullptr) {
    fn(int64_t(0), im.N, whole->data_ptr<T>());
    return;
  }
  const int64_t R = im.rows_per_block();
  for (int64_t r0 = 0; r0 < im.N; r0 += R) {
    const int64_t r1 = std::min(im.N, r0 + R);
    auto g = im.gram(r0, r1);
    fn(r0, r1, g.template data_ptr<T>());
  }
}

template <typename T>
void density_pass(const Image<T>& im, const at::Tensor* whole, int64_t k, T* density) {
  const int64_t kk = std::min(k, im.num_valid);
  for_each_block(im, whole, [&](int64_t r0, int64_t r1, const T* g) {
    at::parallel_for(r0, r1, 1, [&](int64_t b0, int64_t b1) {
      Scratch<T> s(im.N);
      for (int64_t i = b0; i < b1; ++i) {
        density[i] = im.valid[i] ? knn_row(im, i, g + (i - r0) * im.N, kk, s) : T(0);
      }
    });
  });
}

template <typename T>
void delta_pass(const Image<T>& im, const at::Tensor* whole, const T* dens, bool column_max, T* delta, int64_t* parent) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  std::vector<T> row_max(im.N, column_max ? inf : -inf);
  for_each_block(im, whole, [&](int64_t r0, int64_t r1, const T* g) {
    at::parallel_for(r0, r1, 1, [&](int64_t b0, int64_t b1) {
      Scratch<T> s(im.N);
      for (int64_t i = b0; i < b1; ++i) {
        if (im.valid[i]) delta_row(im, i, g + (i - r0) * im.N, dens, s, delta + i, parent + i, &row_max[i]);
      }
    });
  });
  // "column_max": min over tokens of their farthest distance; else the max
  T top = column_max ? inf : -inf;
  for (int64_t i = 0; i < im.N; ++i) {
    if (im.valid[i]) top = column_max ? std::min(top, row_max[i]) : std::max(top, row_max[i]);
  }
  for (int64_t i = 0; i < im.N; ++i) {
    if (!im.valid[i]) {
      delta[i] = 0;
      parent[i] = -1;
    } else if (parent[i] < 0) {
      delta[i] = top;
    }
  }
}

// labels_i = position of the nearest of the first nc centres (earlier on
// ties). Dot products with the centres come from the image's whole Gram
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
  const T* gp;
  int64_t row_stride;
  if (whole != nullptr) {
    gp = whole->data_ptr<T>();
    row_stride = im.N;
  } else {
    auto idx = at::tensor(at::ArrayRef<int64_t>(cs), at::TensorOptions().dtype(at::kLong));
    g = at::mm(im.xc, im.xc.index_select(0, idx).t()).contiguous();
    gp = g.template data_ptr<T>();
    row_stride = nc;
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
        const T a = im.norm[i] + im.norm[cs[m]] - T(2) * gp[i * row_stride + (whole != nullptr ? cs[m] : m)];
        approx[m] = std::isnan(a) ? std::numeric_limits<T>::infinity() : a;
        lo = std::min(lo, approx[m]);
      }
      const T bound = lo + im.tol(i);
      T best = std::numeric_limits<T>::infinity();
      int64_t arg = -1;
      for (int64_t m = 0; m < nc; ++m) {
        if (approx[m] > bound) continue;
        const T d = im.dist(i, cs[m]);
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

// NaN ranks first, as in a descending torch.sort; then higher score, then lower index.
template <typename S>
inline bool ranks_before(S a, int64_t i, S b, int64_t j) {
  const bool na = std::isnan(static_cast<double>(a)), nb = std::isnan(static_cast<double>(b));
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return i < j;
}

// Centres of one image, ascending, -1 padded to M; returns their number.
template <typename S>
int64_t select_image(const S* score, const bool* valid, int64_t N, S threshold, int64_t min_clusters, int64_t M,
                     int64_t* centers) {
  std::vector<int64_t> chosen;
  for (int64_t i = 0; i < N; ++i) {
    if (valid[i] && score[i] > threshold) chosen.push_back(i);
  }
  int64_t limit = M;
  if (chosen.empty()) {  // fallback: the top min_clusters real tokens
    for (int64_t i = 0; i < N; ++i) {
      if (valid[i]) chosen.push_back(i);
    }
    limit = std::min(min_clusters, M);
  }
  if (static_cast<int64_t>(chosen.size()) > limit) {
    std::nth_element(chosen.begin(), chosen.begin() + limit, chosen.end(), [&](int64_t i, int64_t j) {
      return ranks_before(score[i], i, score[j], j);
    });
    chosen.resize(limit);
    std::sort(chosen.begin(), chosen.end());
  }
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

// Features in the accumulation dtype, the mask, and for the GEMM the
// features centred on each image's real-token mean (masked rows zeroed, so
// garbage there never reaches a real token) with their squared norms.
struct Prepared {
  at::Tensor x, valid, xc, norms;

  Prepared(const at::Tensor& x_in, const std::optional<at::Tensor>& mask) {
    TORCH_CHECK(x_in.dim() == 3, "setok: x must be (B, N, C)");
    x = x_in.to(acc_type(x_in.scalar_type())).contiguous();
    valid = valid_mask(mask, x);
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    xc = at::empty_like(x);
    norms = at::empty({B, N}, x.options());
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
    return Image<T>(x[b], valid[b], xc[b], norms[b]);
  }
};

// One N x N Gram buffer per thread, allocated once per call, when a whole
// image fits the block budget.
struct GramBuffers {
  std::vector<at::Tensor> buffers;

  GramBuffers(const at::Tensor& x) {
    const int64_t N = x.size(1);
    if (N > kBand && N * N <= kBlockElements) {
      for (int t = 0; t < at::get_num_threads(); ++t) buffers.push_back(at::empty({N, N}, x.options()));
    }
  }

  // The image's whole Gram matrix when it fits (nullptr: stream row blocks).
  template <typename T>
  const at::Tensor* whole(const Image<T>& im, at::Tensor& storage) const {
    if (im.rows_per_block() != im.N) return nullptr;
    storage = im.gram(0, im.N, buffers.empty() ? at::Tensor() : buffers[at::get_thread_num()]);
    return &storage;
  }
};

#define SETOK_DISPATCH_ACC(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

at::Tensor knn_density_cpu(const at::Tensor& x_in, int64_t k, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(k >= 1, "setok: k must be >= 1");
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
                                                     const std::optional<at::Tensor>& mask, bool column_max) {
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
      delta_pass(im, buffers.whole(im, storage), dens[b].data_ptr<scalar_t>(), column_max, delta[b].data_ptr<scalar_t>(),
                 parent[b].data_ptr<int64_t>());
    });
  });
  return {delta, parent};
}

std::tuple<at::Tensor, at::Tensor> select_centers_cpu(const at::Tensor& score_in, const std::optional<at::Tensor>& mask,
                                                      double threshold, int64_t min_clusters, int64_t M) {
  TORCH_CHECK(score_in.dim() == 2 && M >= 1 && min_clusters >= 1, "setok: bad select_centers arguments");
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
      for (int64_t b = b0; b < b1; ++b) n[b] = select_image(s + b * N, v + b * N, N, thr, min_clusters, M, c + b * M);
    });
  });
  return {centers, num};
}

at::Tensor assign_to_centers_cpu(const at::Tensor& x_in, const at::Tensor& centers_in, const at::Tensor& num_in,
                                 const std::optional<at::Tensor>& mask) {
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
      assign_image(im, centers[b].data_ptr<int64_t>(), nc, labels[b].data_ptr<int64_t>(), nullptr);
    });
  });
  return labels;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_cluster_cpu(
    const at::Tensor& x_in, int64_t k, double threshold, int64_t min_clusters, int64_t M,
    const std::optional<at::Tensor>& mask, bool column_max) {
  TORCH_CHECK(k >= 1 && M >= 1 && min_clusters >= 1, "setok: bad dpc_cluster arguments");
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
      // one Gram matrix for both passes when it fits the block budget
      at::Tensor storage;
      const at::Tensor* g = buffers.whole(im, storage);
      scalar_t* dens = density[b].data_ptr<scalar_t>();
      scalar_t* del = delta[b].data_ptr<scalar_t>();
      scalar_t* sc = score[b].data_ptr<scalar_t>();
      density_pass(im, g, k, dens);
      delta_pass(im, g, dens, column_max, del, parent[b].data_ptr<int64_t>());
      for (int64_t i = 0; i < N; ++i) sc[i] = dens[i] * del[i];
      int64_t* cb = centers[b].data_ptr<int64_t>();
      const int64_t nc = select_image(sc, im.valid, N, thr, min_clusters, M, cb);
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
