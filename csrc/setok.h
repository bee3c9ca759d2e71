// Shared by the CPU and CUDA kernels of setok_kernels._C.
//
// Schemas of the setok::native_* ops are defined in Python
// (setok_kernels/_native.py); C++ only registers implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace setok {

// Distances and segment sums accumulate in float32, or float64 for float64 input.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Bool (B, N) mask of real tokens, materialised when absent.
inline at::Tensor valid_mask(const std::optional<at::Tensor>& mask, const at::Tensor& ref) {
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "setok: mask must be bool");
    return mask->contiguous();
  }
  return at::ones({ref.size(0), ref.size(1)}, ref.options().dtype(at::kBool));
}

// Dispatch over the two index dtypes of cu_seqlens.
#define SETOK_DISPATCH_INDEX(TYPE, NAME, ...)                                   \
  [&] {                                                                         \
    if ((TYPE) == at::kInt) {                                                   \
      using index_t = int32_t;                                                  \
      return __VA_ARGS__();                                                     \
    }                                                                           \
    TORCH_CHECK((TYPE) == at::kLong, NAME ": offsets must be int32 or int64");  \
    using index_t = int64_t;                                                    \
    return __VA_ARGS__();                                                       \
  }()

}  // namespace setok
