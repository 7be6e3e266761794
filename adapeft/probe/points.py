"""Where each group is probed: its step t_k, and the K x 4 table of the steps the moves read (adapeft.steps
holds the rules that choose them). A five-point probe measures all four perturbed points; a three-point one
(exact slopes) only the inner two, +-t_k, and its results' outer columns stay nan."""
import math

import torch

from ..ops import layout as L
from .. import steps as step_rules

POINTS = (-2.0, -1.0, 1.0, 2.0)
COLUMNS = (0, 1, 3, 4)  # where the four perturbed points sit in a row of five; column 2 is the base loss
# The points in the order they are measured: the inner ones first, from which the outer ones may be placed
# (adapeft.steps.outer_ratio).
INNER, OUTER = (1, 2), (0, 3)
POINT_COUNTS = (5, 3)


class StepTable:
    """Each group's step t_k (nan until its first probe) and the K x 4 table {-s_k,-1,1,s_k} t_k on the device.

    The moves read the table, so a captured CUDA graph replays with whatever it holds: it is rewritten only while
    every group is at its unperturbed values. policy "adaptive" chooses t_k from each group's last fit and places
    the outer points (s_k) from the inner ones; "fixed" probes every group at {-2,-1,1,2} eta, as the paper does.
    """

    def __init__(self, num_groups, policy, step_range, device, points=5):
        self.policy, self.range, self.points = policy, (float(step_range[0]), float(step_range[1])), points
        # the paper's fixed steps keep their points at +-2 eta; three points have no outer ones
        self.places_outer = policy == "adaptive" and points == 5
        # The points measured: the inner ones first, from which the outer ones may be placed (adapeft.steps.outer_ratio)
        self.rounds = (INNER, OUTER) if points == 5 else (INNER,)
        # Their columns as slices of a row of five (losses, steps; the unperturbed one among them) and of the table
        self.measured = slice(0, 5) if points == 5 else slice(1, 4)
        self.measured_in_table = slice(0, 4) if points == 5 else slice(1, 3)
        self.scale = torch.full((num_groups,), math.nan, dtype=torch.float64, device=device)
        self.table = torch.empty(num_groups, len(POINTS), dtype=torch.float32, device=device)
        self._points = torch.tensor(POINTS, dtype=torch.float32, device=device)
        # A device index (a Python list used as an index would be copied to the device and wait for it).
        self.point_columns = torch.tensor(COLUMNS if points == 5 else (COLUMNS[1], COLUMNS[2]), device=device)
        self.started = set()  # groups probed before

    def begin(self, eta, names):
        """Set every t_k for a probe at eta; (low, high): the steps' bounds, and the groups of `names` never
        probed before (the adaptive policy brackets their steps first)."""
        low, high = eta * self.range[0], eta * self.range[1]
        if self.policy == "fixed":
            self.scale.fill_(eta)
        else:
            self.scale.copy_(torch.where(torch.isnan(self.scale), eta, self.scale).clamp(low, high))
        new = [name for name in names if name not in self.started] if self.policy == "adaptive" else []
        return low, high, new

    def write(self):
        """The table from the current t_k, s_k = 2 (outside any captured graph: a replay reads it)."""
        torch.mul(self.scale.float()[:, None], self._points, out=self.table)

    def place_outer(self, losses, loss_eps, noise):
        """The outer points' steps from the inner points' losses (K x 5, adapeft.steps.outer_ratio)."""
        rounding = step_rules.resolution(losses[:, 2], loss_eps, noise)
        ratio = step_rules.outer_ratio(losses, rounding, noise).float()
        self.table[:, OUTER[0]] = self.table[:, INNER[0]] * ratio
        self.table[:, OUTER[1]] = self.table[:, INNER[1]] * ratio

    def adapt(self, found, eta, low, high, r2_threshold, most_change=None):
        """The next t_k of the groups an assessment measured (adapeft.steps.next_scale)."""
        fit = found.fit
        change = {} if most_change is None else {"most_up": most_change, "most_down": most_change}
        has_direction = torch.isfinite(found.at_points[:, :, L.REPORT_STEP]).any(1)  # d.d = 0 gives 0/0
        self.scale.copy_(step_rules.next_scale(self.scale, fit.b, fit.A, fit.r2, found.moved, found.resolved,
                                               found.rounding, r2_threshold, found.probed & has_direction,
                                               eta, low, high, errors=found.errors, loss_change=found.loss_change,
                                               ledger_full=found.unmoved > 0, **change))
