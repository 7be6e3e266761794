#include "fit_args.h"

#include <ATen/ops/empty.h>

#include "fit_math.h"

namespace adapeft {
namespace {

at::Tensor as_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

}  // namespace

FitCall prepare_fit(const at::Tensor& losses, const at::Tensor& steps, const at::Tensor& counts,
                    const std::optional<at::Tensor>& appi) {
  TORCH_CHECK(losses.dim() == 2, "adapeft.quadratic_fit: losses must be K x M (groups x points), got shape ",
              losses.sizes());
  const int64_t groups = losses.size(0);
  const int64_t points = losses.size(1);
  TORCH_CHECK(points % 2 == 1 && points >= 3 && points <= kMaxFitPoints,
              "adapeft.quadratic_fit: losses needs an odd number of points between 3 and ", kMaxFitPoints,
              " per group (the middle one unperturbed), got ", points);
  TORCH_CHECK(steps.sizes() == losses.sizes(), "adapeft.quadratic_fit: steps has shape ", steps.sizes(),
              " but losses has shape ", losses.sizes());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == groups, "adapeft.quadratic_fit: counts must have one entry per "
              "group (", groups, "), got shape ", counts.sizes());
  for (const auto& [name, t] : std::initializer_list<std::pair<const char*, const at::Tensor*>>{
           {"losses", &losses}, {"steps", &steps}, {"counts", &counts}}) {
    TORCH_CHECK(t->device() == losses.device(), "adapeft.quadratic_fit: ", name, " is on ", t->device(),
                " but losses is on ", losses.device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()) || (t == &counts && at::isIntegralType(t->scalar_type(), false)),
                "adapeft.quadratic_fit: ", name, " has unsupported dtype ", t->scalar_type());
  }
  if (appi.has_value()) {
    TORCH_CHECK(appi->device() == losses.device(), "adapeft.quadratic_fit: appi is on ", appi->device(),
                " but losses is on ", losses.device());
    TORCH_CHECK(appi->dim() == 1 && appi->size(0) == groups && appi->is_contiguous() &&
                    (appi->scalar_type() == at::kFloat || appi->scalar_type() == at::kDouble),
                "adapeft.quadratic_fit: appi must be a contiguous float32 or float64 vector of ", groups, " groups");
  }
  FitCall call;
  call.losses = as_float_or_double(losses);
  call.steps = as_float_or_double(steps);
  call.counts = counts.to(at::kDouble).contiguous();
  auto real = losses.options().dtype(at::kDouble);
  call.b = at::empty({groups}, real);
  call.A = at::empty({groups}, real);
  call.r2 = at::empty({groups}, real);
  call.accepted = at::empty({groups}, losses.options().dtype(at::kBool));
  call.ppi = at::empty({groups}, real);
  call.eta_star = at::empty({groups}, real);
  return call;
}

}  // namespace adapeft
