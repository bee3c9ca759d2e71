// Varlen attention on CPU, segment by segment: the loop of the torch backend
// (setok_kernels/attention_backends.py) over the segments it calls one at a
// time, each a call of torch's fused CPU flash-attention kernel on views.
// In C++ the loop costs no interpreter time per segment: at B=4, N=576,
// D=128 (one thread) the forward went from 0.98x to 1.05x-1.10x the speed of
// a per-segment SDPA loop. The kernel calls, and so the results, are the
// Python loop's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../setok.h"

namespace setok {
namespace {

// q (Tq, H, D), k and v (Tk, H, D); segments (S, 4) int64 on the host, rows
// [a, b) of the queries against rows [c, d) of the keys, each non-empty.
// Writes the segments' rows of out (Tq' >= Tq rows, H, D) and their columns
// of lse (H, Tq'); other rows are left as they are.
void attention_segments_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse, const at::Tensor& segments, double scale) {
  check_floating(q, "q", 3);
  check_floating(k, "k", 3);
  check_floating(v, "v", 3);
  check_floating(out, "out", 3);
  check_floating(lse, "lse", 2);
  TORCH_CHECK(k.sizes() == v.sizes(), "setok: k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) == q.size(1) && k.size(2) == q.size(2), "setok: k must be (Tk, ", q.size(1), ", ", q.size(2),
              "), got ", k.sizes());
  TORCH_CHECK(out.size(0) >= q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2), "setok: out must be (>= ",
              q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ", out.sizes());
  TORCH_CHECK(lse.size(0) == q.size(1) && lse.size(1) == out.size(0), "setok: lse must be (", q.size(1), ", ",
              out.size(0), "), got ", lse.sizes());
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 4 && segments.scalar_type() == at::kLong && segments.is_cpu(),
              "setok: segments must be an (S, 4) int64 CPU tensor, got ", segments.sizes(), " ",
              segments.scalar_type(), " on ", segments.device());
  const auto heads_view = [](const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); };  // (1, H, T, D)
  const at::Tensor qh = heads_view(q), kh = heads_view(k), vh = heads_view(v), oh = heads_view(out);
  const at::Tensor bounds = segments.contiguous();
  const int64_t* s = bounds.data_ptr<int64_t>();
  for (int64_t i = 0; i < bounds.size(0); ++i) {
    const int64_t a = s[4 * i], b = s[4 * i + 1], c = s[4 * i + 2], d = s[4 * i + 3];
    TORCH_CHECK(0 <= a && a < b && b <= q.size(0) && 0 <= c && c < d && d <= k.size(0), "setok: segments[", i,
                "] = (", a, ", ", b, ", ", c, ", ", d, ") is empty or outside q (", q.size(0), " rows) or k (", k.size(0),
                " rows)");
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
        qh.narrow(2, a, b - a), kh.narrow(2, c, d - c), vh.narrow(2, c, d - c), 0.0, false, std::nullopt, scale);
    oh.narrow(2, a, b - a).copy_(o);
    lse.narrow(1, a, b - a).copy_(l[0]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(setok, CPU, m) {
  m.impl("native_attention_segments", &attention_segments_cpu);
}

}  // namespace setok
