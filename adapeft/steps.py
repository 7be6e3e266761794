"""Probe steps: each group k is probed at t_k * {-2, -1, 1, 2} (the outer points further out where needed, see
below), a step of its own that resolves its curvature.

b and A are g.d and d.H.d of the group's direction, whatever the step; the step decides how well the five
losses tell them. Two errors pull the step in opposite ways. The loss's noise moves the fitted A by about
noise / t^2: a step too small leaves the curvature term A t^2 / 2 within the loss's resolution (A is then noise,
and so is PPI = b^2 / (A n)), or, in 16-bit weights, rounds most elements back to where they were. The loss's
cubic and quartic terms move b and A by about t^2: a step too large leaves the region where the loss is a
parabola. No single eta serves every group (on the demo's proxy the groups' curvatures differ by 10^3), so
each group's step is chosen from its last fit:

- most elements did not move (a step below the dtype's resolution): 16 times larger;
- the curvature term is resolved but the parabola does not fit (R^2 at or below the threshold): 4 times
  smaller;
- otherwise, where the curvature term at the widest point, 2 |A| t^2, is less than TARGET_ROUNDINGS times
  the loss's resolution, the step that makes it so, at most 16 times larger a probe; where it is more, a
  smaller step, at most 4 times, toward that target, but never below eta;
- an unresolved curvature: 16 times larger (its measured A is noise, which says nothing of how far to go);
- and, where the loss's higher terms stand out of the noise in the polynomial through the five losses, never
  further than the step that minimises the predicted error of PPI = b^2 / (A n) (twice b's relative error
  plus A's, the noise's parts falling as 1 / t and 1 / t^2, the higher terms' growing as t^2), at most 4 times
  smaller a probe and not below eta.

The step is chosen before the probe, from the last one, but the direction moves between probes (the update
of an optimizer at another point), and with it the curvature along it: on the demo's proxy by up to 80 times
from one probe to the next, through zero too. So the probe measures its inner points, +-t_k, first, and
places the outer points from what they show: at the paper's +-2 t_k where the curvature they show is sure to
be resolved there with a margin (the noise moving A by at most RESOLVED_SHARE / OUTER_MARGIN of it), else
further out, up to +-OUTER_MOST t_k, as far as that takes by the part of the inner points' curvature term
that is sure to stand out of the noise (all the way where none does), but never so far that their slope and
curvature would change the loss by more than 5%. The group is
then probed at t_k * {-s_k, -1, 1, s_k}; the fit, as always, uses the steps realized. On the demo's proxy
over its full horizon this raised the share of groups resolved at the worst probe after the first from 4 of 7
to 7 of 7 type groups and from 14 of 20 to 19 of 20 layer groups (two seeds), at no extra forward pass.

No step changes the loss by more than 5% at a probe point. A group whose curvature no local step resolves
stays unresolved, and says so. A group's first probe
brackets its step first: BRACKET_ROUNDS rounds of 4 forward passes that only choose the step, each allowed to
change it 64 times, so that the probe itself already runs at up to 4096 eta. `eta` is where every group
starts and the least step it is probed at, unless the parabola fails to fit. Steps stay within step_range x
eta (1e-3 to 1e6 by default).

The loss's resolution is measured, not assumed: a float32 loss is rounded to about eps |L0|, but a forward
pass that computes in bfloat16 or float16 adds its own rounding, far above that. Where groups are first
probed, at eta, the quartic coefficient of the polynomial through their five losses (the fourth divided
difference: zero for any polynomial of degree 3 or less, and the loss's own quartic term is negligible at a
learning-rate-sized step) is a sample of that noise; the noise is the root mean square of those samples
over groups and probes (but the largest tenth), and the resolution is the larger of eps |L0| and the rounding
step that would give that noise (sqrt(12) standard deviations) less the noise of a forward pass in the loss's
own dtype.

All of it is arithmetic on device tensors: no host synchronisation, and a captured CUDA graph replays with
the new steps, which it reads from the K x 4 table the moves already read (the outer points' columns are
written inside the measurement, while every group is at its unperturbed values).
"""
import math
from typing import NamedTuple

import torch

# A fit is resolved when the loss's noise moves its A by at most this share of |A| (one standard deviation,
# through the fit's weights on the realized steps: fit_errors): its sign is then certain and its
# size known to 10%. At symmetric steps that is a curvature term at the widest point of about 4 times the loss's
# resolution (`resolution`: eps |L0|, or the measured noise where larger); below it, A is noise, and
# so is APPI ~ b^2 / A.
RESOLVED_SHARE = 0.1
# The curvature term aimed at, in units of the loss's resolution: the noise then moves A by about 0.15%, 64
# times less than the `resolved` bound of adapeft.probe, so that a probe whose direction has a curvature many
# times smaller than the last one's still resolves it.
TARGET_ROUNDINGS = 256
SHRINK_NONQUADRATIC = 4.0
MOST_UP, MOST_DOWN = 16.0, 4.0
# A group's first probe starts with rounds that only choose its step, each changing it up to 64 times.
BRACKET_ROUNDS, BRACKET_MOST_CHANGE = 2, 64.0
POLICIES = ("adaptive", "fixed")
DEFAULT_RANGE = (1e-3, 1e6)  # the steps' bounds, in units of eta
# A value rounded to steps of u is off by a uniform error of standard deviation u / sqrt(12).
ROUNDINGS_PER_NOISE = math.sqrt(12.0)
# The noise from the smallest KEPT_SHARE of its samples: E[z^2 | |z| < 1.6449] for a standard normal z.
KEPT_SHARE, KEPT_SECOND_MOMENT = 0.9, 0.6230
NOISE_SAMPLES_KEPT = 4096
# A forward pass in the loss's own dtype leaves a noise of up to about one rounding of the loss (measured: 0.3 to
# 0.5 eps |L0| in float32 on the demo's proxy, 0.75 in float64 on the tests' MLP); the resolution counts the
# measured noise beyond this many roundings.
OWN_ROUNDINGS = 4.0
# A cubic or quartic coefficient within this many of its standard deviations from the noise shows no such term.
NOISE_SIGMAS = 3.0
# b is itself resolved when the noise moves it by less than this share of itself.
B_RESOLVED = 0.1
NEWTON_STEPS = 40
STEPS_PER_OCTAVE = 16  # the grid the steps are chosen on: 4.4% apart
# The outer points go out to at most this many times the inner step (the paper's: 2), and as far as it takes
# for the noise to move A by at most RESOLVED_SHARE / OUTER_MARGIN of it.
OUTER_MOST, OUTER_MARGIN = 64.0, 4.0
# The most a probe point may change the loss, as a share of it: a bound on steps whatever their fit says.
MAX_LOSS_CHANGE = 0.05
# Steps up to this many times eta count as near it, where a measurement may stand in for the noise's samples.
NEAR_ETA = 16.0


def _on_grid(ratio):
    """Ratios rounded to a grid of STEPS_PER_OCTAVE an octave: values that differ in their last bits
    (reductions in another order on other ranks, a graph's replay) round alike, but at a grid point's edge."""
    return torch.exp2(torch.round(torch.log2(ratio) * STEPS_PER_OCTAVE) / STEPS_PER_OCTAVE)


def _perturbed(table):
    """The four perturbed points' columns of a K x 5 table (column 2 is the unperturbed point), by slicing: an
    index tensor would be copied to the device, which waits for it."""
    return torch.cat([table[:, :2], table[:, 3:]], dim=1)


def higher_terms(losses, steps):
    """The cubic and quartic coefficients of the polynomial through each group's five losses over their realized
    steps (float64 tensors of K: c3, c4), and their standard deviations per unit of a loss's noise (sd3, sd4).
    Column 2 of the K x 5 inputs is the unperturbed point, at step 0. c4 is the fourth divided difference: it
    vanishes for any polynomial of degree 3 or less. nan where steps coincide (a group that did not move)."""
    x = _perturbed(steps.double())
    # In units of the group's step, where the points are about +-1 and +-2 and the system is well conditioned.
    unit = x.abs().amax(1) / 2
    scaled = x / unit[:, None]
    vandermonde = torch.stack([scaled.pow(power) for power in range(1, 5)], dim=2)
    inverse, _ = torch.linalg.inv_ex(vandermonde)  # no error check: that would wait for the device
    differences = _perturbed(losses.double() - losses.double()[:, 2:3])
    coefficients = (inverse @ differences[:, :, None])[:, :, 0]
    # Each coefficient weighs the four losses by a row of the inverse and the unperturbed one by minus its sum.
    deviations = (inverse.square().sum(2) + inverse.sum(2).square()).sqrt()
    return (coefficients[:, 2] / unit.pow(3), coefficients[:, 3] / unit.pow(4), deviations[:, 2] / unit.pow(3),
            deviations[:, 3] / unit.pow(4))


def fit_weights(steps, slope_known):
    """The weights the fit gives each of the five losses' differences from the unperturbed one, for b and for
    A (K x 5 each): the least squares of -x b + x^2 / 2 A (adapeft.quadratic_fit), or, with b known
    (slope="autograd"), A = 2 sum x^2 (y + x b) / sum x^4 and no weight on b."""
    x = steps.double()
    if slope_known:
        return torch.zeros_like(x), 2 * x.square() / x.pow(4).sum(1, keepdim=True)
    p, q = -x, 0.5 * x * x
    spp, sqq, spq = (p * p).sum(1, keepdim=True), (q * q).sum(1, keepdim=True), (p * q).sum(1, keepdim=True)
    det = spp * sqq - spq * spq
    return (p * sqq - q * spq) / det, (q * spp - p * spq) / det


class FitErrors(NamedTuple):
    """What a fit's b and A may be off by (float64 tensors of K), from `fit_errors`."""
    b_noise: torch.Tensor  # the noise's standard deviation through the fit
    A_noise: torch.Tensor
    b_higher: torch.Tensor  # the loss's cubic and quartic terms, by what they stand out of the noise
    A_higher: torch.Tensor
    b_bound: torch.Tensor  # the noise's part plus the higher terms as measured, or one deviation where less
    A_bound: torch.Tensor


def fit_errors(losses, steps, noise, slope_known=False):
    """What each group's fitted b and A may be off by (a FitErrors). The noise's part: its standard deviation
    through the fit's weights (the unperturbed loss enters every difference). The higher terms' part, which the
    steps are chosen by: the cubic and quartic coefficients of the polynomial through the five losses, by what
    they stand beyond NOISE_SIGMAS of their deviations out of the noise, through the fit's answer to x^3 and
    x^4. The first falls as 1 / t^2 (1 / t for b), the second grows as t^2. The bounds add to the noise's part
    the higher terms as measured, at least one deviation of theirs: a term hidden in the noise moves b and A
    too (for b, by up to about ten times the noise's own part at symmetric steps). Three points (K x 3, with the
    exact slope) leave one number besides b and A, no cubic and quartic term apart: their part is left out."""
    weight_b, weight_A = fit_weights(steps, slope_known)
    x = steps.double()
    if x.shape[1] == 5:
        c3, c4, sd3, sd4 = higher_terms(losses, steps)
    else:
        c3 = c4 = sd3 = sd4 = torch.zeros_like(x[:, 0])
    known_noise = torch.nan_to_num(noise, nan=0.0)
    # What stands out of the noise, shrunk by it (continuous in the losses, so that ranks that sum in other
    # orders choose the same steps).
    seen3 = c3.sign() * torch.clamp(c3.abs() - NOISE_SIGMAS * known_noise * sd3, min=0.0)
    seen4 = c4.sign() * torch.clamp(c4.abs() - NOISE_SIGMAS * known_noise * sd4, min=0.0)
    possible3, possible4 = torch.fmax(c3.abs(), known_noise * sd3), torch.fmax(c4.abs(), known_noise * sd4)

    def through(weights):
        from_noise = noise * (weights.square().sum(1) + weights.sum(1).square()).sqrt()
        answer3, answer4 = (weights * x.pow(3)).sum(1).abs(), (weights * x.pow(4)).sum(1).abs()
        return from_noise, seen3.abs() * answer3 + seen4.abs() * answer4, \
            from_noise + possible3 * answer3 + possible4 * answer4

    (b_noise, b_higher, b_bound), (A_noise, A_higher, A_bound) = through(weight_b), through(weight_A)
    return FitErrors(b_noise, A_noise, b_higher, A_higher, b_bound, A_bound)


def noise_samples(losses, steps):
    """One sample per group of a loss's noise in its own units (float64, K): |c4| / sd4 of `higher_terms`,
    which is the noise where the loss's quartic term is negligible (at small steps)."""
    _, c4, _, sd4 = higher_terms(losses, steps)
    return c4.abs() / sd4


def residual_samples(losses, steps, slope):
    """Three points and the exact slope (K x 3 losses and realized steps, the middle column unperturbed; K slopes):
    one sample per group of a loss's noise in its own units (float64, K), from what the fit of A through the slope
    leaves: z_i = dL(x_i) + x_i b, projected on the direction orthogonal to the curvature's (x_-^2, x_+^2), over
    that projection's deviation per unit of noise (each z_i holds the unperturbed loss's error too). It is the
    noise where the loss's cubic term is negligible (at small steps), as `noise_samples` is for five points."""
    x = torch.stack([steps[:, 0], steps[:, 2]], 1).double()
    z = torch.stack([losses[:, 0], losses[:, 2]], 1).double() - losses[:, 1:2].double() + x * slope[:, None]
    across = torch.stack([x[:, 1].square(), -x[:, 0].square()], 1)
    across = across / across.norm(dim=1, keepdim=True)
    return (across * z).sum(1).abs() / (1 + across.sum(1).square()).sqrt()


def pooled_noise(pool, samples, usable):
    """(the pool with this round's usable samples added, at most NOISE_SAMPLES_KEPT of the latest, and the noise
    it gives: a standard deviation, nan while there are no samples). The root mean square of the samples but
    the largest tenth (where a quartic term would show), over what that leaves of a normal's: losses are
    rounded to a grid, so that the samples take few values and a median would fall on one of them."""
    pool = torch.cat([pool, torch.where(usable, samples, math.nan)])[-NOISE_SAMPLES_KEPT:]
    squares, _ = torch.sort(torch.where(torch.isnan(pool), math.inf, pool.square()))
    kept = torch.arange(pool.numel(), device=pool.device) < \
        torch.clamp(torch.floor(KEPT_SHARE * (~torch.isnan(pool)).sum()), min=1)
    mean = torch.where(kept, squares, 0.0).sum() / kept.sum()
    return pool, torch.where(torch.isfinite(mean), (mean / KEPT_SECOND_MOMENT).sqrt(), math.nan)


def resolution(loss, eps, noise):
    """The loss's resolution: eps |loss| (the loss dtype's rounding), or, where the measured noise is larger than
    a forward pass in the loss's own dtype leaves, the rounding step that would give the noise less OWN_ROUNDINGS
    roundings (a nan noise, not measured yet, counts for nothing). Such a noise, as in float32 and float64
    forward passes, leaves the resolution at eps |loss| exactly: it is measured from the losses' last bits,
    which ranks that sum in other orders do not share, and must not make them choose other steps."""
    rounding = eps * loss.abs()
    return torch.fmax(rounding, ROUNDINGS_PER_NOISE * noise - OWN_ROUNDINGS * rounding)


def _least_error_ratio(linear, quadratic, growing):
    """The ratio s > 0 that minimises linear / s + quadratic / s^2 + growing s^2 (float64 tensors, growing > 0
    where it matters; inf where it is 0): the positive root of growing s^4 - linear s / 2 - quadratic = 0, by
    Newton's method from above, where the quartic is convex and increasing, so that it converges from that side.
    A continuous function of its inputs: the same steps on every rank, whatever the order of their sums."""
    ratio = (quadratic / growing).pow(0.25) + (linear / (2 * growing)).pow(1 / 3)
    for _ in range(NEWTON_STEPS):
        value = growing * ratio.pow(4) - linear * ratio / 2 - quadratic
        ratio = ratio - value / (4 * growing * ratio.pow(3) - linear / 2)
    return torch.where(growing > 0, ratio, math.inf)


def next_scale(scale, b, A, r2, moved, resolved, rounding, r2_threshold, active, eta, low, high,
               most_up=MOST_UP, most_down=MOST_DOWN, errors=None, loss_change=None, ledger_full=None):
    """The steps t_k of the next probe from this one's fit (float64 tensors of K). moved: most elements moved
    at every point; rounding: the loss's resolution (see `resolution`); active: the groups this probe measured
    that have a direction (not a zero one); eta: the least step a resolved group moves down to; low, high: the
    bounds of every step; most_up, most_down: the most a step changes at once; errors: `fit_errors` of this
    fit, or None; loss_change: the largest change of the loss at the four points, as a share of the loss;
    ledger_full: chunks stayed unmoved for want of ledger room, which grows before the next probe: the step is
    kept (elements that did not move for that say nothing of the dtype's resolution)."""
    target = torch.sqrt(TARGET_ROUNDINGS * rounding / (2 * A.abs()))  # inf where A is 0
    # Down toward the target by most_down at most, and not below eta (or below a step already under it).
    lower = torch.maximum(scale / most_down, torch.clamp(scale, max=eta))
    toward = torch.minimum(torch.maximum(target, lower), scale * most_up)
    # An unresolved A is noise, mostly larger than the curvature it hides: a target from it falls short.
    enough = torch.where(resolved, toward, scale * most_up)
    chosen = torch.where(moved, torch.where(resolved & ~(r2 > r2_threshold), scale / SHRINK_NONQUADRATIC, enough),
                         scale * most_up)
    if errors is not None:
        # Where the loss's higher terms show, no further than the step that minimises the predicted error of
        # PPI = b^2 / (A n): twice b's relative error plus A's, whose parts from the noise fall as 1 / t and
        # 1 / t^2 and from the higher terms grow as t^2. A higher term's share of a b or A that is itself
        # noise means nothing, and is left out.
        b_noise, A_noise, b_higher, A_higher = (error / value.abs() for error, value in
                                                zip(errors[:4], (b, A, b, A)))
        higher = 2 * torch.where(b_noise < B_RESOLVED, b_higher, 0.0) + torch.where(resolved, A_higher, 0.0)
        # A higher term at the last bits of a float64 loss can overflow the root: no bound, then.
        best = (scale * _least_error_ratio(2 * b_noise, A_noise, higher)).nan_to_num(nan=math.inf)
        chosen = torch.where(moved & (higher > 0), torch.minimum(chosen, torch.maximum(best, lower)), chosen)
    if loss_change is not None:
        # However unresolved the curvature, a step that changes the loss by more than MAX_LOSS_CHANGE of itself is
        # no local probe: back to where it would change it by that much.
        chosen = torch.where(moved & (loss_change > MAX_LOSS_CHANGE),
                             torch.minimum(chosen, scale * MAX_LOSS_CHANGE / loss_change), chosen)
    if ledger_full is not None:
        chosen = torch.where(ledger_full, scale, chosen)
    # On a grid of STEPS_PER_OCTAVE steps an octave from eta: fits that differ in their last bits (reductions in
    # another order on other ranks, a graph's replay) choose the same step, but for a fit at a grid point's edge.
    chosen = eta * _on_grid(chosen / eta)
    # Where nothing moved the fit is 0/0, and the step grows all the same.
    known = active & (~moved | (torch.isfinite(A) & torch.isfinite(r2) & torch.isfinite(b)))
    return torch.where(known, torch.clamp(chosen, low, high), scale)


def outer_ratio(losses, rounding, noise):
    """How far out each group's outer points go, in units of its inner step t (float64 tensor of K, on the
    steps' grid): 2, the paper's, where the curvature the inner points show is sure to be resolved with a margin
    (the noise moves A by at most RESOLVED_SHARE / OUTER_MARGIN of it) at points +-t and +-2t; else further, up to
    OUTER_MOST, as far as that takes by the part of the inner points' curvature term sure to stand out of the
    noise (NOISE_SIGMAS of its deviations; all the way where no part is), but no further than where their slope
    and curvature would change the loss by MAX_LOSS_CHANGE of itself. losses: the K x 5 table with the inner
    points (columns 1 and 3) and the unperturbed loss (column 2) measured; rounding: the loss's resolution;
    noise: its measured standard deviation (nan while not measured). 2 where the inner points are not finite
    (a group not measured)."""
    base = losses[:, 2]
    curvature = (losses[:, 1] + losses[:, 3]) / 2 - base  # A t^2 / 2, with 1.5 times the noise's variance
    slope = (losses[:, 3] - losses[:, 1]).abs() / 2  # |b| t
    fit_noise = rounding / ROUNDINGS_PER_NOISE  # the noise `fit_errors` is given, which `resolved` is judged by
    sure = torch.clamp(curvature.abs() - NOISE_SIGMAS * math.sqrt(1.5) * torch.fmax(noise, fit_noise), min=0.0)
    # At points +-t and +-s t the noise moves A by sqrt(6) noise / (s t)^2 for large s (0.68 at s = 2, against
    # 0.61), and A = 2 curvature / t^2.
    wanted = torch.sqrt(OUTER_MARGIN * math.sqrt(6.0) * fit_noise / (2 * RESOLVED_SHARE * sure))
    # slope s + |curvature| s^2 = MAX_LOSS_CHANGE |L0|, for s
    room = MAX_LOSS_CHANGE * base.abs()
    within = 2 * room / (slope + torch.sqrt(slope.square() + 4 * curvature.abs() * room))
    ratio = torch.clamp(torch.minimum(wanted, within), 2.0, OUTER_MOST)
    ratio = _on_grid(ratio)
    return torch.where(torch.isfinite(ratio), ratio, 2.0)
