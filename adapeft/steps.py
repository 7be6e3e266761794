"""Probe steps: each group k is probed at t_k * {-2, -1, 1, 2}, a step of its own that resolves its curvature.

b and A are g.d and d.H.d of the group's direction, whatever the step; the step decides how well the five
losses resolve them. A step too small leaves the curvature term A t^2 / 2 within the loss's rounding (A is
then noise, and so is PPI = b^2 / (A n)), or, in 16-bit weights, rounds most elements back to where they
were; a step too large leaves the region where the loss is a parabola. No single eta serves every group (on
the demo's proxy the groups' curvatures differ by 10^3), so each group's step is chosen from its last fit:

- most elements did not move (a step below the dtype's resolution): 16 times larger;
- the curvature term is resolved but the parabola does not fit (R^2 at or below the threshold): 4 times
  smaller;
- otherwise, where the curvature term at the widest point, 2 |A| t^2, is less than TARGET_ROUNDINGS times
  the loss's rounding, the step that makes it so, at most 16 times larger a probe; where it is more, a
  smaller step, at most 4 times, toward that target (a large step biases b and A by the loss's higher
  terms), but never below eta;
- an unresolved curvature: 16 times larger (its measured A is noise, which says nothing of how far to go).

A group's first probe brackets its step first: BRACKET_ROUNDS rounds of 4 forward passes that only choose
the step, each allowed to change it 64 times, so that the probe itself already runs at up to 4096 eta.

Every step stays local: the slope's part of the loss change at the widest point, 2 |b| t, at most 0.2% of
the loss. A group whose curvature no local step resolves (a loss nearly linear along its direction) stays
unresolved, and says so. `eta` is where every group starts and the least step it is probed at, unless the
parabola fails to fit. Steps stay within step_range x eta
(1e-3 to 1e6 by default).

All of it is arithmetic on device tensors: no host synchronisation, and a captured CUDA graph replays with
the new steps, which it reads from the K x 4 table the moves already read.
"""
import math

import torch

TARGET_ROUNDINGS = 256  # 16 times the `resolved` threshold, RESOLVED_ROUNDINGS of adapeft.probe
SHRINK_NONQUADRATIC = 4.0
MOST_UP, MOST_DOWN = 16.0, 4.0
# A group's first probe starts with rounds that only choose its step, each changing it up to 64 times.
BRACKET_ROUNDS, BRACKET_MOST_CHANGE = 2, 64.0
LOCAL_CHANGE = 0.002  # the most the slope may change the loss at the widest point, as a share of the loss
POLICIES = ("adaptive", "fixed")
DEFAULT_RANGE = (1e-3, 1e6)  # the steps' bounds, in units of eta


def next_scale(scale, loss, b, A, r2, moved, resolved, rounding, r2_threshold, active, eta, low, high,
               most_up=MOST_UP, most_down=MOST_DOWN):
    """The steps t_k of the next probe from this one's fit (float64 tensors of K). loss: the unperturbed
    loss; moved: most elements moved at every point; rounding: the loss's rounding (eps |L0|); active: the
    groups this probe measured that have a direction (not a zero one); eta: the least step a resolved group
    moves down to; low, high: the bounds of every step; most_up, most_down: the most a step changes at once."""
    target = torch.sqrt(TARGET_ROUNDINGS * rounding / (2 * A.abs()))  # inf where A is 0
    # Local: the slope's change of the loss at the widest point within LOCAL_CHANGE of the loss (a slope
    # measured where most elements did not move is noise, and bounds nothing).
    high = torch.where(moved, torch.clamp(LOCAL_CHANGE * loss.abs() / (2 * b.abs()), max=high), high)
    # Down toward the target by most_down at most, and not below eta (or below a step already under it).
    lower = torch.maximum(scale / most_down, torch.clamp(scale, max=eta))
    toward = torch.minimum(torch.maximum(target, lower), scale * most_up)
    # An unresolved A is noise, mostly larger than the curvature it hides: a target from it falls short.
    enough = torch.where(resolved, toward, scale * most_up)
    chosen = torch.where(moved, torch.where(resolved & ~(r2 > r2_threshold), scale / SHRINK_NONQUADRATIC, enough),
                         scale * most_up)
    # Where nothing moved the fit is 0/0, and the step grows all the same.
    known = active & (~moved | (torch.isfinite(A) & torch.isfinite(r2) & torch.isfinite(b)))
    return torch.where(known, torch.minimum(chosen.clamp(min=low), high.nan_to_num(nan=math.inf)), scale)
