// Shape checks the CPU and CUDA implementations of an importance op share (their device and dtype checks
// differ and stay beside each). Torch headers only; included by csrc/cpu/*.cpp and csrc/cuda/*_binding.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace mas_ext {

// norm_affine_importance_: input and grad_out both (N, P, C), eps >= 0. Returns {N, P, C}.
inline std::array<int64_t, 3> norm_affine_shape(const at::Tensor& input, const at::Tensor& grad_out, double eps) {
  TORCH_CHECK(input.dim() == 3 && input.sizes().equals(grad_out.sizes()),
              "norm_affine_importance_: input and grad_out must both be (N, P, C), got ", input.sizes(), " and ",
              grad_out.sizes());
  TORCH_CHECK(eps >= 0, "norm_affine_importance_: eps must be >= 0, got ", eps);
  return {input.size(0), input.size(1), input.size(2)};
}

}  // namespace mas_ext
