"""The probe's quadratic fit in Python: dL(x) = -x b + x^2/2 A over each group's points, R^2, and the paper's filter.

One implementation of each step, used by the op's pure-PyTorch twin (adapeft.ops.reference.quadratic_fit), the
probe's plain baseline (backend="torch") and exact slopes (slope="autograd"), and the benchmarks. The compiled
kernels follow csrc/fit_math.h, which computes the same closed form.
"""
import math
from collections import namedtuple

import numpy as np
import torch

FitResult = namedtuple("FitResult", "b A r2 accepted ppi eta_star")
FitResult.__doc__ = """Per-group results of quadratic_fit (float64 vectors, `accepted` bool): the fitted b ~ G.d and
A ~ d.H.d, R^2, whether the fit passed the filter, PPI = b^2/(A*n) (0 when rejected) and eta* = b/A (nan when
rejected)."""


def r_squared(ss_res, ss_tot):
    """1 - ss_res/ss_tot, with a perfect fit 1 (also of a flat loss) and a flat loss fitted imperfectly 0."""
    one, zero = torch.ones_like(ss_res), torch.zeros_like(ss_res)
    return torch.where(ss_res == 0, one, torch.where(ss_tot == 0, zero, 1 - ss_res / ss_tot))


def least_squares(losses, steps):
    """(b, A, R^2) per row of K x M losses and realized steps (float64, the middle column the unperturbed
    loss): the 2 x 2 normal equations of dL = -x b + x^2/2 A, in closed form."""
    points = losses.shape[1]
    x = steps.double()
    y = losses.double() - losses.double()[:, points // 2: points // 2 + 1]
    p, q = -x, 0.5 * x * x
    spp, sqq, spq = (p * p).sum(1), (q * q).sum(1), (p * q).sum(1)
    spy, sqy = (p * y).sum(1), (q * y).sum(1)
    det = spp * sqq - spq * spq
    b = (spy * sqq - sqy * spq) / det
    A = (sqy * spp - spy * spq) / det
    fitted = -x * b[:, None] + 0.5 * x * x * A[:, None]
    ss_res = ((y - fitted) ** 2).sum(1)
    ss_tot = ((y - y.mean(1, keepdim=True)) ** 2).sum(1)
    return b, A, r_squared(ss_res, ss_tot)


def through_slope(losses, steps, slope):
    """(A, R^2) with b known (K x M losses and steps, the middle column the unperturbed loss; K slopes): A by least
    squares of dL(x) + x b = x^2/2 A."""
    x = steps.double()
    middle = losses.shape[1] // 2
    y = losses.double() - losses.double()[:, middle:middle + 1]
    A = 2 * (x.square() * (y + x * slope[:, None])).sum(1) / x.pow(4).sum(1)
    ss_res = (y - (-x * slope[:, None] + 0.5 * x.square() * A[:, None])).square().sum(1)
    ss_tot = (y - y.mean(1, keepdim=True)).square().sum(1)
    return A, r_squared(ss_res, ss_tot)


def row_by_row(losses, steps):
    """(b, A, R^2) from numpy's lstsq, one group at a time on the host: the plain baseline's fit."""
    losses_host, steps_host = losses.cpu().numpy(), steps.cpu().numpy()
    out = {name: np.full(len(losses_host), np.nan) for name in ("b", "A", "r2")}
    for k, (row, x) in enumerate(zip(losses_host, steps_host)):
        y = row - row[2]
        if not (np.isfinite(y).all() and np.isfinite(x).all()):
            continue
        design = np.stack([-x, 0.5 * x * x], axis=1)
        (b, A), *_ = np.linalg.lstsq(design, y, rcond=None)
        ss_res = float(((y - design @ np.array([b, A])) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 if ss_res == 0 else (0.0 if ss_tot == 0 else 1 - ss_res / ss_tot)
        out["b"][k], out["A"][k], out["r2"][k] = b, A, r2
    return tuple(torch.tensor(out[name], dtype=torch.float64, device=losses.device) for name in ("b", "A", "r2"))


def filtered(b, A, r2, counts, threshold):
    """The paper's filter on fitted b, A and R^2: a FitResult whose fits with b > 0, A > 0, R^2 > threshold (all
    finite, the group not empty) are accepted, with PPI = b^2 / (A n) and eta* = b / A; 0 and nan elsewhere."""
    n = counts.to(torch.float64)
    ppi = b * b / (A * n)
    accepted = (b > 0) & (A > 0) & (r2 > threshold) & (n > 0) & torch.isfinite(b) & torch.isfinite(A) & \
        torch.isfinite(r2) & torch.isfinite(ppi)
    ppi = torch.where(accepted, ppi, torch.zeros_like(b))
    eta_star = torch.where(accepted, b / A, torch.full_like(b, math.nan))
    return FitResult(b, A, r2, accepted, ppi, eta_star)
