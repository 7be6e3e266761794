"""What a measurement tells of each group: the fit, whether the group really moved, the loss's noise, how well
its curvature is resolved, and the verdict that says why a fit was kept or not."""
import math
from dataclasses import dataclass

import torch

from ..ops import layout as L
from .. import fit as fits
from .. import ops
from .. import steps as step_rules
from .result import VERDICT

RELIABLE_CHANGED_SHARE = 0.5
# ... or the realized step along the direction (weighted by d^2, so elements whose direction is zero, such as
# an embedding's unused rows, count for nothing) within this share of the nominal one at every point.
RELIABLE_STEP_TOLERANCE = 0.1


@dataclass
class Assessment:
    """What a measurement tells of each group: the report rows, realized steps, the fit, and verdicts. `losses`,
    `steps`: the measured points' columns (five, or three), the unperturbed one in the middle; `report` and
    `at_points` (the perturbed points measured) as the moves wrote them."""

    losses: torch.Tensor
    report: torch.Tensor
    steps: torch.Tensor
    at_points: torch.Tensor
    fit: object
    b_fit: torch.Tensor  # the five points' own slope
    counts: torch.Tensor
    probed: torch.Tensor
    moved: torch.Tensor
    unmoved: torch.Tensor
    reliable: torch.Tensor
    rounding: torch.Tensor  # the loss's resolution (adapeft.steps.resolution)
    resolved: torch.Tensor
    errors: step_rules.FitErrors  # what the noise and the loss's higher terms move b and A by
    loss_change: torch.Tensor  # the largest change of the loss at the four points, as a share of the loss


class NoiseEstimate:
    """The loss's noise (a standard deviation, `value`), pooled from the groups' fourth differences where they
    started at eta (adapeft.steps.pooled_noise); nan until measured."""

    def __init__(self, device):
        self._pool = torch.empty(0, dtype=torch.float64, device=device)
        self.value = torch.full((), math.nan, dtype=torch.float64, device=device)

    def sample(self, samples, usable):
        """Pool the usable samples of a measurement at eta."""
        self._pool, noise = step_rules.pooled_noise(self._pool, samples, usable)
        self.value.copy_(noise)

    def stand_in(self, samples, usable):
        """Where the rounds at eta gave no usable sample (a bfloat16 step the ledger could not hold, say), the
        first measurement near eta that gives some stands in until they do."""
        _, here = step_rules.pooled_noise(self._pool[:0], samples, usable)
        self.value.copy_(torch.where(torch.isnan(self.value), here, self.value))


class Assessor:
    """Assessments of a prober's measurements: the fit (the compiled op, or the plain baseline's row by row; with
    slope="autograd" fitted through the exact slope), and the noise they show."""

    def __init__(self, names, backend, slope, r2_threshold, device):
        self.names, self.backend, self.slope, self.r2_threshold = names, backend, slope, r2_threshold
        self.device = device
        self.noise = NoiseEstimate(device)
        self._counts_key = self._counts = self._probed = None

    def _counts_of(self, plans):
        """(elements each group moves, whether it is probed), on the device; kept while the plans' sizes stay."""
        counts_key = tuple(plans[n].numel if n in plans else None for n in self.names)
        if counts_key != self._counts_key:
            # Pinned and non-blocking: they reach the device without a host synchronisation.
            on_host = [torch.tensor([count or 0 for count in counts_key], dtype=torch.float64),
                       torch.tensor([count is not None for count in counts_key])]
            self._counts, self._probed = [tensor.pin_memory().to(self.device, non_blocking=True)
                                          if self.device.type == "cuda" else tensor for tensor in on_host]
            self._counts_key = counts_key
        return self._counts, self._probed

    def __call__(self, measurement, plans, points, eta, loss_eps, exact_slope, sample_noise=False):
        """The Assessment of the last measurement of the groups in `plans` (device tensors). points: the
        StepTable; sample_noise: the groups were measured at eta, where their fourth differences sample the
        loss's noise."""
        k = len(self.names)
        counts, probed = self._counts_of(plans)
        report = measurement.report.view(k, 5, len(L.REPORT_FIELDS))
        losses, steps = measurement.losses[:, points.measured], report[:, points.measured, L.REPORT_STEP]
        middle = losses.shape[1] // 2
        base = losses[:, middle]
        if self.backend != "torch":
            fit = ops.quadratic_fit(losses, steps, counts, None, self.r2_threshold)
        else:
            fit = fits.filtered(*fits.row_by_row(losses, steps), counts, self.r2_threshold)
        b_fit = fit.b
        if self.slope == "autograd":
            fit = fits.filtered(exact_slope.clone(), *fits.through_slope(losses, steps, exact_slope), counts,
                                self.r2_threshold)
        at_points = report.index_select(1, points.point_columns)
        moved_share = at_points[:, :, L.REPORT_CHANGED] / counts.clamp(min=1)[:, None]
        on_course = (at_points[:, :, L.REPORT_STEP] / points.table[:, points.measured_in_table].double() - 1).abs() \
            <= RELIABLE_STEP_TOLERANCE
        moved = ((moved_share >= RELIABLE_CHANGED_SHARE) | on_course).all(1)
        unmoved = at_points[:, :, L.REPORT_UNMOVED].sum(1)
        reliable = moved & (unmoved == 0) & probed
        samples = step_rules.noise_samples(losses, steps) if points.points == 5 else \
            step_rules.residual_samples(losses, steps, exact_slope)
        largest_change = (losses - base[:, None]).abs().amax(1)
        # A loss that did not change at all (lora_A's while lora_B is 0) is no sample of its noise.
        usable = reliable & (largest_change > 0) & torch.isfinite(samples) & torch.isfinite(losses).all(1)
        if sample_noise:
            self.noise.sample(samples, usable)
        else:
            self.noise.stand_in(samples, usable & (points.scale <= step_rules.NEAR_ETA * eta))
        rounding = step_rules.resolution(base, loss_eps, self.noise.value)
        # The noise as large as the loss's rounding where it was not measured (or measured below it).
        noise = rounding / step_rules.ROUNDINGS_PER_NOISE
        errors = step_rules.fit_errors(losses, steps, noise, slope_known=self.slope == "autograd")
        return Assessment(losses=losses, report=report, steps=steps, at_points=at_points, fit=fit, b_fit=b_fit, counts=counts,
                          probed=probed, moved=moved, unmoved=unmoved, reliable=reliable, rounding=rounding,
                          resolved=errors.A_noise <= step_rules.RESOLVED_SHARE * fit.A.abs(), errors=errors,
                          loss_change=largest_change / base.abs())


def verdicts(found, accepted, r2_threshold):
    """VERDICTS' index of each group: accepted, or the first reason that applies."""
    fit, at_points, losses = found.fit, found.at_points, found.losses
    realized = at_points[:, :, L.REPORT_STEP]
    nonfinite_direction = at_points[:, :, L.REPORT_NONFINITE].sum(1) > 0
    inputs_finite = torch.isfinite(losses).all(1) & ~nonfinite_direction
    reasons = [(~found.probed, "not probed"),
               (torch.isnan(realized).all(1) & ~nonfinite_direction, "zero direction"),  # d.d = 0: 0/0
               (~inputs_finite, "non-finite"), (found.unmoved > 0, "ledger full"), (~found.moved, "did not move"),
               (~torch.isfinite(fit.b + fit.A + fit.ppi), "non-finite"), (~found.resolved, "unresolved"),
               (~(fit.b > 0), "b <= 0"), (~(fit.A > 0), "A <= 0"), (~(fit.r2 > r2_threshold), "R^2")]
    # A rejection none of these explains can only be a fit the op found not finite.
    verdict = torch.full_like(found.unmoved, VERDICT["non-finite"], dtype=torch.int64)
    for applies, name in reversed(reasons):  # the first reason that applies wins
        verdict = torch.where(applies, VERDICT[name], verdict)
    # Accepted fits are accepted whatever they are (unresolved ones too, with the paper's filter).
    return torch.where(accepted, VERDICT["accepted"], verdict)
