"""adapeft::quadratic_fit (op 2): the batched fit against numpy least squares and scikit-learn's R^2."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

import adapeft
from adapeft.ops import backend as _backend
from adapeft.ops import reference

from conftest import requires_cuda

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")

OUTPUTS = ("b", "A", "r2", "accepted", "ppi", "eta_star")


def oracle(losses, steps, counts, threshold=0.99):
    """numpy float64 least squares per row, scikit-learn's r2_score, the paper's filter."""
    rows = []
    for loss, x, n in zip(losses.double().cpu().numpy(), steps.double().cpu().numpy(), counts.double().cpu().numpy()):
        y = loss - loss[len(loss) // 2]
        design = np.stack([-x, 0.5 * x * x], axis=1)
        if not (np.isfinite(y).all() and np.isfinite(x).all()):
            rows.append((math.nan, math.nan, math.nan, False, 0.0, math.nan))
            continue
        (b, A), *_ = np.linalg.lstsq(design, y, rcond=None)
        r2 = r2_score(y, design @ np.array([b, A]))
        ppi = b * b / (A * n) if A != 0 and n != 0 else math.inf
        accepted = bool(b > 0 and A > 0 and r2 > threshold and n > 0 and math.isfinite(ppi))
        rows.append((b, A, r2, accepted, ppi if accepted else 0.0, b / A if accepted else math.nan))
    return rows


def quadratic_losses(generator, groups, points=5, noise=0.0, eta=1e-3):
    """Losses of exact (or noisy) quadratics L0 - x b + x^2/2 A at jittered symmetric steps."""
    offsets = torch.arange(points, dtype=torch.float64) - points // 2
    steps = eta * offsets * (1 + 0.1 * torch.rand(groups, points, generator=generator, dtype=torch.float64))
    steps[:, points // 2] = 0
    b = torch.randn(groups, 1, generator=generator, dtype=torch.float64).abs() * 10.0 ** torch.randint(
        -3, 3, (groups, 1), generator=generator).double()
    A = torch.randn(groups, 1, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(
        0, 5, (groups, 1), generator=generator).double()
    L0 = 2 + torch.rand(groups, 1, generator=generator, dtype=torch.float64)
    scale = (b * eta).abs() + (A * eta * eta).abs()
    losses = L0 - steps * b + 0.5 * steps * steps * A
    losses = losses + noise * scale * torch.randn(groups, points, generator=generator, dtype=torch.float64)
    counts = torch.randint(1, 10**9, (groups,), generator=generator)
    return losses, steps, counts


def assert_matches_oracle(result, expected, counts, rtol, eta=1e-3, loss_scale=3.0):
    """Agreement up to rounding: the losses carry absolute error ~eps*|L0| before the fit, which bounds
    how well b (per unit step) and A (per unit step squared) are determined at all; PPI and eta* must
    then follow from the b and A found."""
    floor = 1e-12 * loss_scale
    atol = {"b": floor / eta, "A": floor / eta**2, "r2": 1e-9}
    got = {name: getattr(result, name).double().cpu() for name in OUTPUTS}
    n = counts.double().cpu()
    for k, row in enumerate(expected):
        want = dict(zip(OUTPUTS, row))
        accepted = bool(got["accepted"][k])
        assert accepted == want["accepted"], f"group {k}: accepted {accepted} but the oracle says {want['accepted']}"
        for name in ("b", "A", "r2"):
            value = got[name][k].item()
            if math.isnan(want[name]):
                assert math.isnan(value), f"group {k}: {name} = {value}, expected nan"
            else:
                assert value == pytest.approx(want[name], rel=rtol, abs=atol[name]), f"group {k}: {name}"
        b, A = got["b"][k].item(), got["A"][k].item()
        if accepted:
            assert got["ppi"][k].item() == pytest.approx(b * b / (A * n[k].item()), rel=1e-12)
            assert got["eta_star"][k].item() == pytest.approx(b / A, rel=1e-12)
        else:
            assert got["ppi"][k].item() == 0.0 and math.isnan(got["eta_star"][k].item())


@pytest.mark.parametrize("groups", [0, 1, 7, 1000, 4099])
@pytest.mark.parametrize("noise", [0.0, 1e-3, 0.3])
def test_matches_numpy_and_sklearn(device, generator, groups, noise):
    losses, steps, counts = quadratic_losses(generator, groups, noise=noise)
    result = adapeft.quadratic_fit(losses.to(device), steps.to(device), counts.to(device))
    # Exact quadratics put R^2 next to 1 where rounding decides the filter, so compare the filter only
    # away from the threshold.
    expected = oracle(losses, steps, counts)
    near = [k for k, row in enumerate(expected) if abs(row[2] - 0.99) < 1e-9]
    keep = [k for k in range(groups) if k not in near]
    assert_matches_oracle(adapeft.FitResult(*(getattr(result, n)[keep] for n in OUTPUTS)),
                          [expected[k] for k in keep], counts[keep], rtol=1e-9)
    if noise == 0.0 and groups:
        assert result.accepted.cpu().sum() == (result.A.cpu() > 0).sum()


@pytest.mark.parametrize("points", [3, 5, 7, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_points_dtypes_and_strides(device, generator, points, dtype):
    losses, steps, counts = quadratic_losses(generator, 50, points=points, noise=1e-2)
    losses = losses.to(dtype)
    # Realized steps come as a strided view of perturb_'s report.
    report = torch.zeros(50, points, 5, dtype=torch.float64)
    report[..., 0] = steps
    result = adapeft.quadratic_fit(losses.to(device), report.to(device)[..., 0], counts.to(device))
    assert_matches_oracle(result, oracle(losses, steps, counts), counts, rtol=1e-9)


def test_symmetric_points_closed_form(device, generator):
    """With steps exactly {-2,-1,0,1,2}*eta the normal equations decouple (NOTES.md)."""
    eta = 1e-3
    s = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    losses = 1 + torch.randn(20, 5, generator=generator, dtype=torch.float64) * 1e-4
    y = losses - losses[:, 2:3]
    result = adapeft.quadratic_fit(losses.to(device), (s * eta).expand(20, 5).to(device),
                                   torch.full((20,), 100, device=device))
    torch.testing.assert_close(result.b.cpu(), -(s * y).sum(1) / (10 * eta), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.A.cpu(), (s * s * y).sum(1) / (17 * eta**2), rtol=1e-10, atol=0)


def test_filter_and_appi(device):
    eta = 1e-2
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64) * eta
    def curve(b, A):
        return 3.0 - x * b + 0.5 * x * x * A

    flat = torch.full((5,), 3.0, dtype=torch.float64)
    noisy = curve(1.0, 10.0) + torch.tensor([0.0, 3e-3, 0.0, -3e-3, 0.0], dtype=torch.float64)
    nan_loss = curve(1.0, 10.0).clone()
    nan_loss[4] = math.nan
    losses = torch.stack([curve(1.0, 10.0), curve(-1.0, 10.0), curve(1.0, -10.0), noisy, nan_loss, flat,
                          curve(1.0, 10.0), curve(2.0, 5.0)])
    steps = x.expand(8, 5).clone()
    steps[6, 1] = math.inf
    counts = torch.tensor([10, 10, 10, 10, 10, 10, 10, 0])
    appi = torch.ones(8, dtype=torch.float64, device=device)
    result = adapeft.quadratic_fit(losses.to(device), steps.to(device), counts.to(device), appi)
    accepted = result.accepted.cpu().tolist()
    # b>0 A>0 exact | b<0 | A<0 | R^2 below 0.99 | nan loss | constant losses | inf step | no parameters
    assert accepted == [True, False, False, False, False, False, False, False]
    assert result.r2[5].item() == 1.0  # scikit-learn: a constant fitted exactly scores 1
    assert result.ppi.cpu().tolist()[0] == pytest.approx(1.0 / (10.0 * 10))
    assert result.ppi.cpu()[1:].eq(0).all() and result.eta_star.cpu()[1:].isnan().all()
    assert result.eta_star[0].item() == pytest.approx(0.1)
    assert appi.cpu().tolist() == pytest.approx([1.01] + [1.0] * 7)
    loose = adapeft.quadratic_fit(losses.to(device), steps.to(device), counts.to(device), r2_threshold=0.5)
    assert loose.accepted.cpu().tolist()[3] is True
    appi32 = torch.zeros(8, dtype=torch.float32, device=device)
    adapeft.quadratic_fit(losses.to(device), steps.to(device), counts.to(device), appi32)
    assert appi32[0].item() == pytest.approx(0.01)


def test_large_k(device, generator):
    """Many groups at once agree with the float64 twin up to rounding (summation order differs)."""
    groups = 1_000_000 if device == "cuda" else 200_000
    eta = 1e-3
    losses, steps, counts = quadratic_losses(generator, groups, noise=1e-3, eta=eta)
    result = adapeft.quadratic_fit(losses.to(device), steps.to(device), counts.to(device))
    twin = adapeft.FitResult(*reference.quadratic_fit(losses, steps, counts))
    atol = {"b": 3e-12 / eta, "A": 3e-12 / eta**2, "r2": 1e-9}
    for name, tolerance in atol.items():
        torch.testing.assert_close(getattr(result, name).cpu(), getattr(twin, name), rtol=1e-9, atol=tolerance,
                                   equal_nan=True, msg=name)
    clear = ((twin.b.abs() > 1e3 * atol["b"]) & (twin.A.abs() > 1e3 * atol["A"])
             & ((twin.r2 - 0.99).abs() > 1e-6))
    assert clear.float().mean() > 0.99
    assert torch.equal(result.accepted.cpu()[clear], twin.accepted[clear])


def test_errors_name_the_argument(device):
    losses = torch.zeros(3, 5, device=device)
    counts = torch.ones(3, device=device)
    with pytest.raises(Exception, match="losses must be K x M"):
        adapeft.quadratic_fit(losses[0], losses[0], counts)
    with pytest.raises(Exception, match="odd number of points"):
        adapeft.quadratic_fit(losses[:, :4], losses[:, :4], counts)
    with pytest.raises(Exception, match="steps has shape"):
        adapeft.quadratic_fit(losses, losses[:2], counts)
    with pytest.raises(Exception, match="counts must have one entry per group"):
        adapeft.quadratic_fit(losses, losses, counts[:2])
    with pytest.raises(Exception, match="appi must be a contiguous float32 or float64"):
        adapeft.quadratic_fit(losses, losses, counts, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(Exception, match="steps has unsupported dtype"):
        adapeft.quadratic_fit(losses, losses.int(), counts)


def test_reference_errors():
    with pytest.raises(ValueError, match="odd number of points"):
        reference.quadratic_fit(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2))


def test_opcheck(device, generator):
    eta = 1e-3
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64).expand(33, 5) * eta
    b = torch.rand(33, 1, generator=generator, dtype=torch.float64) + 0.1
    A = torch.rand(33, 1, generator=generator, dtype=torch.float64) * 100 + 1
    accepted_everywhere = (3 - x * b + 0.5 * x * x * A).to(device)
    mixed, steps, counts = quadratic_losses(generator, 33, noise=1e-2)
    appi = torch.zeros(33, dtype=torch.float64, device=device)
    counts = counts.to(device)
    for args in ((accepted_everywhere, x.to(device), counts, None, 0.99),
                 (accepted_everywhere.float(), x.to(device), counts, appi, 0.5)):
        torch.library.opcheck(torch.ops.adapeft.quadratic_fit.default, args)
    # A rejected group's eta* is nan, which the aot_dispatch comparison does not treat as equal.
    torch.library.opcheck(torch.ops.adapeft.quadratic_fit.default,
                          (mixed.to(device), steps.to(device), counts, appi, 0.99),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@requires_cuda
def test_cuda_equals_cpu(generator):
    losses, steps, counts = quadratic_losses(generator, 100_000, noise=1e-2)
    appi_cpu = torch.rand(100_000, dtype=torch.float64, generator=generator)
    appi_cuda = appi_cpu.cuda()
    on_cpu = adapeft.quadratic_fit(losses, steps, counts, appi_cpu)
    on_cuda = adapeft.quadratic_fit(losses.cuda(), steps.cuda(), counts.cuda(), appi_cuda)
    assert torch.equal(on_cpu.accepted, on_cuda.accepted.cpu())
    for name, a, b in zip(OUTPUTS, on_cpu, on_cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=0, equal_nan=True, msg=name)
    torch.testing.assert_close(appi_cuda.cpu(), appi_cpu, rtol=1e-12, atol=0)
