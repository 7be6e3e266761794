// Argument checks and outputs of adapeft::quadratic_fit, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace adapeft {

struct FitCall {
  at::Tensor losses;  // K x M, float32 or float64, any strides
  at::Tensor steps;   // K x M, float32 or float64, any strides
  at::Tensor counts;  // K, float64, contiguous
  at::Tensor b, A, r2, accepted, ppi, eta_star;
};

FitCall prepare_fit(const at::Tensor& losses, const at::Tensor& steps, const at::Tensor& counts,
                    const std::optional<at::Tensor>& appi);

}  // namespace adapeft
