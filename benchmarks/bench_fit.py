"""The quadratic fit of a probe (adapeft.quadratic_fit) against PyTorch, numpy and scipy, and against the floor.

Inputs: K groups with five probe points each, as a probe reports them: per group random b > 0, A > 0 and a
probing step eta near eta* = b/A, realized steps eta*[-2,-1,0,1,2] with a small jitter (column 2 exactly 0),
float64 losses L0 - x*b + x^2/2*A plus a little noise, and ~10% of the rows made to be rejected (b < 0, or
noise swamping the curve). Steps are float64. Before timing, every K checks that the op agrees with
adapeft.ops.reference.quadratic_fit (b, A within rtol 1e-9, `accepted` identical; the rest, and the PPI the op
accumulates into `appi`, too) and that the numpy and scipy baselines agree with it.

Columns (median microseconds per fit of all K rows; CPU times from time.perf_counter, repeats shrinking with K):
  acc          share of rows accepted
  adapeft      adapeft.quadratic_fit, the compiled CPU kernel
  reference    adapeft.ops.reference.quadratic_fit: the same fit as batched PyTorch ops
  np loop      adapeft.fit.row_by_row and the filter: numpy lstsq row by row in a Python loop, the probe's plain
               baseline (K <= 1e4, else "-")
  scipy        scipy.optimize.curve_fit of the same two-parameter model, row by row (K <= 1000, else "-")
  ref/adapeft  how many times slower the reference is
With CUDA, a second table (inputs already on the GPU):
  adapeft      GPU time per fit from CUDA-graph replays (launch overhead stripped)
  eager        adapeft.quadratic_fit called from Python (host overhead included), CUDA events
  reference    adapeft.ops.reference.quadratic_fit on the GPU, eager, CUDA events
  floor        bytes moved (read losses and steps 16 bytes a point, counts 8 a row; write five float64
               outputs and a bool, 41 bytes a row) / measured copy bandwidth, or one empty launch if larger
  ref/eager    reference / adapeft eager;  floor/adapeft

    python benchmarks/bench_fit.py [--quick]
"""
import argparse
import platform
import statistics
import time

import numpy as np
import scipy
import torch
from scipy.optimize import curve_fit

import adapeft
from adapeft.ops import backend as _backend
from adapeft.ops import reference
from adapeft import fit as fits
from bench_perturb import copy_bandwidth, empty_launch_us, graph_us, median_us

THRESHOLD = 0.99
UNIT = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])


def realistic(k, seed):
    """(losses K x 5 float64, steps K x 5 float64, counts K float64) of a probe of K groups."""
    rng = np.random.default_rng(seed)
    b = np.exp(rng.normal(0.0, 1.0, k))  # b ~ G.d
    eta_opt = 10.0 ** rng.uniform(-4, -2, k)  # eta* = b / A
    A = b / eta_opt
    eta = eta_opt * rng.uniform(0.3, 3.0, k)  # the probe's step is only near eta*
    x = eta[:, None] * UNIT * (1 + 0.01 * rng.standard_normal((k, 5)))  # realized steps
    x[:, 2] = 0.0
    curve = 0.5 * A * eta * eta  # scale of the loss change at the first point
    sigma = 1e-3 * curve
    bad = rng.random(k)
    b = np.where(bad < 0.05, -b, b)  # ascent direction: b < 0
    sigma = np.where((bad >= 0.05) & (bad < 0.10), 3.0 * curve, sigma)  # noise swamps the curve
    L0 = rng.uniform(2.0, 4.0, k)
    losses = L0[:, None] - x * b[:, None] + 0.5 * x * x * A[:, None] + sigma[:, None] * rng.standard_normal((k, 5))
    counts = np.floor(np.exp(rng.uniform(np.log(1e2), np.log(1e8), k)))
    return torch.from_numpy(losses), torch.from_numpy(x), torch.from_numpy(counts)


def row_loop(losses, steps, counts):
    """The probe's plain baseline: numpy's lstsq one row at a time, then the paper's filter."""
    return fits.filtered(*fits.row_by_row(losses, steps), counts, THRESHOLD)


def _model(x, b, A):
    return -x * b + 0.5 * x * x * A


def scipy_fit(losses, x, counts, threshold):
    """scipy.optimize.curve_fit of dL(x) = -x*b + x^2/2*A row by row, then R^2 and the filter."""
    k = len(losses)
    b, A, r2 = np.empty(k), np.empty(k), np.empty(k)
    for i in range(k):
        y = losses[i] - losses[i, 2]
        eta = np.abs(x[i]).max()
        (b[i], A[i]), _ = curve_fit(_model, x[i], y, p0=(1.0, 1.0 / eta))
        ss_res = ((y - _model(x[i], b[i], A[i])) ** 2).sum()
        ss_tot = ((y - y.mean()) ** 2).sum()
        r2[i] = 1.0 if ss_res == 0 else (0.0 if ss_tot == 0 else 1 - ss_res / ss_tot)
    accepted = (b > 0) & (A > 0) & (r2 > threshold) & (counts > 0)
    return b, A, r2, accepted


def cpu_us(fn, budget_s, max_repeats=200):
    """Median wall microseconds of fn over as many runs (3 to max_repeats) as fit in about budget_s."""
    fn()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    repeats = int(min(max_repeats, max(3, budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def check(got, want, what):
    """Assert that fit results `got` agree with `want` (b, A to rtol 1e-9, `accepted` identical)."""
    got = [torch.as_tensor(t).cpu() for t in got]
    want = [torch.as_tensor(t).cpu() for t in want]
    assert torch.equal(got[3], want[3]), f"{what}: accepted differs in {int((got[3] != want[3]).sum())} rows"
    for name, g, w in zip(("b", "A", "r2"), got[:3], want[:3]):
        assert torch.allclose(g, w, rtol=1e-9, atol=0, equal_nan=True), \
            f"{what}: {name} differs by up to {float(((g - w) / w).abs().max()):.2e} (relative)"
    if len(got) > 4:
        for name, g, w in zip(("ppi", "eta_star"), got[4:], want[4:]):
            assert torch.allclose(g, w, rtol=1e-9, atol=0, equal_nan=True), f"{what}: {name} differs"


def check_op(losses, steps, counts, twin):
    """The op on the inputs' device against `twin` run on CPU copies, the PPI accumulated into appi included."""
    cpu = [t.cpu() for t in (losses, steps, counts)]
    want = adapeft.FitResult(*twin(*cpu, None, THRESHOLD))
    appi = torch.rand(len(counts), dtype=torch.float64, device=losses.device)
    appi_want = appi.cpu().clone()
    twin(*cpu, appi_want, THRESHOLD)
    got = adapeft.quadratic_fit(losses, steps, counts, appi, THRESHOLD)
    check(got, want, f"adapeft.quadratic_fit on {losses.device.type}, K = {len(counts)}")
    assert torch.allclose(appi.cpu(), appi_want, rtol=1e-12, atol=0), "appi accumulation differs"
    return want


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if _backend.BACKENDS["quadratic_fit"]["cpu"] != "compiled":
        raise SystemExit("adapeft.quadratic_fit has no compiled CPU kernel in this build: nothing to benchmark")
    sizes = [7, 10**4] if args.quick else [7, 100, 10**4, 10**6]
    budget = 0.3 if args.quick else 1.0  # seconds of timing per cell, at least 3 runs
    data = {k: realistic(k, seed=k) for k in sizes}

    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}; "
          f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads")
    print(f"{'K':>8} {'acc':>5} {'adapeft':>9} {'reference':>10} {'np loop':>10} {'scipy':>11} {'ref/adapeft':>11}")
    for k in sizes:
        losses, steps, counts = data[k]
        want = check_op(losses, steps, counts, reference.quadratic_fit)
        L, x, n = losses.numpy(), steps.numpy(), counts.numpy()
        t_adapeft = cpu_us(lambda: adapeft.quadratic_fit(losses, steps, counts, None, THRESHOLD), budget, 1000)
        t_ref = cpu_us(lambda: reference.quadratic_fit(losses, steps, counts, None, THRESHOLD), budget)
        loop = scipy_col = "-"
        if k <= 10**4:
            check(row_loop(losses, steps, counts), want, f"numpy row loop, K = {k}")
            loop = f"{cpu_us(lambda: row_loop(losses, steps, counts), budget, 20):.1f}"
        if k <= 1000:
            b, A, r2, accepted = scipy_fit(L, x, n, THRESHOLD)
            # An iterative solver (default tolerances 1.5e-8): it agrees with the closed form to ~1e-6, not to rounding.
            assert np.array_equal(accepted, want.accepted.numpy()), f"scipy accepts other rows, K = {k}"
            assert np.allclose(b, want.b.numpy(), rtol=1e-5) and np.allclose(A, want.A.numpy(), rtol=1e-5), \
                f"scipy's fit differs, K = {k}"
            scipy_col = f"{cpu_us(lambda: scipy_fit(L, x, n, THRESHOLD), budget, 20):.1f}"
        acc = float(want.accepted.double().mean())
        print(f"{k:8d} {acc:5.2f} {t_adapeft:9.1f} {t_ref:10.1f} {loop:>10} {scipy_col:>11} {t_ref / t_adapeft:11.1f}")

    if not torch.cuda.is_available():
        print("(no CUDA device: the CUDA table is skipped)")
        return
    if _backend.BACKENDS["quadratic_fit"]["cuda"] != "compiled":
        raise SystemExit("this build of adapeft has no CUDA kernel for quadratic_fit: the CUDA table is skipped")
    bandwidth = copy_bandwidth()
    launch = empty_launch_us()
    print(f"\nCUDA: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, empty launch {launch:.1f} us")
    print(f"{'K':>8} {'adapeft':>9} {'eager':>9} {'reference':>10} {'floor':>8} {'ref/eager':>9} {'floor/adapeft':>13}")
    for k in sizes:
        losses, steps, counts = (t.cuda() for t in data[k])
        # Against the CPU kernel, checked against the reference above: the same float64 code (no FMA contraction
        # in either build), whereas the reference's CUDA reductions may sum in another order.
        check_op(losses, steps, counts, adapeft.quadratic_fit)
        t_graph = graph_us(lambda: adapeft.quadratic_fit(losses, steps, counts, None, THRESHOLD), 20)
        t_eager = median_us(lambda: adapeft.quadratic_fit(losses, steps, counts, None, THRESHOLD), 200)
        t_ref = median_us(lambda: reference.quadratic_fit(losses, steps, counts, None, THRESHOLD), 100)
        bytes_moved = k * (5 * (8 + 8) + 8 + 41)
        floor = max(bytes_moved / bandwidth * 1e6, launch)
        print(f"{k:8d} {t_graph:9.1f} {t_eager:9.1f} {t_ref:10.1f} {floor:8.1f} {t_ref / t_eager:9.1f} "
              f"{floor / t_graph:13.2f}")
        del losses, steps, counts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
