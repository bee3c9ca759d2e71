// Ragged bookkeeping on CPU: pack_clusters (a counting sort of tokens by
// (image, cluster)), segment_mean and its backward; and the library's build
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
  TORCH_CHECK(labels_in.dim() == 2 && M >= 1, "setok: bad pack_clusters arguments");
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

// Rows [start, end) of segment s, clamped into [0, T] so that bad offsets
// (validation off) never read out of bounds.
template <typename index_t>
inline std::pair<int64_t, int64_t> segment_rows(const index_t* cu, int64_t s, int64_t T) {
  const int64_t start = std::min<int64_t>(std::max<int64_t>(cu[s], 0), T);
  const int64_t end = std::min<int64_t>(std::max<int64_t>(cu[s + 1], start), T);
  return {start, end};
}

at::Tensor segment_mean_cpu(const at::Tensor& x_in, const at::Tensor& cu_in) {
  TORCH_CHECK(x_in.dim() == 2 && cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: bad segment_mean arguments");
  auto x = x_in.contiguous();
  auto cu_seqlens = cu_in.contiguous();
  const int64_t T = x.size(0), C = x.size(1), S = cu_seqlens.numel() - 1;
  auto out = at::empty({S, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_segment_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    SETOK_DISPATCH_INDEX(cu_seqlens.scalar_type(), "native_segment_mean", [&] {
      const index_t* cu = cu_seqlens.data_ptr<index_t>();
      at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
        std::vector<acc_t> sum(C);
        for (int64_t s = s0; s < s1; ++s) {
          auto [start, end] = segment_rows(cu, s, T);
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t t = start; t < end; ++t) {
            for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(xp[t * C + c]);
          }
          const acc_t count = static_cast<acc_t>(std::max<int64_t>(end - start, 1));
          for (int64_t c = 0; c < C; ++c) op[s * C + c] = static_cast<scalar_t>(sum[c] / count);
        }
      });
    });
  });
  return out;
}

at::Tensor segment_mean_backward_cpu(const at::Tensor& grad_in, const at::Tensor& cu_in, int64_t T) {
  TORCH_CHECK(grad_in.dim() == 2 && cu_in.dim() == 1 && cu_in.numel() >= 1 && T >= 0,
              "setok: bad segment_mean_backward arguments");
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
      at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
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

// "key=value;..." facts of this build, read by setok_kernels._native.build_info().
std::string build_info() {
  std::string info = "torch=" TORCH_VERSION;
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
}

TORCH_LIBRARY_IMPL(setok, CompositeExplicitAutograd, m) {
  m.impl("native_build_info", &build_info);
}

}  // namespace setok
