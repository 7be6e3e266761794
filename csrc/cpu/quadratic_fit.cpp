// CPU kernel of adapeft::quadratic_fit: one fit per group, groups in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fit_args.h"
#include "fit_math.h"

namespace adapeft {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quadratic_fit_cpu(
    const at::Tensor& losses, const at::Tensor& steps, const at::Tensor& counts, const std::optional<at::Tensor>& appi,
    double r2_threshold) {
  FitCall call = prepare_fit(losses, steps, counts, appi);
  const int64_t groups = call.losses.size(0);
  const int points = static_cast<int>(call.losses.size(1));
  const double* count = call.counts.data_ptr<double>();
  double* b = call.b.data_ptr<double>();
  double* A = call.A.data_ptr<double>();
  double* r2 = call.r2.data_ptr<double>();
  bool* accepted = call.accepted.data_ptr<bool>();
  double* ppi = call.ppi.data_ptr<double>();
  double* eta_star = call.eta_star.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(call.losses.scalar_type(), "adapeft.quadratic_fit", [&] {
    using loss_t = scalar_t;
    const loss_t* loss_data = call.losses.data_ptr<loss_t>();
    const int64_t loss_row = call.losses.stride(0), loss_col = call.losses.stride(1);
    AT_DISPATCH_FLOATING_TYPES(call.steps.scalar_type(), "adapeft.quadratic_fit", [&] {
      const scalar_t* step_data = call.steps.data_ptr<scalar_t>();
      const int64_t step_row = call.steps.stride(0), step_col = call.steps.stride(1);
      at::parallel_for(0, groups, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const FitResult r = fit_row(
              [&](int j) { return static_cast<double>(loss_data[k * loss_row + j * loss_col]); },
              [&](int j) { return static_cast<double>(step_data[k * step_row + j * step_col]); }, points, count[k],
              r2_threshold);
          b[k] = r.b;
          A[k] = r.A;
          r2[k] = r.r2;
          accepted[k] = r.accepted;
          ppi[k] = r.ppi;
          eta_star[k] = r.eta_star;
        }
      });
    });
  });
  if (appi.has_value() && groups > 0) {
    AT_DISPATCH_FLOATING_TYPES(appi->scalar_type(), "adapeft.quadratic_fit", [&] {
      scalar_t* total = appi->data_ptr<scalar_t>();
      for (int64_t k = 0; k < groups; ++k) {
        if (accepted[k]) total[k] += static_cast<scalar_t>(ppi[k]);
      }
    });
  }
  return {call.b, call.A, call.r2, call.accepted, call.ppi, call.eta_star};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("quadratic_fit", &quadratic_fit_cpu); }

}  // namespace adapeft
