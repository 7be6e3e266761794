"""The rules that choose each group's probe step and measure the loss's noise (adapeft.steps)."""
import math

import pytest
import torch

from adapeft import steps
from adapeft.ops import reference

F64 = dict(dtype=torch.float64)


def on_grid(values, eta):
    """Steps as next_scale rounds them: STEPS_PER_OCTAVE an octave from eta."""
    grid = steps.STEPS_PER_OCTAVE
    return [eta * 2 ** (round(math.log2(v / eta) * grid) / grid) for v in values]


def test_each_rule():
    # groups: resolved and short of the target; resolved past it; unresolved; unmoved; not a parabola;
    # inactive; below eta after a shrink
    scale = torch.tensor([1e-3, 1.0, 1e-3, 1e-3, 1e-2, 5e-3, 1e-5], **F64)
    A = torch.tensor([1.0, 1.0, 1e-9, 1.0, 1.0, 1.0, 1e8], **F64)
    b = torch.full((7,), 1e-3, **F64)
    r2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0], **F64)
    moved = torch.tensor([True, True, True, False, True, True, True])
    resolved = torch.tensor([True, True, False, True, True, True, True])
    active = torch.tensor([True, True, True, True, True, False, True])
    rounding = torch.full((7,), 2.4e-7, **F64)
    eta = 1e-4
    got = steps.next_scale(scale, b, A, r2, moved, resolved, rounding, 0.99, active, eta, 1e-7, 1e2)
    target = math.sqrt(steps.TARGET_ROUNDINGS * 2.4e-7 / 2)  # for A = 1
    expected = [min(target, 16e-3),  # up to the target, at most 16 times
                max(target, 1.0 / 4),  # down toward it, at most 4 times
                16e-3,  # an unresolved A says nothing: 16 times
                16e-3,  # most elements did not move: 16 times
                1e-2 / 4,  # a resolved fit that is no parabola: 4 times smaller
                5e-3,  # not measured: unchanged
                1e-5]  # below eta after a shrink: it stays
    measured = torch.tensor(expected[:5] + expected[6:], **F64)
    assert torch.allclose(got[active], torch.tensor(on_grid(measured.tolist(), eta), **F64), rtol=1e-12), got
    assert got[5] == scale[5]  # not measured: not even rounded
    clamped = steps.next_scale(scale, b, A, r2, moved, resolved, rounding, 0.99, active, eta, 2e-3, 0.1)
    assert torch.allclose(clamped, got.clamp(2e-3, 0.1).where(active, scale), rtol=1e-12)


def test_a_resolved_step_comes_down_to_eta_not_below():
    one = torch.ones(1, **F64)
    got = steps.next_scale(one * 1e-3, one * 1e-3, one * 1e6, one, torch.tensor([True]), torch.tensor([True]),
                           one * 1e-16, 0.99, torch.tensor([True]), 5e-4, 1e-9, 1.0)
    assert got.item() == 5e-4


def polynomial_losses(t, b, A, c3, c4, loss0=2.0, points=(-2.0, -1.0, 0.0, 1.0, 2.0)):
    x = torch.tensor(points, **F64)[None, :] * torch.as_tensor(t, **F64).reshape(-1, 1)
    coefficients = [torch.as_tensor(v, **F64).reshape(-1, 1) for v in (b, A, c3, c4)]
    return loss0 - coefficients[0] * x + coefficients[1] * x**2 / 2 + coefficients[2] * x**3 + coefficients[3] * x**4, x


def test_higher_terms_of_a_polynomial_are_exact_also_at_uneven_steps():
    _, x = polynomial_losses([1e-2, 3e-3], 0.0, 0.0, 0.0, 0.0)
    uneven = x * torch.tensor([[1.03, 0.98, 1.0, 1.01, 0.96]], **F64)  # bfloat16 realizes steps like these
    coefficients = [torch.tensor([[v], [w]], **F64) for v, w in ((0.5, -2.0), (3.0, 0.1), (7.0, -40.0), (-11.0, 900.0))]
    for points in (x, uneven):
        losses = 2.0 - coefficients[0] * points + coefficients[1] * points**2 / 2 + coefficients[2] * points**3 \
            + coefficients[3] * points**4
        c3, c4, sd3, sd4 = steps.higher_terms(losses, points)
        assert torch.allclose(c3, coefficients[2][:, 0], rtol=1e-6)
        assert torch.allclose(c4, coefficients[3][:, 0], rtol=1e-6)
        assert bool((sd3 > 0).all() and (sd4 > 0).all())


def test_fit_weights_are_the_fit():
    torch.manual_seed(0)
    x = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]], **F64) * 1e-3 * torch.tensor([[1.02, 0.99, 1.0, 1.0, 0.97]], **F64)
    losses = 2.0 + torch.randn(1, 5, **F64) * 1e-6
    weight_b, weight_A = steps.fit_weights(x, slope_known=False)
    b, A, *_ = reference.quadratic_fit(losses, x, torch.ones(1, **F64))
    y = losses - losses[:, 2:3]
    assert torch.allclose((weight_b * y).sum(1), b, rtol=1e-9) and torch.allclose((weight_A * y).sum(1), A, rtol=1e-9)


def test_fit_errors_match_the_spread_of_noisy_fits_and_see_higher_terms():
    """The noise's part of the errors is the standard deviation of b and A over many noisy measurements of the
    same parabola; a quartic term that stands out of the noise gives A's error its effect."""
    torch.manual_seed(0)
    t, noise, trials = 1e-2, 1e-7, 20000
    clean, x = polynomial_losses(t, 0.3, 2.0, 0.0, 0.0)
    noisy = clean + noise * torch.randn(trials, 5, **F64)
    steps_ = x.expand(trials, 5)
    b, A, *_ = reference.quadratic_fit(noisy, steps_, torch.ones(trials, **F64))
    errors = steps.fit_errors(clean, x, torch.tensor(noise, **F64))
    assert errors.b_noise.item() == pytest.approx(b.std().item(), rel=0.03)
    assert errors.A_noise.item() == pytest.approx(A.std().item(), rel=0.03)
    assert errors.b_higher.item() == 0 and errors.A_higher.item() == 0
    # the bounds: the noise's part, and higher terms hidden in the noise, up to one deviation of theirs
    assert errors.b_noise < errors.b_bound < 20 * errors.b_noise and errors.A_noise < errors.A_bound < 6 * errors.A_noise
    quartic, _ = polynomial_losses(t, 0.3, 2.0, 0.0, 1e4)
    errors = steps.fit_errors(quartic, x, torch.tensor(noise, **F64))
    fitted = reference.quadratic_fit(quartic, x, torch.ones(1, **F64))[1]
    # the quartic stands far out of the noise: its effect, less three of its deviations, and in the bound whole
    assert errors.A_higher.item() == pytest.approx((fitted - 2.0).abs().item(), rel=5e-3)
    assert errors.A_higher.item() < (fitted - 2.0).abs().item() < errors.A_bound.item()


def test_noise_is_measured_from_the_fourth_differences():
    """Rounding each loss to a grid of u gives noise of standard deviation u / sqrt(12): the pooled samples
    measure it, and the resolution is then about u, above the loss dtype's eps |L0| where u is larger."""
    torch.manual_seed(1)
    # slopes that cross many grid steps between points, so that the points' rounding errors are independent
    clean, x = polynomial_losses(torch.rand(512, **F64) * 1e-3 + 1e-4, 100 * torch.randn(512, **F64),
                                 torch.randn(512, **F64), 0.0, 0.0)
    u = 1e-4
    # off the grid, so that the rounding errors of points placed symmetrically about it do not cancel
    clean = clean + torch.rand(512, 1, **F64) * u
    rounded = torch.round(clean / u) * u
    pool, noise = steps.pooled_noise(torch.empty(0, **F64), steps.noise_samples(rounded, x),
                                     torch.ones(512, dtype=torch.bool))
    assert noise.item() == pytest.approx(u / math.sqrt(12), rel=0.2)
    assert steps.resolution(torch.tensor(2.0, **F64), 1.2e-7, noise).item() == pytest.approx(u - steps.OWN_ROUNDINGS * 2.4e-7, rel=0.2)
    # a noise about as large as the loss's own rounding leaves the resolution at that rounding
    assert steps.resolution(torch.tensor(2.0, **F64), 1.2e-7, torch.tensor(4 * 2.4e-7 / 12**0.5, **F64)).item() == 2.4e-7
    assert steps.resolution(torch.tensor(2.0, **F64), 1.2e-7, torch.tensor(math.nan, **F64)).item() == 2.4e-7
    # unusable samples (a group that did not move) count for nothing, and the pool keeps the latest samples
    pool, again = steps.pooled_noise(pool, torch.full((512,), 1e9, **F64), torch.zeros(512, dtype=torch.bool))
    assert again.item() == noise.item() and pool.numel() == 1024
    pool, _ = steps.pooled_noise(pool, torch.ones(steps.NOISE_SAMPLES_KEPT, **F64),
                                 torch.ones(steps.NOISE_SAMPLES_KEPT, dtype=torch.bool))
    assert pool.numel() == steps.NOISE_SAMPLES_KEPT


def test_where_higher_terms_show_the_step_minimises_the_predicted_error():
    """A resolved group whose quartic term moves A by 40% at this step: the next step is the one that
    minimises 2 x b's relative error + A's (noise falling as 1/t and 1/t^2, higher terms growing as t^2)."""
    t, noise = 1e-2, torch.tensor(1e-9, **F64)
    losses, x = polynomial_losses(t, 0.3, 2.0, 0.0, 2e3)
    errors = steps.fit_errors(losses, x, noise)
    b, A, *_ = reference.quadratic_fit(losses, x, torch.ones(1, **F64))
    scale, yes = torch.tensor([t], **F64), torch.tensor([True])
    got = steps.next_scale(scale, b, A, torch.ones(1, **F64), yes, yes, torch.tensor([1e-9], **F64), 0.99, yes,
                           1e-6, 1e-9, 1.0, errors=errors)
    relative = [error / value.abs() for error, value in zip(errors, (b, A, b, A))]
    assert relative[3].item() == pytest.approx(0.4, rel=0.1)

    def predicted(ratio):
        return (2 * relative[0] / ratio + relative[1] / ratio**2 + (2 * relative[2] + relative[3]) * ratio**2).item()

    ratio = got.item() / t
    assert 1 / steps.MOST_DOWN <= ratio < 1
    # the step of least predicted error (at most 4 times smaller), but for its rounding to the grid
    best = min(torch.linspace(0.25, 1.0, 3001).tolist(), key=predicted)
    assert abs(math.log2(ratio / best)) <= 1 / steps.STEPS_PER_OCTAVE
    # the same fit without higher terms keeps the target rule
    clean, _ = polynomial_losses(t, 0.3, 2.0, 0.0, 0.0)
    plain = steps.next_scale(scale, b, A, torch.ones(1, **F64), yes, yes, torch.tensor([1e-9], **F64), 0.99, yes,
                             1e-6, 1e-9, 1.0, errors=steps.fit_errors(clean, x, noise))
    assert plain.item() == steps.next_scale(scale, b, A, torch.ones(1, **F64), yes, yes, torch.tensor([1e-9], **F64),
                                            0.99, yes, 1e-6, 1e-9, 1.0).item()


def inner_losses(A, b, t, base=2.0, noise=0.0, generator=None):
    """K x 5 tables with the inner points of -x b + x^2 / 2 A measured at +-t (the outer columns nan)."""
    x = torch.tensor([math.nan, -1.0, 0.0, 1.0, math.nan], **F64) * t
    losses = base - x * b[:, None] + x * x / 2 * A[:, None]
    if noise:
        losses = losses + noise * torch.randn(losses.shape, generator=generator, **F64)
    return losses


def test_outer_points_stay_at_twice_the_step_where_the_inner_ones_resolve_the_curvature():
    rounding = torch.full((3,), 2.4e-7, **F64)
    A, b = torch.tensor([1.0, 30.0, 1e3], **F64), torch.full((3,), 1e-2, **F64)
    ratio = steps.outer_ratio(inner_losses(A, b, 0.01), rounding, torch.tensor(0.7e-7, **F64))
    assert ratio.tolist() == [2.0, 2.0, 2.0]


def test_outer_points_go_out_as_far_as_resolving_takes_within_the_loss_change_bound():
    rounding, noise, t = torch.full((4,), 2.4e-7, **F64), torch.tensor(1e-7, **F64), 0.1
    # A shrinking curvature goes further out; where none shows (A = 0), to OUTER_MOST; a steep slope stops
    # where the loss would change by MAX_LOSS_CHANGE
    A = torch.tensor([1.2e-4, 8e-5, 0.0, 0.0], **F64)
    b = torch.tensor([1e-3, 1e-3, 1e-3, 0.1], **F64)
    losses = inner_losses(A, b, t)
    ratio = steps.outer_ratio(losses, rounding, noise)
    assert 2.0 < ratio[0] < ratio[1] < steps.OUTER_MOST and ratio[2] == steps.OUTER_MOST
    change = b * ratio * t + A / 2 * (ratio * t) ** 2
    step_of_grid = 2 ** (1 / steps.STEPS_PER_OCTAVE)
    assert float(change[3]) <= steps.MAX_LOSS_CHANGE * 2.0 * step_of_grid ** 0.5
    assert float(change[3]) >= steps.MAX_LOSS_CHANGE * 2.0 / step_of_grid
    # the curvature the outer points then show is resolved with the margin asked for: the noise moves the fit's
    # A by at most RESOLVED_SHARE / OUTER_MARGIN of it
    for k in (0, 1):
        x = torch.tensor([-ratio[k], -1.0, 0.0, 1.0, ratio[k]], **F64)[None] * t
        _, weight_A = steps.fit_weights(x, slope_known=False)
        fit_noise = rounding[k] / steps.ROUNDINGS_PER_NOISE
        moved_by_noise = fit_noise * (weight_A.square().sum() + weight_A.sum().square()).sqrt()
        assert moved_by_noise <= steps.RESOLVED_SHARE / steps.OUTER_MARGIN * A[k] * 1.2


def test_outer_points_of_a_group_not_measured_stay_at_twice_the_step():
    losses = torch.full((2, 5), math.nan, **F64)
    losses[1, 1:4] = torch.tensor([2.0, 2.0, 2.0], **F64)
    losses[0, 1] = 2.0
    ratio = steps.outer_ratio(losses, torch.full((2,), 2.4e-7, **F64), torch.tensor(math.nan, **F64))
    assert ratio.tolist() == [2.0, steps.OUTER_MOST]


def test_outer_points_do_not_chase_noise_that_looks_like_curvature():
    """Inner losses whose curvature term is noise alone (A = 0) do not stop the outer points short: the part
    of the curvature term sure to stand out of the noise is nothing, so they go all the way."""
    generator = torch.Generator().manual_seed(0)
    k = 256
    noise = 1e-6
    losses = inner_losses(torch.zeros(k, **F64), torch.full((k,), 1e-3, **F64), 1e-3, noise=noise,
                          generator=generator)
    ratio = steps.outer_ratio(losses, torch.full((k,), 2.4e-7, **F64), torch.tensor(noise, **F64))
    assert float((ratio == steps.OUTER_MOST).double().mean()) > 0.99


def test_three_points_fit_errors_match_the_spread_of_noisy_fits_through_the_slope():
    """With the exact slope, A from +-t alone: the noise's part of its error is the spread of many noisy fits, and
    the residual's samples measure the noise (no cubic term here); no higher term is claimed seen."""
    from adapeft.fit import through_slope
    torch.manual_seed(2)
    t, noise, trials = 1e-2, 1e-7, 20000
    clean, x = polynomial_losses(t, 0.3, 2.0, 0.0, 0.0, points=(-0.98, 0.0, 1.03))  # uneven realized steps
    noisy = clean + noise * torch.randn(trials, 3, **F64)
    slope = torch.full((trials,), 0.3, **F64)
    A, _ = through_slope(noisy, x.expand(trials, 3), slope)
    errors = steps.fit_errors(clean, x, torch.tensor(noise, **F64), slope_known=True)
    assert errors.A_noise.item() == pytest.approx(A.std().item(), rel=0.03)
    assert errors.A_noise.item() == pytest.approx(math.sqrt(6) * noise / t**2, rel=0.05)  # sqrt(2 + 4) / t^2
    assert errors.b_noise.item() == 0 and errors.A_higher.item() == 0 and errors.A_bound.item() == errors.A_noise.item()
    samples = steps.residual_samples(noisy, x.expand(trials, 3), slope)
    assert samples.square().mean().sqrt().item() == pytest.approx(noise, rel=0.03)
    # a cubic term shows in the residual: the samples grow with it
    cubic = clean + 1e3 * x.pow(3)
    assert steps.residual_samples(cubic, x, slope[:1]).item() > 100 * noise
