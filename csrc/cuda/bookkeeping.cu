// Ragged bookkeeping on CUDA: centre selection, pack_clusters, segment_mean
// and its backward. No host sync (CUDA-graph capturable) and deterministic:
// sums run in a fixed order, sorting is cub's stable radix sort, and the
// kernels use no atomics.
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
template <typename scalar_t>
__global__ void select_centers_kernel(const scalar_t* __restrict__ score, const bool* __restrict__ mask, int64_t N,
                                      scalar_t threshold, int64_t min_clusters, int64_t M, int64_t* __restrict__ centers,
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
  const bool use_threshold = above > 0;
  const int64_t limit = use_threshold || min_clusters > M ? M : min_clusters;
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
    if (chosen) centers[b * M + chosen_before + pos] = i;
    equal_before += equal_total;
    chosen_before += chosen_total;
  }
  for (int64_t p = chosen_before + threadIdx.x; p < M; p += kThreads) centers[b * M + p] = -1;
  if (threadIdx.x == 0) num[b] = chosen_before;
}

std::tuple<at::Tensor, at::Tensor> select_centers_cuda(const at::Tensor& score_in, const std::optional<at::Tensor>& mask,
                                                       double threshold, int64_t min_clusters, int64_t M) {
  TORCH_CHECK(score_in.dim() == 2 && M >= 1 && min_clusters >= 1, "setok: bad select_centers arguments");
  const c10::cuda::CUDAGuard guard(score_in.device());
  auto score = score_in.contiguous();
  at::Tensor valid;
  if (mask.has_value()) valid = mask->contiguous();
  const int64_t B = score.size(0), N = score.size(1);
  auto centers = at::empty({B, M}, score.options().dtype(at::kLong));
  auto num = at::empty({B}, score.options().dtype(at::kLong));
  if (B == 0) return {centers, num};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "native_select_centers", [&] {
    select_centers_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        score.data_ptr<scalar_t>(), valid.defined() ? valid.data_ptr<bool>() : nullptr, N,
        static_cast<scalar_t>(threshold), min_clusters, M, centers.data_ptr<int64_t>(), num.data_ptr<int64_t>());
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
  TORCH_CHECK(labels_in.dim() == 2 && M >= 1, "setok: bad pack_clusters arguments");
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

// grid (S, channel tiles): each thread sums one channel of one segment in row order.
template <typename scalar_t, typename index_t>
__global__ void segment_mean_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ cu, int64_t T,
                                    int64_t C, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = blockIdx.x;
  const int64_t c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  int64_t start, end;
  segment_rows(cu, s, T, start, end);
  acc_t sum = 0;
  for (int64_t t = start; t < end; ++t) sum += static_cast<acc_t>(x[t * C + c]);
  out[s * C + c] = static_cast<scalar_t>(sum / static_cast<acc_t>(max(end - start, int64_t(1))));
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

at::Tensor segment_mean_cuda(const at::Tensor& x_in, const at::Tensor& cu_in) {
  TORCH_CHECK(x_in.dim() == 2 && cu_in.dim() == 1 && cu_in.numel() >= 1, "setok: bad segment_mean arguments");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto cu = cu_in.contiguous();
  const int64_t T = x.size(0), C = x.size(1), S = cu.numel() - 1;
  auto out = at::empty({S, C}, x.options());
  if (S == 0 || C == 0) return out;
  const dim3 grid(static_cast<unsigned>(S), blocks_for(C));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "native_segment_mean", [&] {
    SETOK_DISPATCH_INDEX(cu.scalar_type(), "native_segment_mean", [&] {
      segment_mean_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), cu.data_ptr<index_t>(), T, C, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor segment_mean_backward_cuda(const at::Tensor& grad_in, const at::Tensor& cu_in, int64_t T) {
  TORCH_CHECK(grad_in.dim() == 2 && cu_in.dim() == 1 && cu_in.numel() >= 1 && T >= 0,
              "setok: bad segment_mean_backward arguments");
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

}  // namespace

TORCH_LIBRARY_IMPL(setok, CUDA, m) {
  m.impl("native_select_centers", &select_centers_cuda);
  m.impl("native_pack_clusters", &pack_clusters_cuda);
  m.impl("native_segment_mean", &segment_mean_cuda);
  m.impl("native_segment_mean_backward", &segment_mean_backward_cuda);
}

}  // namespace setok
