"""The rules that choose each group's probe step (adapeft.steps), one case per group of one call."""
import math

import torch

from adapeft import steps


def test_each_rule():
    f64 = dict(dtype=torch.float64)
    # groups: resolved and short of the target; resolved past it; unresolved; unmoved; not a parabola;
    # inactive; local bound; below eta after a shrink
    scale = torch.tensor([1e-3, 1.0, 1e-3, 1e-3, 1e-2, 5e-3, 1e-3, 1e-5], **f64)
    A = torch.tensor([1.0, 1.0, 1e-9, 1.0, 1.0, 1.0, 1e-9, 1e8], **f64)
    b = torch.tensor([1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 10.0, 1e-3], **f64)
    r2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0], **f64)
    moved = torch.tensor([True, True, True, False, True, True, True, True])
    resolved = torch.tensor([True, True, False, True, True, True, False, True])
    active = torch.tensor([True, True, True, True, True, False, True, True])
    loss, rounding = torch.full((8,), 2.0, **f64), torch.full((8,), 2.4e-7, **f64)
    eta = 1e-4
    got = steps.next_scale(scale, loss, b, A, r2, moved, resolved, rounding, 0.99, active, eta, 1e-7, 1e2)
    target = math.sqrt(steps.TARGET_ROUNDINGS * 2.4e-7 / 2)  # for A = 1
    expected = [min(target, 16e-3),  # up to the target, at most 16 times
                max(target, 1.0 / 4),  # down toward it, at most 4 times
                16e-3,  # an unresolved A says nothing: 16 times
                16e-3,  # most elements did not move: 16 times
                1e-2 / 4,  # a resolved fit that is no parabola: 4 times smaller
                5e-3,  # not measured: unchanged
                steps.LOCAL_CHANGE * 2.0 / (2 * 10.0),  # the slope bounds the step
                1e-5]  # below eta after a shrink: it stays
    assert torch.allclose(got, torch.tensor(expected, **f64), rtol=1e-12), got


def test_a_resolved_step_comes_down_to_eta_not_below():
    f64 = dict(dtype=torch.float64)
    one = torch.ones(1, **f64)
    got = steps.next_scale(one * 1e-3, one * 2.0, one * 1e-3, one * 1e6, one, torch.tensor([True]),
                           torch.tensor([True]), one * 1e-16, 0.99, torch.tensor([True]), 5e-4, 1e-9, 1.0)
    assert got.item() == 5e-4
