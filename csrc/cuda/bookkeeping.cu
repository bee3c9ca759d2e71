// Ragged bookkeeping on CUDA: centre selection, pack_clusters, the weighted
// segment_mean and its backwards, merge_clusters and its backward. No host
// sync (CUDA-graph capturable) and deterministic: sums run in a fixed order,
// sorting is cub's stable radix sort, and the kernels use no atomics.
#include <ATen/OpMathType.h>
// c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS
// and cuSPARSE headers, which a bare nvcc install lacks
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include "../setok.h"

namespace setok {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, (n + threads - 1) / threads));
}

// ------------------------------------------------------------------ select_centers

// Unsigned keys that order like the scores, every NaN above +inf (as a
// descending torch.sort ranks NaN first).
__device__ inline uint32_t order_key(float v) {
  if (isnan(v)) return 0xffffffffu;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ inline uint64_t order_key(double v) {
  if (isnan(v)) return ~uint64_t(0);
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
}

// One block per image. The L highest-ranked candidates (score desc, index
// asc) are found without sorting: a most-significant-bit-first radix select
// finds the L-th largest key and how many of its equals to take, then a
// block scan in index order takes those and writes the centres ascending.
// num_centers > 0: the candidates are all real tokens and L = num_centers.
// by_score: the centres go to `ordered` (B, M) first, then each moves to its
// rank among them (O(L^2 / threads) comparisons, no sort).
template <typename scalar_t>
__global__ void select_centers_kernel(const scalar_t* __restrict__ score, const bool* __restrict__ mask, int64_t N,
                                      scalar_t threshold, int64_t min_clusters, int64_t M, int64_t num_centers,
                                      int64_t* __restrict__ ordered, int64_t* __restrict__ centers,
                                      int64_t* __restrict__ num) {
  using acc_t = at::opmath_type<scalar_t>;
  using key_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  using Reduce = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int shared_count[2];

  const int64_t b = blockIdx.x;
  const scalar_t* s = score + b * N;
  const bool* m = mask == nullptr ? nullptr : mask + b * N;
  const acc_t thr = static_cast<acc_t>(threshold);
  auto is_valid = [&](int64_t i) { return m == nullptr || m[i]; };
  auto is_above = [&](int64_t i) { return is_valid(i) && static_cast<acc_t>(s[i]) > thr; };

  int valid = 0, above = 0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    valid += is_valid(i);
    above += is_above(i);
  }
  valid = Reduce(tmp.reduce).Sum(valid);
  __syncthreads();
  above = Reduce(tmp.reduce).Sum(above);
  if (threadIdx.x == 0) {
    shared_count[0] = valid;
    shared_count[1] = above;
  }
  __syncthreads();
  valid = shared_count[0];
  above = shared_count[1];
  const bool use_threshold = num_centers == 0 && above > 0;
  const int64_t limit = use_threshold ? M : min(num_centers > 0 ? num_centers : min_clusters, M);
  const int64_t candidates = use_threshold ? above : valid;
  auto is_candidate = [&](int64_t i) { return use_threshold ? is_above(i) : is_valid(i); };

  // the L-th largest candidate key, and how many keys equal to it to take
  key_t cut = 0;
  int64_t take_equal = candidates;
  if (candidates > limit) {
    int64_t remaining = limit;
    for (int bit = 8 * sizeof(key_t) - 1; bit >= 0; --bit) {
      const key_t want = (cut >> bit) | key_t(1);
      int c = 0;
      for (int64_t i = threadIdx.x; i < N; i += kThreads) {
        c += is_candidate(i) && (order_key(static_cast<acc_t>(s[i])) >> bit) == want;
      }
      c = Reduce(tmp.reduce).Sum(c);
      if (threadIdx.x == 0) shared_count[0] = c;
      __syncthreads();
      c = shared_count[0];
      __syncthreads();
      if (c >= remaining) {
        cut |= key_t(1) << bit;
      } else {
        remaining -= c;
      }
    }
    take_equal = remaining;
  }

  // chosen tokens in index order: tiles of kThreads, scans carry across tiles
  int64_t* out = ordered != nullptr ? ordered : centers;
  int equal_before = 0, chosen_before = 0;
  for (int64_t base = 0; base < N; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const bool cand = i < N && is_candidate(i);
    const key_t key = cand ? order_key(static_cast<acc_t>(s[i])) : key_t(0);
    const int equal = cand && key == cut;
    int equal_rank, equal_total;
    Scan(tmp.scan).ExclusiveSum(equal, equal_rank, equal_total);
    __syncthreads();
    const int chosen = cand && (candidates <= limit || key > cut || (equal && equal_before + equal_rank < take_equal));
    int pos, chosen_total;
    Scan(tmp.scan).ExclusiveSum(chosen, pos, chosen_total);
    __syncthreads();
    if (chosen) out[b * M + chosen_before + pos] = i;
    equal_before += equal_total;
    chosen_before += chosen_total;
  }
  if (ordered != nullptr) {
    __syncthreads();  // the block's global writes are visible to it after the barrier
    const int64_t* in = ordered + b * M;
    for (int64_t p = threadIdx.x; p < chosen_before; p += kThreads) {
      const key_t key = order_key(static_cast<acc_t>(s[in[p]]));
      int64_t rank = 0;
      for (int64_t q = 0; q < chosen_before; ++q) {
        const key_t other = order_key(static_cast<acc_t>(s[in[q]]));
        rank += other > key || (other == key && q < p);  // `in` is in index order
      }
      centers[b * M + rank] = in[p];
    }
  }
  for (int64_t p = chosen_before + threadIdx.x; p < M; p += kThreads) centers[b * M + p] = -1;
  if (threadIdx.x == 0) num[b] = chosen_before;
}

std::tuple<at::Tensor, at::Tensor> select_centers_cuda(const at::Tensor& score_in, const std::optional<at::Tensor>& mask,
                                                       double threshold, int64_t min_clusters, int64_t M,
                                                       int64_t num_centers, c10::string_view center_order) {
  check_floating(score_in, "score", 2);
  TORCH_CHECK(min_clusters >= 1, "setok: min_clusters must be >= 1, got ", min_clusters);
  check_slots(score_in.size(0), M);
  TORCH_CHECK(num_centers >= 0, "setok: num_centers must be >= 0 (0: the threshold rule), got ", num_centers);
  const bool by_score = enum_flag(center_order, "center_order", "index", "score");
  const c10::cuda::CUDAGuard guard(score_in.device());
  auto score = score_in.contiguous();
  at::Tensor valid;
  if (mask.has_value()) valid = valid_mask(mask, score);
  const int64_t B = score.size(0), N = score.size(1);
  auto centers = at::empty({B, M}, score.options().dtype(at::kLong));
  auto num = at::empty({B}, score.options().dtype(at::kLong));
  if (B == 0) return {centers, num};
  at::Tensor ordered;
  if (by_score) ordered = at::empty({B, M}, centers.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "native_select_centers", [&] {
    select_centers_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        score.data_ptr<scalar_t>(), valid.defined() ? valid.data_ptr<bool>() : nullptr, N,
        static_cast<scalar_t>(threshold), min_clusters, M, num_centers,
        by_score ? ordered.data_ptr<int64_t>() : nullptr, centers.data_ptr<int64_t>(), num.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {centers, num};
}

// ------------------------------------------------------------------ pack_clusters

// Sort key of each token: b * M + label for a packed token (0 <= label <
// num[b]), B * M for the rest, which thus sort to the tail in index order.
__global__ void pack_keys_kernel(const int64_t* __restrict__ labels, const int64_t* __restrict__ num, int64_t B,
                                 int64_t N, int64_t M, int32_t* __restrict__ keys, int64_t* __restrict__ index,
                                 int32_t* __restrict__ num_clamped) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t < B) num_clamped[t] = static_cast<int32_t>(min(max(num[t], int64_t(0)), M));
  if (t >= B * N) return;
  const int64_t b = t / N;
  const int64_t l = labels[t];
  const int64_t nb = min(max(num[b], int64_t(0)), M);
  keys[t] = static_cast<int32_t>(l >= 0 && l < nb ? b * M + l : B * M);
  index[t] = t;
}

__device__ inline int64_t lower_bound(const int32_t* a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Segment (b, m): its length from the sorted keys, placed at its position
// in the output order (live segments of all images first, then the rest).
__global__ void pack_lengths_kernel(const int32_t* __restrict__ sorted_keys, int64_t T, const int32_t* __restrict__ num,
                                    const int32_t* __restrict__ cu_clusters, int64_t B, int64_t M,
                                    int32_t* __restrict__ ordered, int64_t* __restrict__ lengths) {
  const int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (q >= B * M) return;
  const int64_t b = q / M, m = q % M;
  const int64_t len = lower_bound(sorted_keys, T, q + 1) - lower_bound(sorted_keys, T, q);
  const int64_t live_total = cu_clusters[B];
  const int64_t pos = m < num[b] ? cu_clusters[b] + m : live_total + (b * M - cu_clusters[b]) + (m - num[b]);
  ordered[pos] = static_cast<int32_t>(len);
  lengths[q] = len;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_clusters_cuda(const at::Tensor& labels_in,
                                                                              const at::Tensor& num_in, int64_t M) {
  TORCH_CHECK(labels_in.dim() == 2, "setok: labels must be (B, N), got ", labels_in.sizes());
  check_index(labels_in, "labels", labels_in.sizes(), labels_in);
  check_index(num_in, "num_clusters", {labels_in.size(0)}, labels_in);
  check_slots(labels_in.size(0), M);
  const c10::cuda::CUDAGuard guard(labels_in.device());
  auto labels = labels_in.to(at::kLong).contiguous();
  auto num = num_in.to(at::kLong).contiguous();
  const int64_t B = labels.size(0), N = labels.size(1), T = B * N, S = B * M;
  TORCH_CHECK(S < std::numeric_limits<int32_t>::max() && T < std::numeric_limits<int32_t>::max(),
              "setok: pack_clusters needs B * max_clusters and B * N below 2^31");
  auto opts = labels.options();
  auto i32 = opts.dtype(at::kInt);
  auto perm = at::empty({T}, opts);
  auto cu_seqlens = at::zeros({S + 1}, i32);
  auto cu_clusters = at::zeros({B + 1}, i32);
  auto max_seqlen = at::zeros({}, opts);
  if (B == 0) return {perm, cu_seqlens, cu_clusters, max_seqlen};

  auto keys = at::empty({2, T}, i32);
  auto index = at::empty({T}, opts);
  auto num_clamped = at::empty({B}, i32);
  auto ordered = at::empty({S}, i32);
  auto lengths = at::empty({S}, opts);
  int32_t* keys_in = keys.data_ptr<int32_t>();
  int32_t* keys_out = keys_in + T;
  int end_bit = 1;
  while ((int64_t(1) << end_bit) <= S) ++end_bit;  // keys lie in [0, S]

  auto stream = c10::cuda::getCurrentCUDAStream();
  size_t sort_bytes = 0, scan_bytes = 0, scan2_bytes = 0, max_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, keys_out, index.data_ptr<int64_t>(),
                                  perm.data_ptr<int64_t>(), T, 0, end_bit, stream);
  cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, num_clamped.data_ptr<int32_t>(),
                                cu_clusters.data_ptr<int32_t>() + 1, B, stream);
  cub::DeviceScan::InclusiveSum(nullptr, scan2_bytes, ordered.data_ptr<int32_t>(), cu_seqlens.data_ptr<int32_t>() + 1,
                                S, stream);
  cub::DeviceReduce::Max(nullptr, max_bytes, lengths.data_ptr<int64_t>(), max_seqlen.data_ptr<int64_t>(), S, stream);
  auto temp = at::empty({static_cast<int64_t>(std::max({sort_bytes, scan_bytes, scan2_bytes, max_bytes}))},
                        opts.dtype(at::kByte));
  void* tp = temp.data_ptr();

  pack_keys_kernel<<<blocks_for(std::max(T, B)), kThreads, 0, stream>>>(
      labels.data_ptr<int64_t>(), num.data_ptr<int64_t>(), B, N, M, keys_in, index.data_ptr<int64_t>(),
      num_clamped.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // stable: each cluster's tokens keep their ascending index order
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tp, sort_bytes, keys_in, keys_out, index.data_ptr<int64_t>(),
                                                 perm.data_ptr<int64_t>(), T, 0, end_bit, stream));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(tp, scan_bytes, num_clamped.data_ptr<int32_t>(),
                                               cu_clusters.data_ptr<int32_t>() + 1, B, stream));
  pack_lengths_kernel<<<blocks_for(S), kThreads, 0, stream>>>(keys_out, T, num_clamped.data_ptr<int32_t>(),
                                                              cu_clusters.data_ptr<int32_t>(), B, M,
                                                              ordered.data_ptr<int32_t>(), lengths.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(tp, scan2_bytes, ordered.data_ptr<int32_t>(),
                                               cu_seqlens.data_ptr<int32_t>() + 1, S, stream));
  C10_CUDA_CHECK(cub::DeviceReduce::Max(tp, max_bytes, lengths.data_ptr<int64_t>(), max_seqlen.data_ptr<int64_t>(), S,
                                        stream));
  return {perm, cu_seqlens, cu_clusters, max_seqlen};
}

// ------------------------------------------------------------------ segment_mean

// Segment rows clamped into [0, T]: bad offsets never read out of bounds.
template <typename index_t>
__device__ inline void segment_rows(const index_t* cu, int64_t s, int64_t T, int64_t& start, int64_t& end) {
  start = min(max(static_cast<int64_t>(cu[s]), int64_t(0)), T);
  end = min(max(static_cast<int64_t>(cu[s + 1]), start), T);
}

// grid (S, channel tiles): each thread sums one channel of one segment in row
// order: sum(w x) / (sum(w) + eps), w = 1 without weight, 0 where that
// denominator is 0. With `mean` set it writes the accumulation-precision
// mean there and 1 / denominator to `inv` (the weighted backward's first pass).
template <typename scalar_t, typename index_t>
__global__ void segment_mean_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ cu,
                                    const at::opmath_type<scalar_t>* __restrict__ w, at::opmath_type<scalar_t> eps,
                                    int64_t T, int64_t C, scalar_t* __restrict__ out,
                                    at::opmath_type<scalar_t>* __restrict__ mean, at::opmath_type<scalar_t>* __restrict__ inv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = blockIdx.x;
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  int64_t start, end;
  segment_rows(cu, s, T, start, end);
  acc_t sum = 0, wsum = 0;
  for (int64_t t = start; t < end; ++t) {
    if (w == nullptr) {
      sum += static_cast<acc_t>(x[t * C + c]);
    } else {
      sum += static_cast<acc_t>(x[t * C + c]) * w[t];
      wsum += w[t];
    }
  }
  const acc_t denom = (w == nullptr ? static_cast<acc_t>(end - start) : wsum) + eps;
  const acc_t value = denom != 0 ? sum / denom : acc_t(0);
  if (mean == nullptr) {
    out[s * C + c] = static_cast<scalar_t>(value);
    return;
  }
  mean[s * C + c] = value;
  if (c == 0) inv[s] = denom != 0 ? acc_t(1) / denom : acc_t(0);
}

// One block per row t of the weighted backward: with s its segment (the first
// with cu[s + 1] > t), grad_x = w_t g_s / D_s and grad_w = g_s . (x_t - mean_s) / D_s.
template <typename scalar_t, typename index_t>
__global__ void segment_mean_weighted_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                      const index_t* __restrict__ cu,
                                                      const at::opmath_type<scalar_t>* __restrict__ w,
                                                      const at::opmath_type<scalar_t>* __restrict__ mean,
                                                      const at::opmath_type<scalar_t>* __restrict__ inv, int64_t S,
                                                      int64_t C, scalar_t* __restrict__ grad_x,
                                                      at::opmath_type<scalar_t>* __restrict__ grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t t = blockIdx.x;
  int64_t lo = 0, hi = S;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(cu[mid + 1]) > t) hi = mid; else lo = mid + 1;
  }
  const bool inside = lo < S;
  const acc_t wt = w == nullptr ? acc_t(1) : w[t];
  acc_t dot = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    acc_t gx = 0;
    if (inside) {
      const acc_t g = static_cast<acc_t>(grad[lo * C + c]) * inv[lo];
      gx = g * wt;
      dot += g * (static_cast<acc_t>(x[t * C + c]) - mean[lo * C + c]);
    }
    grad_x[t * C + c] = static_cast<scalar_t>(gx);
  }
  dot = Reduce(tmp).Sum(dot);
  if (threadIdx.x == 0) grad_w[t] = dot;
}

// grid (T, channel tiles): row t takes grad[s] / count of its segment s (the
// first with cu[s + 1] > t), or 0 past the last segment.
template <typename scalar_t, typename index_t>
__global__ void segment_mean_backward_kernel(const scalar_t* __restrict__ grad, const index_t* __restrict__ cu,
                                             int64_t S, int64_t C, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  int64_t lo = 0, hi = S;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(cu[mid + 1]) > t) hi = mid; else lo = mid + 1;
  }
  acc_t v = 0;
  if (lo < S) {
    const int64_t count = max(static_cast<int64_t>(cu[lo + 1]) - static_cast<int64_t>(cu[lo]), int64_t(1));
    v = static_cast<acc_t>(grad[lo * C + c]) / static_cast<acc_t>(count);
  }
  out[t * C + c] = static_cast<scalar_t>(v);
}

at::Tensor segment_mean_cuda(const at::Tensor& x_in, const at::Tensor& cu_in, const std::optional<at::Tensor>& weight,
                             double eps) {
  check_floating(x_in, "x", 2);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: cu_seqlens must be 1-D with at least one offset, got ",
              cu_in.sizes());
  TORCH_CHECK(cu_in.device() == x_in.device(), "setok: cu_seqlens is on ", cu_in.device(), ", expected ", x_in.device());
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == x_in.size(0) &&
                                      weight->device() == x_in.device()),
              "setok: weight must be (T,) on the device of x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto cu = cu_in.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(acc_type(x.scalar_type())).contiguous() : at::Tensor();
  const int64_t T = x.size(0), C = x.size(1), S = cu.numel() - 1;
  auto out = at::empty({S, C}, x.options());
  if (S == 0 || C == 0) return out;
  const dim3 grid(static_cast<unsigned>(S), blocks_for(C));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_segment_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SETOK_DISPATCH_INDEX(cu.scalar_type(), "native_segment_mean", [&] {
      segment_mean_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), w.defined() ? w.data_ptr<acc_t>() : nullptr,
          static_cast<acc_t>(eps), T, C, out.data_ptr<scalar_t>(), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> segment_mean_weighted_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                       const at::Tensor& cu_in,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       double eps) {
  check_floating(grad_in, "grad", 2);
  check_floating(x_in, "x", 2);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: cu_seqlens must be 1-D with at least one offset, got ",
              cu_in.sizes());
  TORCH_CHECK(cu_in.device() == x_in.device() && grad_in.device() == x_in.device(),
              "setok: grad, x and cu_seqlens must share one device");
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == x_in.size(0) &&
                                      weight->device() == x_in.device()),
              "setok: weight must be (T,) on the device of x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto grad = grad_in.to(x_in.scalar_type()).contiguous();
  auto x = x_in.contiguous();
  auto cu = cu_in.contiguous();
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w = weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
  const int64_t T = x.size(0), C = x.size(1), S = std::min<int64_t>(cu.numel() - 1, grad.size(0));
  auto grad_x = at::empty_like(x);
  auto grad_w = at::zeros({T}, x.options().dtype(acc));
  auto mean = at::empty({S, C}, x.options().dtype(acc));
  auto inv = at::empty({S}, x.options().dtype(acc));
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  if (T == 0 || C == 0) return {grad_x, grad_w.to(w_dtype)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_segment_mean_weighted_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SETOK_DISPATCH_INDEX(cu.scalar_type(), "native_segment_mean_weighted_backward", [&] {
      const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
      if (S > 0) {
        segment_mean_kernel<scalar_t, index_t><<<dim3(static_cast<unsigned>(S), blocks_for(C)), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), wp, static_cast<acc_t>(eps), T, C, nullptr,
            mean.data_ptr<acc_t>(), inv.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      segment_mean_weighted_backward_kernel<scalar_t, index_t><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), wp, mean.data_ptr<acc_t>(),
          inv.data_ptr<acc_t>(), S, C, grad_x.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_w.to(w_dtype)};
}

at::Tensor segment_mean_backward_cuda(const at::Tensor& grad_in, const at::Tensor& cu_in, int64_t T) {
  check_floating(grad_in, "grad", 2);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: cu_seqlens must be 1-D with at least one offset, got ",
              cu_in.sizes());
  TORCH_CHECK(cu_in.device() == grad_in.device(), "setok: cu_seqlens is on ", cu_in.device(), ", expected ", grad_in.device());
  TORCH_CHECK(T >= 0, "setok: num_rows must be >= 0, got ", T);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  auto grad = grad_in.contiguous();
  auto cu = cu_in.contiguous();
  const int64_t C = grad.size(1), S = std::min<int64_t>(cu.numel() - 1, grad.size(0));
  auto out = at::empty({T, C}, grad.options());
  if (T == 0 || C == 0) return out;
  const dim3 grid(static_cast<unsigned>(T), blocks_for(C));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "native_segment_mean_backward", [&] {
    SETOK_DISPATCH_INDEX(cu.scalar_type(), "native_segment_mean_backward", [&] {
      segment_mean_backward_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), S, C, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// ------------------------------------------------------------------ merge_clusters
// Token j is a member of slot l = labels[b, j] when 0 <= l < min(num[b], M).
// With a centre blend the slot's centre token is kept apart: the sums run
// over the other members (see setok_kernels/reference.py, _merge_parts).
// Every output element is written by one thread, summing in token order:
// deterministic, no atomics.

__device__ inline int64_t live_slots(const int64_t* num, int64_t b, int64_t M) {
  return min(max(num[b], int64_t(0)), M);
}

// grid (B * M, channel tiles): one thread per (slot, channel) walks the image's
// labels. Writes the merged token (forward) or, with `mean` set, the
// accumulation-precision mean of the non-centre members, the per-slot
// coefficient c_l (the backward's first pass) and each centre's slot.
template <typename scalar_t>
__global__ void merge_slots_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                   const int64_t* __restrict__ num, const at::opmath_type<scalar_t>* __restrict__ w,
                                   const int64_t* __restrict__ centers, const at::opmath_type<scalar_t>* __restrict__ blend,
                                   at::opmath_type<scalar_t> eps, int64_t N, int64_t C, int64_t M,
                                   scalar_t* __restrict__ tokens, int64_t* __restrict__ counts,
                                   at::opmath_type<scalar_t>* __restrict__ weight_sum,
                                   at::opmath_type<scalar_t>* __restrict__ mean, at::opmath_type<scalar_t>* __restrict__ coef,
                                   int64_t* __restrict__ others, int64_t* __restrict__ centre_slot) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t q = blockIdx.x, b = q / M, l = q % M;
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (l >= live_slots(num, b, M)) return;
  const bool first = blockIdx.y == 0 && threadIdx.x == 0;
  const int64_t centre = centers == nullptr ? -1 : min(max(centers[q], int64_t(0)), N - 1);
  acc_t sum = 0, wsum = 0, own_w = 0;
  int64_t count = 0, own_n = 0;
  for (int64_t j = 0; j < N; ++j) {
    if (labels[b * N + j] != l) continue;
    const acc_t wj = w == nullptr ? acc_t(1) : w[b * N + j];
    if (centers != nullptr && centers[q] == j) {
      own_w += wj;
      ++own_n;
      continue;
    }
    wsum += wj;
    ++count;
    if (c < C) sum += static_cast<acc_t>(x[(b * N + j) * C + c]) * wj;
  }
  const acc_t denom = wsum + eps;
  const acc_t avg = denom != 0 ? sum / denom : acc_t(0);
  if (mean != nullptr) {
    if (c < C) mean[q * C + c] = avg;
    if (first) {
      const acc_t inv = denom != 0 ? acc_t(1) / denom : acc_t(0);
      coef[q] = blend == nullptr ? inv : inv * (1 - blend[q]);
      others[q] = count;
      if (centers != nullptr) centre_slot[b * N + centre] = l;
    }
    return;
  }
  if (c < C) {
    acc_t value = avg;
    if (blend != nullptr) {
      const acc_t xc = static_cast<acc_t>(x[(b * N + centre) * C + c]);
      value = count > 0 ? blend[q] * xc + (1 - blend[q]) * avg : xc;
    }
    tokens[q * C + c] = static_cast<scalar_t>(value);
  }
  if (first) {
    counts[q] = count + own_n;
    weight_sum[q] = wsum + own_w;
  }
}

// One block per token j of image b. As a non-centre member of slot l:
// grad_x = c_l w_j g_l, grad_w = c_l g_l . (x_j - mean_l) + gws_l; as the
// centre of slot k: grad_x += a_k g_k (g_k when it is the slot's only member)
// and grad_a_k = g_k . (x_j - mean_k).
template <typename scalar_t>
__global__ void merge_tokens_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_tokens,
                                             const at::opmath_type<scalar_t>* __restrict__ grad_wsum,
                                             const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                             const int64_t* __restrict__ num, const at::opmath_type<scalar_t>* __restrict__ w,
                                             const int64_t* __restrict__ centers,
                                             const at::opmath_type<scalar_t>* __restrict__ blend,
                                             const at::opmath_type<scalar_t>* __restrict__ mean,
                                             const at::opmath_type<scalar_t>* __restrict__ coef,
                                             const int64_t* __restrict__ others, const int64_t* __restrict__ centre_slot,
                                             int64_t N, int64_t C, int64_t M, scalar_t* __restrict__ grad_x,
                                             at::opmath_type<scalar_t>* __restrict__ grad_w,
                                             at::opmath_type<scalar_t>* __restrict__ grad_a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t t = blockIdx.x, b = t / N, j = t % N;
  const int64_t nb = live_slots(num, b, M);
  const int64_t l = labels[t];
  const bool member = l >= 0 && l < nb;
  const bool as_other = member && !(centers != nullptr && centers[b * M + l] == j);
  const int64_t k = centers == nullptr ? -1 : centre_slot[t];
  const bool as_centre = k >= 0 && k < nb;
  const acc_t wj = w == nullptr ? acc_t(1) : w[t];
  const acc_t scale = as_centre ? (others[b * M + k] > 0 ? blend[b * M + k] : acc_t(1)) : acc_t(0);
  acc_t dot = 0, dot_centre = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t xv = static_cast<acc_t>(x[t * C + c]);
    acc_t gx = 0;
    if (as_other) {
      const acc_t g = grad_tokens[(b * M + l) * C + c] * coef[b * M + l];
      gx = g * wj;
      dot += g * (xv - mean[(b * M + l) * C + c]);
    }
    if (as_centre) {
      const acc_t g = grad_tokens[(b * M + k) * C + c];
      gx += scale * g;
      dot_centre += g * (xv - mean[(b * M + k) * C + c]);
    }
    grad_x[t * C + c] = static_cast<scalar_t>(gx);
  }
  dot = Reduce(tmp).Sum(dot);
  __syncthreads();
  dot_centre = Reduce(tmp).Sum(dot_centre);
  if (threadIdx.x == 0) {
    grad_w[t] = member ? grad_wsum[b * M + l] + (as_other ? dot : acc_t(0)) : acc_t(0);
    if (as_centre && others[b * M + k] > 0) grad_a[b * M + k] = dot_centre;
  }
}

struct MergeInputs {
  at::Tensor x, labels, num, w, centers, blend;
};

MergeInputs merge_inputs(const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& num_in, int64_t M,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& centers,
                         const std::optional<at::Tensor>& center_weight) {
  check_floating(x_in, "x", 3);
  const int64_t B = x_in.size(0), N = x_in.size(1);
  check_index(labels_in, "labels", {B, N}, x_in);
  check_index(num_in, "num_clusters", {B}, x_in);
  check_slots(B, M);
  TORCH_CHECK(centers.has_value() == center_weight.has_value(), "setok: centers and center_weight go together");
  const auto acc = acc_type(x_in.scalar_type());
  MergeInputs in{x_in.contiguous(), labels_in.to(at::kLong).contiguous(), num_in.to(at::kLong).contiguous()};
  if (weight.has_value()) {
    TORCH_CHECK(weight->sizes() == labels_in.sizes() && weight->device() == x_in.device(),
                "setok: weight must be (B, N) on the device of x");
    in.w = weight->to(acc).contiguous();
  }
  if (centers.has_value()) {
    check_index(*centers, "centers", {B, M}, x_in);
    TORCH_CHECK(center_weight->sizes() == centers->sizes() && center_weight->device() == x_in.device(),
                "setok: center_weight must be (B, M) on the device of x");
    in.centers = centers->to(at::kLong).contiguous();
    in.blend = center_weight->to(acc).contiguous();
  }
  return in;
}

template <typename T>
inline T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_clusters_cuda(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& num_in, int64_t M,
    const std::optional<at::Tensor>& weight, double eps, const std::optional<at::Tensor>& centers,
    const std::optional<at::Tensor>& center_weight) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const MergeInputs in = merge_inputs(x_in, labels_in, num_in, M, weight, centers, center_weight);
  const int64_t B = in.x.size(0), N = in.x.size(1), C = in.x.size(2);
  const auto acc = acc_type(in.x.scalar_type());
  auto tokens = at::zeros({B, M, C}, in.x.options());
  auto key_mask = at::arange(M, in.num.options()).unsqueeze(0) < in.num.clamp(0, M).unsqueeze(1);
  auto counts = at::zeros({B, M}, in.num.options());
  auto weight_sum = at::zeros({B, M}, in.x.options().dtype(acc));
  if (B == 0) return {tokens, key_mask, counts, weight_sum};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "native_merge_clusters", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    merge_slots_kernel<scalar_t><<<dim3(static_cast<unsigned>(B * M), blocks_for(C)), kThreads, 0, stream>>>(
        in.x.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(), in.num.data_ptr<int64_t>(), ptr_or_null<acc_t>(in.w),
        ptr_or_null<int64_t>(in.centers), ptr_or_null<acc_t>(in.blend), static_cast<acc_t>(eps), N, C, M,
        tokens.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), weight_sum.data_ptr<acc_t>(), nullptr, nullptr,
        nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tokens, key_mask, counts, weight_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_clusters_backward_cuda(
    const at::Tensor& grad_tokens_in, const at::Tensor& grad_wsum_in, const at::Tensor& x_in,
    const at::Tensor& labels_in, const at::Tensor& num_in, const std::optional<at::Tensor>& weight, double eps,
    const std::optional<at::Tensor>& centers, const std::optional<at::Tensor>& center_weight) {
  check_floating(grad_tokens_in, "grad_tokens", 3);
  check_floating(grad_wsum_in, "grad_weight_sum", 2);
  const int64_t M = grad_tokens_in.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const MergeInputs in = merge_inputs(x_in, labels_in, num_in, M, weight, centers, center_weight);
  const int64_t B = in.x.size(0), N = in.x.size(1), C = in.x.size(2);
  TORCH_CHECK(grad_tokens_in.size(0) == B && grad_tokens_in.size(2) == C && grad_wsum_in.size(0) == B &&
                  grad_wsum_in.size(1) == M,
              "setok: merge_clusters_backward gradients must be (B, M, C) and (B, M)");
  const auto acc = acc_type(in.x.scalar_type());
  auto grad_tokens = grad_tokens_in.to(acc).contiguous();
  auto grad_wsum = grad_wsum_in.to(acc).contiguous();
  auto grad_x = at::empty_like(in.x);
  auto grad_w = at::empty({B, N}, in.x.options().dtype(acc));
  auto grad_a = at::zeros({B, M}, in.x.options().dtype(acc));
  auto mean = at::empty({B, M, C}, in.x.options().dtype(acc));
  auto coef = at::empty({B, M}, in.x.options().dtype(acc));
  auto others = at::zeros({B, M}, in.num.options());
  auto centre_slot = at::full({B, N}, -1, in.num.options());
  const auto w_dtype = weight.has_value() ? weight->scalar_type() : x_in.scalar_type();
  const auto a_dtype = center_weight.has_value() ? center_weight->scalar_type() : acc;
  if (B * N > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "native_merge_clusters_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* wp = ptr_or_null<acc_t>(in.w);
      const int64_t* cp = ptr_or_null<int64_t>(in.centers);
      const acc_t* ap = ptr_or_null<acc_t>(in.blend);
      merge_slots_kernel<scalar_t><<<dim3(static_cast<unsigned>(B * M), blocks_for(C)), kThreads, 0, stream>>>(
          in.x.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(), in.num.data_ptr<int64_t>(), wp, cp, ap,
          static_cast<acc_t>(eps), N, C, M, nullptr, nullptr, nullptr, mean.data_ptr<acc_t>(), coef.data_ptr<acc_t>(),
          others.data_ptr<int64_t>(), centre_slot.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_tokens_backward_kernel<scalar_t><<<static_cast<unsigned>(B * N), kThreads, 0, stream>>>(
          grad_tokens.data_ptr<acc_t>(), grad_wsum.data_ptr<acc_t>(), in.x.data_ptr<scalar_t>(),
          in.labels.data_ptr<int64_t>(), in.num.data_ptr<int64_t>(), wp, cp, ap, mean.data_ptr<acc_t>(),
          coef.data_ptr<acc_t>(), others.data_ptr<int64_t>(), centre_slot.data_ptr<int64_t>(), N, C, M,
          grad_x.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>(), grad_a.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_x, grad_w.to(w_dtype), grad_a.to(a_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(setok, CUDA, m) {
  m.impl("native_select_centers", &select_centers_cuda);
  m.impl("native_pack_clusters", &pack_clusters_cuda);
  m.impl("native_segment_mean", &segment_mean_cuda);
  m.impl("native_segment_mean_backward", &segment_mean_backward_cuda);
  m.impl("native_segment_mean_weighted_backward", &segment_mean_weighted_backward_cuda);
  m.impl("native_merge_clusters", &merge_clusters_cuda);
  m.impl("native_merge_clusters_backward", &merge_clusters_backward_cuda);
}

}  // namespace setok
