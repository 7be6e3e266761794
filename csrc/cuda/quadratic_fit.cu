// CUDA kernel of adapeft::quadratic_fit: one thread per group, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fit_args.h"
#include "fit_math.h"

namespace adapeft {
namespace {

struct FitOutputs {
  double* b;
  double* A;
  double* r2;
  bool* accepted;
  double* ppi;
  double* eta_star;
};

template <typename L, typename S, typename P>
__global__ void quadratic_fit_kernel(const L* losses, int64_t loss_row, int64_t loss_col, const S* steps,
                                     int64_t step_row, int64_t step_col, const double* counts, int64_t groups,
                                     int points, double threshold, P* appi, FitOutputs out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < groups;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const FitResult r = fit_row([&](int j) { return static_cast<double>(losses[k * loss_row + j * loss_col]); },
                                [&](int j) { return static_cast<double>(steps[k * step_row + j * step_col]); },
                                points, counts[k], threshold);
    out.b[k] = r.b;
    out.A[k] = r.A;
    out.r2[k] = r.r2;
    out.accepted[k] = r.accepted;
    out.ppi[k] = r.ppi;
    out.eta_star[k] = r.eta_star;
    if (appi != nullptr && r.accepted) appi[k] += static_cast<P>(r.ppi);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quadratic_fit_cuda(
    const at::Tensor& losses, const at::Tensor& steps, const at::Tensor& counts, const std::optional<at::Tensor>& appi,
    double r2_threshold) {
  const c10::cuda::CUDAGuard guard(losses.device());
  FitCall call = prepare_fit(losses, steps, counts, appi);
  const int64_t groups = call.losses.size(0);
  if (groups == 0) return {call.b, call.A, call.r2, call.accepted, call.ppi, call.eta_star};
  const int points = static_cast<int>(call.losses.size(1));
  const FitOutputs out{call.b.data_ptr<double>(),  call.A.data_ptr<double>(),   call.r2.data_ptr<double>(),
                       call.accepted.data_ptr<bool>(), call.ppi.data_ptr<double>(), call.eta_star.data_ptr<double>()};
  constexpr int kThreads = 128;
  const int64_t max_blocks = 32LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((groups + kThreads - 1) / kThreads, max_blocks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(call.losses.scalar_type(), "adapeft.quadratic_fit", [&] {
    using loss_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(call.steps.scalar_type(), "adapeft.quadratic_fit", [&] {
      using step_t = scalar_t;
      const auto launch = [&](auto* total) {
        quadratic_fit_kernel<<<blocks, kThreads, 0, stream>>>(
            call.losses.data_ptr<loss_t>(), call.losses.stride(0), call.losses.stride(1),
            call.steps.data_ptr<step_t>(), call.steps.stride(0), call.steps.stride(1),
            call.counts.data_ptr<double>(), groups, points, r2_threshold, total, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (!appi.has_value()) {
        launch(static_cast<double*>(nullptr));
      } else if (appi->scalar_type() == at::kFloat) {
        launch(appi->data_ptr<float>());
      } else {
        launch(appi->data_ptr<double>());
      }
    });
  });
  return {call.b, call.A, call.r2, call.accepted, call.ppi, call.eta_star};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CUDA, m) { m.impl("quadratic_fit", &quadratic_fit_cuda); }

}  // namespace adapeft
