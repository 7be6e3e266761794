// The per-group quadratic fit, shared by the CPU and CUDA kernels of adapeft::quadratic_fit.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace adapeft {

constexpr int kMaxFitPoints = 15;

struct FitResult {
  double b;
  double A;
  double r2;
  double ppi;
  double eta_star;
  bool accepted;
};

// Least squares of y = -x*b + x^2/2*A (no intercept) with y the loss minus the middle column's,
// in float64. R^2 is scikit-learn's r2_score(y, y_hat) over all points: 1 - SS_res/SS_tot, and
// for constant y 1.0 if the fit is exact, else 0.0. A row is accepted when b > 0, A > 0,
// R^2 > threshold, the group has elements and everything, PPI included, is finite.
template <typename LossAt, typename StepAt>
C10_HOST_DEVICE inline FitResult fit_row(LossAt loss, StepAt step, int points, double count, double threshold) {
  const int mid = points / 2;
  const double base = loss(mid);
  double spp = 0, sqq = 0, spq = 0, spy = 0, sqy = 0, sy = 0;
  double y[kMaxFitPoints];
  double x[kMaxFitPoints];
  for (int j = 0; j < points; ++j) {
    x[j] = step(j);
    y[j] = loss(j) - base;
    const double p = -x[j];
    const double q = 0.5 * x[j] * x[j];
    spp += p * p;
    sqq += q * q;
    spq += p * q;
    spy += p * y[j];
    sqy += q * y[j];
    sy += y[j];
  }
  const double det = spp * sqq - spq * spq;
  FitResult r;
  r.b = (spy * sqq - sqy * spq) / det;
  r.A = (sqy * spp - spy * spq) / det;
  const double mean = sy / points;
  double ss_res = 0, ss_tot = 0;
  for (int j = 0; j < points; ++j) {
    const double fitted = -x[j] * r.b + 0.5 * x[j] * x[j] * r.A;
    ss_res += (y[j] - fitted) * (y[j] - fitted);
    ss_tot += (y[j] - mean) * (y[j] - mean);
  }
  if (ss_res == 0) {
    r.r2 = 1.0;
  } else if (ss_tot == 0) {
    r.r2 = 0.0;
  } else {
    r.r2 = 1.0 - ss_res / ss_tot;
  }
  // NaN compares false, so non-finite inputs fail the sign tests; infinities are excluded by name.
  const double ppi = r.b * r.b / (r.A * count);
  r.accepted = r.b > 0 && r.A > 0 && r.r2 > threshold && count > 0 && std::isfinite(r.b) && std::isfinite(r.A) &&
               std::isfinite(r.r2) && std::isfinite(ss_res) && std::isfinite(ppi);
  r.ppi = r.accepted ? ppi : 0.0;
  r.eta_star = r.accepted ? r.b / r.A : NAN;
  return r;
}

}  // namespace adapeft
