// Shared by the CPU and CUDA kernels of setok_kernels._C.
//
// Schemas of the setok::native_* ops are defined in Python
// (setok_kernels/_native.py); C++ only registers implementations.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>

namespace setok {

// Distances and segment sums accumulate in float32, or float64 for float64 input.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Entry-point checks of the native ops: what the kernels rely on, named.
// setok_kernels/_validation.py runs the full checks before any backend; these
// keep a direct call of a setok::native_* op from reading out of bounds.
inline void check_floating(const at::Tensor& t, const char* arg, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "setok: ", arg, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "setok: ", arg, " must be floating, got ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* arg, at::IntArrayRef shape, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "setok: ", arg,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "setok: ", arg, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "setok: ", arg, " is on ", t.device(), ", expected ", ref.device());
}

// B * M cluster slots addressed by int32 offsets.
inline void check_slots(int64_t B, int64_t M) {
  TORCH_CHECK(M >= 1, "setok: max_clusters must be >= 1, got ", M);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max() / std::max<int64_t>(B, 1), "setok: B * max_clusters = ", B, " * ", M,
              " is over the 2^31 - 1 slots int32 offsets address");
}

// A two-valued string argument: true for `second`, false for `first`.
inline bool enum_flag(c10::string_view value, const char* arg, const char* first, const char* second) {
  TORCH_CHECK(value == first || value == second, "setok: ", arg, " must be \"", first, "\" or \"", second,
              "\", got \"", value, "\"");
  return value == second;
}

// Bool (B, N) mask of real tokens, materialised when absent.
inline at::Tensor valid_mask(const std::optional<at::Tensor>& mask, const at::Tensor& ref) {
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "setok: mask must be bool");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == ref.size(0) && mask->size(1) == ref.size(1),
                "setok: mask must have shape (B, N) = (", ref.size(0), ", ", ref.size(1), "), got ", mask->sizes());
    TORCH_CHECK(mask->device() == ref.device(), "setok: mask is on ", mask->device(), ", expected ", ref.device());
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
