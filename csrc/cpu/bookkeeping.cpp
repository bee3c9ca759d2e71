// Ragged bookkeeping on CPU: pack_clusters (a counting sort of tokens by
// (image, cluster)), segment_mean and its backwards, merge_clusters (the
// fused per-cluster weighted mean) and its backward; and the library's build
// facts.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../setok.h"

namespace setok {
namespace {

// A token is packed when 0 <= label < num_clusters[b] (num clamped to [0, M]);
// every other token goes to the tail of perm, in flattened index order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_clusters_cpu(const at::Tensor& labels_in,
                                                                             const at::Tensor& num_in, int64_t M) {
  TORCH_CHECK(labels_in.dim() == 2, "setok: labels must be (B, N), got ", labels_in.sizes());
  check_index(labels_in, "labels", labels_in.sizes(), labels_in);
  check_index(num_in, "num_clusters", {labels_in.size(0)}, labels_in);
  check_slots(labels_in.size(0), M);
  TORCH_CHECK(labels_in.numel() <= std::numeric_limits<int32_t>::max(), "setok: labels has B * N = ", labels_in.numel(),
              " tokens, over the 2^31 - 1 that int32 offsets address");
  auto labels = labels_in.to(at::kLong).contiguous();
  auto num_t = num_in.to(at::kLong).contiguous();
  const int64_t B = labels.size(0), N = labels.size(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  std::vector<int64_t> num(B), counts(B * M, 0), real(B, 0);
  for (int64_t b = 0; b < B; ++b) num[b] = std::min(std::max<int64_t>(num_t.data_ptr<int64_t>()[b], 0), M);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < N; ++i) {
        const int64_t l = lab[b * N + i];
        if (l >= 0 && l < num[b]) ++counts[b * M + l];
      }
      for (int64_t m = 0; m < num[b]; ++m) real[b] += counts[b * M + m];
    }
  });

  // where each image's real tokens, segments and tail tokens start
  std::vector<int64_t> real_start(B + 1, 0), tail_start(B + 1, 0), seg_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    real_start[b + 1] = real_start[b] + real[b];
    seg_start[b + 1] = seg_start[b] + num[b];
  }
  const int64_t total = real_start[B];
  tail_start[0] = total;
  for (int64_t b = 0; b < B; ++b) tail_start[b + 1] = tail_start[b] + (N - real[b]);

  auto perm = at::empty({B * N}, labels.options());
  auto cu_seqlens = at::empty({B * M + 1}, labels.options().dtype(at::kInt));
  auto cu_clusters = at::empty({B + 1}, labels.options().dtype(at::kInt));
  int64_t* p = perm.data_ptr<int64_t>();
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int32_t* cc = cu_clusters.data_ptr<int32_t>();
  for (int64_t b = 0; b <= B; ++b) cc[b] = static_cast<int32_t>(seg_start[b]);
  // real segments first, then the static remainder as empty segments
  cu[0] = 0;
  std::fill(cu + seg_start[B] + 1, cu + B * M + 1, static_cast<int32_t>(total));

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> next(M);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t offset = real_start[b];
      for (int64_t m = 0; m < num[b]; ++m) {
        next[m] = offset;
        offset += counts[b * M + m];
        cu[seg_start[b] + m + 1] = static_cast<int32_t>(offset);
      }
      int64_t tail = tail_start[b];
      for (int64_t i = 0; i < N; ++i) {  // ascending i: a stable counting sort
        const int64_t l = lab[b * N + i];
        p[(l >= 0 && l < num[b]) ? next[l]++ : tail++] = b * N + i;
      }
    }
  });
  const int64_t longest = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  return {perm, cu_seqlens, cu_clusters, at::scalar_tensor(longest, labels.options())};
}

// Items per parallel_for task so that each task does at least ~2^16 element
// operations: small calls (gradchecks, tiny batches) run on one thread instead
// of paying the thread pool's wake-up, which dominates them.
inline int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinTaskWork = int64_t(1) << 16;
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// Rows [start, end) of segment s, clamped into [0, T] so that bad offsets
// (validation off) never read out of bounds.
template <typename index_t>
inline std::pair<int64_t, int64_t> segment_rows(const index_t* cu, int64_t s, int64_t T) {
  const int64_t start = std::min<int64_t>(std::max<int64_t>(cu[s], 0), T);
  const int64_t end = std::min<int64_t>(std::max<int64_t>(cu[s + 1], start), T);
  return {start, end};
}

// sum(w x) / (sum(w) + eps) per segment (w = 1 without weight); 0 where the
// denominator is 0.
at::Tensor segment_mean_cpu(const at::Tensor& x_in, const at::Tensor& cu_in, const std::optional<at::Tensor>& weight,
                            double eps) {
  check_floating(x_in, "x", 2);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: cu_seqlens must be 1-D with at least one offset, got ",
              cu_in.sizes());
  auto x = x_in.contiguous();
  auto cu_seqlens = cu_in.contiguous();
  const int64_t T = x.size(0), C = x.size(1), S = cu_seqlens.numel() - 1;
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == T), "setok: weight must have shape (T,)");
  const at::Tensor w = weight.has_value() ? weight->to(acc_type(x.scalar_type())).contiguous() : at::Tensor();
  auto out = at::empty({S, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_segment_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    SETOK_DISPATCH_INDEX(cu_seqlens.scalar_type(), "native_segment_mean", [&] {
      const index_t* cu = cu_seqlens.data_ptr<index_t>();
      at::parallel_for(0, S, grain_for(T / std::max<int64_t>(S, 1) * C + C), [&](int64_t s0, int64_t s1) {
        std::vector<acc_t> sum(C);
        for (int64_t s = s0; s < s1; ++s) {
          auto [start, end] = segment_rows(cu, s, T);
          std::fill(sum.begin(), sum.end(), acc_t(0));
          acc_t wsum = 0;
          for (int64_t t = start; t < end; ++t) {
            const scalar_t* row = xp + t * C;
            if (wp == nullptr) {
              for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(row[c]);
            } else {
              const acc_t wt = wp[t];
              wsum += wt;
              for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(row[c]) * wt;
            }
          }
          const acc_t denom = (wp == nullptr ? static_cast<acc_t>(end - start) : wsum) + static_cast<acc_t>(eps);
          for (int64_t c = 0; c < C; ++c) op[s * C + c] = static_cast<scalar_t>(denom != 0 ? sum[c] / denom : acc_t(0));
        }
      });
    });
  });
  return out;
}

at::Tensor segment_mean_backward_cpu(const at::Tensor& grad_in, const at::Tensor& cu_in, int64_t T) {
  check_floating(grad_in, "grad", 2);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: cu_seqlens must be 1-D with at least one offset, got ",
              cu_in.sizes());
  TORCH_CHECK(T >= 0, "setok: num_rows must be >= 0, got ", T);
  auto grad = grad_in.contiguous();
  auto cu_seqlens = cu_in.contiguous();
  const int64_t C = grad.size(1), S = std::min<int64_t>(cu_seqlens.numel() - 1, grad.size(0));
  auto out = at::empty({T, C}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "native_segment_mean_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    SETOK_DISPATCH_INDEX(cu_seqlens.scalar_type(), "native_segment_mean_backward", [&] {
      const index_t* cu = cu_seqlens.data_ptr<index_t>();
      // each row finds its segment (the first s with cu[s + 1] > t): rows are
      // written once each, whatever the offsets
      at::parallel_for(0, T, grain_for(C), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          scalar_t* row = op + t * C;
          const int64_t s = std::upper_bound(cu + 1, cu + S + 1, t, [](int64_t v, index_t e) { return v < e; }) - (cu + 1);
          if (s >= S) {
            std::fill(row, row + C, scalar_t(0));
            continue;
          }
          const acc_t count = static_cast<acc_t>(std::max<int64_t>(cu[s + 1] - cu[s], 1));
          for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(static_cast<acc_t>(gp[s * C + c]) / count);
        }
      });
    });
  });
  return out;
}

// (grad_x, grad_w) of the weighted mean: d out_s / d x_t = w_t / D_s and
// d out_s / d w_t = (x_t - out_s) / D_s. Each segment's mean first, then
// each row finds its segment (as in the plain backward): every row is
// written once, whatever the offsets.
std::tuple<at::Tensor, at::Tensor> segment_mean_weighted_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                      const at::Tensor& cu_in,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      double eps) {
  check_floating(grad_in, "grad", 2);
  check_floating(x_in, "x", 2);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: cu_seqlens must be 1-D with at least one offset, got ",
              cu_in.sizes());
  TORCH_CHECK(grad_in.size(1) == x_in.size(1), "setok: grad must have the channels of x, got ", grad_in.sizes());
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == x_in.size(0)),
              "setok: weight must have shape (T,) = (", x_in.size(0), ",)");
  auto grad = grad_in.contiguous();
  auto x = x_in.contiguous();
  auto cu_seqlens = cu_in.contiguous();
  const int64_t T = x.size(0), C = x.size(1), S = std::min<int64_t>(cu_seqlens.numel() - 1, grad.size(0));
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w = weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
  auto grad_x = at::empty_like(x);
  auto grad_w = at::empty({T}, x.options().dtype(acc));
  auto mean = at::empty({S, C}, x.options().dtype(acc));
  auto inv = at::empty({S}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_segment_mean_weighted_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = inv.data_ptr<acc_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    acc_t* gw = grad_w.data_ptr<acc_t>();
    SETOK_DISPATCH_INDEX(cu_seqlens.scalar_type(), "native_segment_mean_weighted_backward", [&] {
      const index_t* cu = cu_seqlens.data_ptr<index_t>();
      at::parallel_for(0, S, grain_for(T / std::max<int64_t>(S, 1) * C + C), [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
          auto [start, end] = segment_rows(cu, s, T);
          acc_t* m = mp + s * C;
          std::fill(m, m + C, acc_t(0));
          acc_t wsum = 0;
          for (int64_t t = start; t < end; ++t) {
            const acc_t wt = wp == nullptr ? acc_t(1) : wp[t];
            wsum += wt;
            for (int64_t c = 0; c < C; ++c) m[c] += static_cast<acc_t>(xp[t * C + c]) * wt;
          }
          const acc_t denom = wsum + static_cast<acc_t>(eps);
          for (int64_t c = 0; c < C; ++c) m[c] = denom != 0 ? m[c] / denom : acc_t(0);
          ip[s] = denom != 0 ? acc_t(1) / denom : acc_t(0);
        }
      });
      at::parallel_for(0, T, grain_for(C), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          scalar_t* row = gx + t * C;
          const int64_t s = std::upper_bound(cu + 1, cu + S + 1, t, [](int64_t v, index_t e) { return v < e; }) - (cu + 1);
          if (s >= S) {
            std::fill(row, row + C, scalar_t(0));
            gw[t] = 0;
            continue;
          }
          const acc_t wt = wp == nullptr ? acc_t(1) : wp[t];
          acc_t dot = 0;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t g = static_cast<acc_t>(gp[s * C + c]) * ip[s];
            row[c] = static_cast<scalar_t>(g * wt);
            dot += g * (static_cast<acc_t>(xp[t * C + c]) - mp[s * C + c]);
          }
          gw[t] = dot;
        }
      });
    });
  });
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  return {grad_x, grad_w.to(w_dtype)};
}

// ------------------------------------------------------------------ merge_clusters
// Token j is a member of slot l = labels[b, j] when 0 <= l < min(num[b], M).
// With a centre blend, the slot's centre token is kept apart: the sums run
// over the other members, and the centre's count and weight are added back.

struct MergeArgs {
  int64_t B, N, C, M;
  const int64_t* labels;
  const int64_t* num;
  const int64_t* centers;  // nullptr without a blend
  double eps;
};

inline int64_t live_slots(const MergeArgs& a, int64_t b) { return std::min(std::max<int64_t>(a.num[b], 0), a.M); }

inline int64_t centre_of(const MergeArgs& a, int64_t b, int64_t l) {
  return std::min(std::max<int64_t>(a.centers[b * a.M + l], 0), a.N - 1);
}

// Per-slot sums over the non-centre members of image b, channels [c0, c1).
template <typename scalar_t, typename acc_t>
void merge_sums(const MergeArgs& a, const scalar_t* x, const acc_t* w, int64_t b, int64_t c0, int64_t c1,
                std::vector<acc_t>& sum, std::vector<acc_t>& wsum, std::vector<int64_t>& count,
                std::vector<acc_t>& own_w, std::vector<int64_t>& own_n) {
  const int64_t nb = live_slots(a, b), width = c1 - c0;
  sum.assign(nb * width, acc_t(0));
  wsum.assign(nb, acc_t(0));
  count.assign(nb, 0);
  own_w.assign(nb, acc_t(0));
  own_n.assign(nb, 0);
  for (int64_t j = 0; j < a.N; ++j) {
    const int64_t l = a.labels[b * a.N + j];
    if (l < 0 || l >= nb) continue;
    const acc_t wj = w == nullptr ? acc_t(1) : w[b * a.N + j];
    if (a.centers != nullptr && a.centers[b * a.M + l] == j) {
      own_w[l] += wj;
      ++own_n[l];
      continue;
    }
    wsum[l] += wj;
    ++count[l];
    const scalar_t* row = x + (b * a.N + j) * a.C + c0;
    acc_t* s = sum.data() + l * width;
    for (int64_t c = 0; c < width; ++c) s[c] += static_cast<acc_t>(row[c]) * wj;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_clusters_cpu(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& num_in, int64_t M,
    const std::optional<at::Tensor>& weight, double eps, const std::optional<at::Tensor>& centers_in,
    const std::optional<at::Tensor>& center_weight) {
  check_floating(x_in, "x", 3);
  check_index(labels_in, "labels", {x_in.size(0), x_in.size(1)}, x_in);
  check_index(num_in, "num_clusters", {x_in.size(0)}, x_in);
  check_slots(x_in.size(0), M);
  TORCH_CHECK(centers_in.has_value() == center_weight.has_value(), "setok: centers and center_weight go together");
  TORCH_CHECK(!weight.has_value() || weight->sizes() == labels_in.sizes(), "setok: weight must have shape (B, N) of labels");
  if (centers_in.has_value()) {
    check_index(*centers_in, "centers", {x_in.size(0), M}, x_in);
    TORCH_CHECK(center_weight->sizes() == centers_in->sizes(), "setok: center_weight must have the shape of centers");
  }
  auto x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const auto acc = acc_type(x.scalar_type());
  auto labels = labels_in.to(at::kLong).contiguous();
  auto num = num_in.to(at::kLong).contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor centers = centers_in.has_value() ? centers_in->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor blend = center_weight.has_value() ? center_weight->to(acc).contiguous() : at::Tensor();
  auto tokens = at::zeros({B, M, C}, x.options());
  auto key_mask = at::arange(M, num.options()).unsqueeze(0) < num.clamp(0, M).unsqueeze(1);
  auto counts = at::zeros({B, M}, num.options());
  auto weight_sum = at::zeros({B, M}, x.options().dtype(acc));
  const MergeArgs args{B, N, C, M, labels.data_ptr<int64_t>(), num.data_ptr<int64_t>(),
                       centers.defined() ? centers.data_ptr<int64_t>() : nullptr, eps};
  // images split into channel chunks, so that few large images still fill the cores
  constexpr int64_t kChunk = 256;
  const int64_t chunks = std::max<int64_t>(1, (C + kChunk - 1) / kChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_merge_clusters", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* ap = blend.defined() ? blend.data_ptr<acc_t>() : nullptr;
    scalar_t* tp = tokens.data_ptr<scalar_t>();
    int64_t* np = counts.data_ptr<int64_t>();
    acc_t* wsp = weight_sum.data_ptr<acc_t>();
    at::parallel_for(0, B * chunks, grain_for(N * std::min(C, kChunk)), [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> sum, wsum, own_w;
      std::vector<int64_t> count, own_n;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / chunks, c0 = (q % chunks) * kChunk, c1 = std::min(C, c0 + kChunk), width = c1 - c0;
        merge_sums(args, xp, wp, b, c0, c1, sum, wsum, count, own_w, own_n);
        const int64_t nb = live_slots(args, b);
        for (int64_t l = 0; l < nb; ++l) {
          const acc_t denom = wsum[l] + static_cast<acc_t>(eps);
          const acc_t* s = sum.data() + l * width;
          scalar_t* out = tp + (b * M + l) * C + c0;
          if (ap == nullptr) {
            for (int64_t c = 0; c < width; ++c) out[c] = static_cast<scalar_t>(denom != 0 ? s[c] / denom : acc_t(0));
          } else {
            const scalar_t* xc = xp + (b * N + centre_of(args, b, l)) * C + c0;
            const acc_t al = ap[b * M + l];
            for (int64_t c = 0; c < width; ++c) {
              const acc_t mean = denom != 0 ? s[c] / denom : acc_t(0);
              const acc_t centre = static_cast<acc_t>(xc[c]);
              out[c] = static_cast<scalar_t>(count[l] > 0 ? al * centre + (1 - al) * mean : centre);
            }
          }
          if (c0 == 0) {
            np[b * M + l] = count[l] + own_n[l];
            wsp[b * M + l] = wsum[l] + own_w[l];
          }
        }
      }
    });
  });
  return {tokens, key_mask, counts, weight_sum};
}

// A non-centre member j of slot l adds c_l w_j x_j to its token, with
// c_l = (1 - a_l) / D_l (1 / D_l without a blend): grad_x_j = c_l w_j g_l and
// grad_w_j = c_l g_l . (x_j - mean_l) + gws_l; the centre gets a_l g_l (g_l
// when it is its slot's only member), and grad_a_l = g_l . (x_centre - mean_l).
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_clusters_backward_cpu(
    const at::Tensor& grad_tokens_in, const at::Tensor& grad_wsum_in, const at::Tensor& x_in,
    const at::Tensor& labels_in, const at::Tensor& num_in, const std::optional<at::Tensor>& weight, double eps,
    const std::optional<at::Tensor>& centers_in, const std::optional<at::Tensor>& center_weight) {
  check_floating(grad_tokens_in, "grad_tokens", 3);
  check_floating(grad_wsum_in, "grad_weight_sum", 2);
  check_floating(x_in, "x", 3);
  check_index(labels_in, "labels", {x_in.size(0), x_in.size(1)}, x_in);
  check_index(num_in, "num_clusters", {x_in.size(0)}, x_in);
  TORCH_CHECK(grad_tokens_in.size(0) == x_in.size(0) && grad_tokens_in.size(2) == x_in.size(2) &&
                  grad_wsum_in.size(0) == x_in.size(0) && grad_wsum_in.size(1) == grad_tokens_in.size(1),
              "setok: grad_tokens (B, M, C) and grad_weight_sum (B, M) must match x, got ", grad_tokens_in.sizes(), " and ",
              grad_wsum_in.sizes());
  TORCH_CHECK(centers_in.has_value() == center_weight.has_value(), "setok: centers and center_weight go together");
  TORCH_CHECK(!weight.has_value() || weight->sizes() == labels_in.sizes(), "setok: weight must have shape (B, N) of labels");
  if (centers_in.has_value()) {
    check_index(*centers_in, "centers", {x_in.size(0), grad_tokens_in.size(1)}, x_in);
    TORCH_CHECK(center_weight->sizes() == centers_in->sizes(), "setok: center_weight must have the shape of centers");
  }
  auto x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = grad_tokens_in.size(1);
  const auto acc = acc_type(x.scalar_type());
  auto grad_tokens = grad_tokens_in.to(acc).contiguous();
  auto grad_wsum = grad_wsum_in.to(acc).contiguous();
  auto labels = labels_in.to(at::kLong).contiguous();
  auto num = num_in.to(at::kLong).contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor centers = centers_in.has_value() ? centers_in->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor blend = center_weight.has_value() ? center_weight->to(acc).contiguous() : at::Tensor();
  auto grad_x = at::empty({B, N, C}, x.options().dtype(acc));
  auto grad_w = at::empty({B, N}, x.options().dtype(acc));
  auto grad_a = at::zeros({B, M}, x.options().dtype(acc));
  const MergeArgs args{B, N, C, M, labels.data_ptr<int64_t>(), num.data_ptr<int64_t>(),
                       centers.defined() ? centers.data_ptr<int64_t>() : nullptr, eps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_merge_clusters_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* ap = blend.defined() ? blend.data_ptr<acc_t>() : nullptr;
    const acc_t* gp = grad_tokens.data_ptr<acc_t>();
    const acc_t* gwp = grad_wsum.data_ptr<acc_t>();
    acc_t* gx = grad_x.data_ptr<acc_t>();
    acc_t* gw = grad_w.data_ptr<acc_t>();
    acc_t* ga = grad_a.data_ptr<acc_t>();
    at::parallel_for(0, B, grain_for(2 * N * C), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> mean, wsum, own_w, coef;
      std::vector<int64_t> count, own_n;
      for (int64_t b = b0; b < b1; ++b) {
        merge_sums(args, xp, wp, b, 0, C, mean, wsum, count, own_w, own_n);
        const int64_t nb = live_slots(args, b);
        coef.assign(nb, acc_t(0));
        for (int64_t l = 0; l < nb; ++l) {
          const acc_t denom = wsum[l] + static_cast<acc_t>(eps);
          const acc_t inv = denom != 0 ? acc_t(1) / denom : acc_t(0);
          for (int64_t c = 0; c < C; ++c) mean[l * C + c] = denom != 0 ? mean[l * C + c] / denom : acc_t(0);
          coef[l] = ap == nullptr ? inv : inv * (1 - ap[b * M + l]);
        }
        for (int64_t j = 0; j < N; ++j) {
          acc_t* gxj = gx + (b * N + j) * C;
          std::fill(gxj, gxj + C, acc_t(0));
          gw[b * N + j] = 0;
          const int64_t l = args.labels[b * N + j];
          if (l < 0 || l >= nb) continue;
          gw[b * N + j] = gwp[b * M + l];
          if (ap != nullptr && args.centers[b * M + l] == j) continue;
          const acc_t wj = wp == nullptr ? acc_t(1) : wp[b * N + j];
          const scalar_t* xj = xp + (b * N + j) * C;
          const acc_t* g = gp + (b * M + l) * C;
          const acc_t* m = mean.data() + l * C;
          acc_t dot = 0;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gt = g[c] * coef[l];
            gxj[c] = gt * wj;
            dot += gt * (static_cast<acc_t>(xj[c]) - m[c]);
          }
          gw[b * N + j] += dot;
        }
        if (ap == nullptr) continue;
        for (int64_t l = 0; l < nb; ++l) {
          const int64_t centre = centre_of(args, b, l);
          const bool others = count[l] > 0;
          const acc_t scale = others ? ap[b * M + l] : acc_t(1);
          const acc_t* g = gp + (b * M + l) * C;
          const scalar_t* xc = xp + (b * N + centre) * C;
          acc_t* gxc = gx + (b * N + centre) * C;
          acc_t dot = 0;
          for (int64_t c = 0; c < C; ++c) {
            gxc[c] += scale * g[c];
            dot += g[c] * (static_cast<acc_t>(xc[c]) - mean[l * C + c]);
          }
          ga[b * M + l] = others ? dot : acc_t(0);
        }
      }
    });
  });
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  const auto a_dtype = center_weight.has_value() ? center_weight->scalar_type() : acc;
  return {grad_x.to(x.scalar_type()), grad_w.to(w_dtype), grad_a.to(a_dtype)};
}

#ifndef SETOK_SCHEMA_FINGERPRINT
#error "setup.py passes -DSETOK_SCHEMA_FINGERPRINT (the native op schemas this build implements)"
#endif
#define SETOK_STR2(x) #x
#define SETOK_STR(x) SETOK_STR2(x)
// Read from the file by setok_kernels._native_abi before the library is
// loaded: loading a build for other schemas would abort in torch's checks.
[[gnu::used]] const char kSchemaMarker[] = "SETOK_SCHEMA_FINGERPRINT=" SETOK_STR(SETOK_SCHEMA_FINGERPRINT);

// "key=value;..." facts of this build, read by setok_kernels._native.build_info().
std::string build_info() {
  std::string info = "torch=" TORCH_VERSION ";schema=" SETOK_STR(SETOK_SCHEMA_FINGERPRINT);
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
#ifdef SETOK_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_IMPL(setok, CPU, m) {
  m.impl("native_pack_clusters", &pack_clusters_cpu);
  m.impl("native_segment_mean", &segment_mean_cpu);
  m.impl("native_segment_mean_backward", &segment_mean_backward_cpu);
  m.impl("native_segment_mean_weighted_backward", &segment_mean_weighted_backward_cpu);
  m.impl("native_merge_clusters", &merge_clusters_cpu);
  m.impl("native_merge_clusters_backward", &merge_clusters_backward_cpu);
}

TORCH_LIBRARY_IMPL(setok, CompositeExplicitAutograd, m) {
  m.impl("native_build_info", &build_info);
}

}  // namespace setok
