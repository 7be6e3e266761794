"""adapeft.Prober: correct numbers, zero host syncs, nothing changed, no copies, honest bf16, clear errors."""
import copy
import ctypes
import ctypes.util
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.probe import VERDICT
from adapeft.steps import OUTER_MOST

from conftest import forbid_host_sync, model_syncs_allowed, requires_cuda, train_then_backward

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
transformers = pytest.importorskip("transformers")


def cross_entropy(model, batch):
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs), labels)


def lm_loss(model, batch):
    # Computed here rather than by transformers, whose loss casts the logits to float32.
    logits = model(input_ids=batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def mlp(dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(32, 4)).to(dtype).to(device)
    batch = (torch.randn(128, 8, dtype=dtype, device=device), torch.randint(0, 4, (128,), device=device))
    return model, batch, cross_entropy


def tiny_gpt2(dtype=torch.float64, device="cpu", seed=0, attention="eager"):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        # Double backward (the Hessian oracle) needs the eager attention; CUDA graphs need sdpa (transformers'
        # eager attention copies a host tensor to the device).
        config._attn_implementation = attention
        model = transformers.GPT2LMHeadModel(config).to(dtype).to(device)
    batch = torch.randint(0, 61, (4, 16), device=device)
    return model, batch, lm_loss


def with_gradient(model, batch, loss_fn):
    model.eval()
    model.zero_grad()
    loss_fn(model, batch).backward()
    model.train()


def autograd_b_and_A(model, batch, loss_fn, groups):
    """G.g and g.H_kk.g per group with autograd (a Hessian-vector product on the group's block)."""
    was = model.training
    model.eval()
    out = []
    for name in groups.names:
        params = groups.params(name)
        g = [p.grad for p in params]
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=g)
        out.append((sum((a.double() * b.double()).sum().item() for a, b in zip(grads, g)),
                    sum((h.double() * b.double()).sum().item() for h, b in zip(hv, g))))
    model.train(was)
    return out


@pytest.mark.parametrize("make", [mlp, tiny_gpt2], ids=["mlp", "gpt2"])
@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_b_and_A_match_autograd_in_float64(make, backend):
    model, batch, loss_fn = make()
    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    prober = adapeft.Prober(model, groups, loss_fn, backend=backend)
    result = prober.step(batch, 1e-4)
    for k, (b, A) in enumerate(autograd_b_and_A(model, batch, loss_fn, groups)):
        name = groups.names[k]
        # Symmetric points cancel the cubic term's effect on b to O(eta^2); float64 rounding of losses near 3
        # is ~1e-16, far below b * eta: the relative error is ~1e-8 here, against a bound of 1e-4.
        assert result.b[k].item() == pytest.approx(b, rel=1e-4), name
        # A is determined to 1e-4 of itself unless the curvature is tiny next to the slope (a LayerNorm's
        # gain here: A/b ~ 4e-4), where the step's quartic term, not rounding, sets a floor of 1e-4 * b.
        assert result.A[k].item() == pytest.approx(A, rel=1e-4, abs=1e-4 * abs(b)), name
        if result.accepted[k] and abs(A) > 1e-2 * abs(b):
            assert result.ppi[k].item() == pytest.approx(b * b / (A * groups.numel[k]), rel=1e-3)
            assert result.eta_star[k].item() == pytest.approx(b / A, rel=1e-3)


@pytest.mark.parametrize("make, backend", [(mlp, "compiled"), (mlp, "torch"), (tiny_gpt2, "compiled")],
                         ids=["mlp-compiled", "mlp-torch", "gpt2-compiled"])
def test_three_points_match_autograd_in_float64_from_2k_plus_1_passes(make, backend):
    """points=3: b is the exact slope (the five-point probe's with slope='autograd', bit for bit), A from +-t alone
    matches d.H.d, at 2K+1 forward passes and one backward a probe (the adaptive first probe brackets first); the
    outer columns are nan."""
    model, batch, loss_fn = make()
    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    passes = [0]

    def counted(model, batch):
        passes[0] += not torch.is_grad_enabled()
        return loss_fn(model, batch)

    prober = adapeft.Prober(model, groups, counted, slope="autograd", points=3, backend=backend)
    five = adapeft.Prober(model, groups, loss_fn, slope="autograd", backend=backend)
    for _ in range(2):
        passes[0] = 0
        result, full = prober.step(batch, 1e-4), five.step(batch, 1e-4)
    assert passes[0] == 2 * len(groups) + 1
    assert torch.equal(result.b, full.b) and torch.equal(result.accepted, full.accepted)
    assert torch.isnan(result.losses[:, [0, 4]]).all() and torch.isnan(result.steps[:, [0, 4]]).all()
    assert torch.isfinite(result.losses[:, 1:4]).all()
    for k, (b, A) in enumerate(autograd_b_and_A(model, batch, loss_fn, groups)):
        assert result.b[k].item() == pytest.approx(b, rel=1e-9)
        assert result.A[k].item() == pytest.approx(A, rel=1e-4, abs=1e-4 * abs(b)), groups.names[k]
    for bad, message in ((4, "points must be one of"), (True, "points must be one of"),
                         (3, "points=3 needs slope='autograd'")):
        with pytest.raises(ValueError, match=message):
            adapeft.Prober(model, groups, loss_fn, points=bad, slope="autograd" if bad != 3 else "fit")


@pytest.mark.parametrize("slope", ["fit", "autograd"])
def test_float32_error_is_within_what_the_probe_reports(slope):
    """In float32, with the default steps, b and A agree with float64 autograd to within the errors the probe
    reports (ProbeResult.b_error and A_error: the measured noise through the fit, plus the loss's cubic and
    quartic terms where the five losses show them), at two standard deviations, at every probe."""
    model, batch, loss_fn = mlp(torch.float32)
    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    prober = adapeft.Prober(model, groups, loss_fn, slope=slope)
    exact = copy.deepcopy(model).double()  # the same weights and directions (the gradients), in float64
    for p, q in zip(exact.parameters(), model.parameters()):
        p.grad = q.grad.double()
    oracle = autograd_b_and_A(exact, (batch[0].double(), batch[1]), loss_fn, adapeft.group_parameters(exact))
    for _ in range(3):
        result = prober.step(batch, 1e-2)
        for k, (b, A) in enumerate(oracle):
            # b from autograd (its error 0) is float32's gradient: within float32's rounding of the exact one
            assert abs(result.b[k].item() - b) <= 2 * result.b_error[k].item() + 1e-5 * abs(b), groups.names[k]
            assert abs(result.A[k].item() - A) <= 2 * result.A_error[k].item(), groups.names[k]
        if slope == "autograd":
            assert torch.equal(result.b_error, torch.zeros_like(result.b_error))  # b is exact: only A is fitted


def test_backends_agree():
    model, batch, loss_fn = tiny_gpt2(torch.float32)
    with_gradient(model, batch, loss_fn)
    compiled = adapeft.Prober(model, None, loss_fn).step(batch, 1e-3)
    plain = adapeft.Prober(model, None, loss_fn, backend="torch").step(batch, 1e-3)
    assert torch.equal(compiled.losses, plain.losses)  # the same perturbed points, bit for bit
    torch.testing.assert_close(compiled.steps, plain.steps, rtol=1e-12, atol=0)
    for name in ("b", "A", "r2"):
        torch.testing.assert_close(getattr(compiled, name), getattr(plain, name), rtol=1e-8, atol=1e-12)
    assert torch.equal(compiled.accepted, plain.accepted)


def snapshot(model, optimizer):
    state = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "optimizer": {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for p, s in optimizer.state.items()},
        "cpu_rng": torch.get_rng_state(),
    }
    return state


def assert_same(before, after):
    for key in ("params", "grads", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name, value in before[key].items():
            other = after[key][name]
            assert torch.equal(value.view(torch.uint8) if value.dtype.is_floating_point else value,
                               other.view(torch.uint8) if other.dtype.is_floating_point else other), f"{key} {name}"
    assert before["modes"] == after["modes"]
    assert torch.equal(before["cpu_rng"], after["cpu_rng"])
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for pid, state in before["optimizer"].items():
        for k, v in state.items():
            assert torch.equal(v, after["optimizer"][pid][k]) if torch.is_tensor(v) else v == after["optimizer"][pid][k]


def trained_model():
    model, batch, loss_fn = mlp(torch.float32)
    model.add_module("5", torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_then_backward(model, optimizer, loss_fn, batch, 2)
    model[1].eval()  # a submodule in its own mode must keep it
    return model, batch, loss_fn, optimizer


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_nothing_changes(backend):
    model, batch, loss_fn, optimizer = trained_model()
    before = snapshot(model, optimizer)
    expected_next_random = torch.rand(3)
    torch.set_rng_state(before["cpu_rng"])

    def noisy_loss(model, batch):
        torch.rand(5)  # a loss that consumes randomness must not shift the training run's
        return loss_fn(model, batch)

    adapeft.Prober(model, None, noisy_loss, backend=backend).step(batch, 1e-3)
    assert_same(before, snapshot(model, optimizer))
    assert torch.equal(torch.rand(3), expected_next_random)


class TracedDropout(torch.nn.Dropout):
    """A module class with its own __setattr__, which records every training flag set on it."""

    def __setattr__(self, name, value):
        if name == "training":
            self.__dict__.setdefault("flags_set", []).append(value)
        super().__setattr__(name, value)


def test_training_flags_come_back_through_a_class_own_setattr():
    model, batch, loss_fn = mlp(torch.float32)
    model[3] = TracedDropout(0.1)
    with_gradient(model, batch, loss_fn)
    model[3].flags_set.clear()
    adapeft.Prober(model, None, loss_fn).step(batch, 1e-3)
    assert model[3].flags_set == [False, True]  # set by model.eval(), then put back through its own __setattr__
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize("failure", ["raise", "interrupt"])
def test_nothing_changes_when_loss_fn_fails_midway(failure):
    model, batch, loss_fn, optimizer = trained_model()
    before = snapshot(model, optimizer)
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 7:
            if failure == "raise":
                raise ValueError("out of memory, say")
            raise KeyboardInterrupt
        return loss_fn(model, batch)

    expected = (RuntimeError, "loss_fn.*failed with group") if failure == "raise" else (KeyboardInterrupt, None)
    with pytest.raises(expected[0], match=expected[1]):
        adapeft.Prober(model, None, failing).step(batch, 1e-3)
    assert_same(before, snapshot(model, optimizer))


# Run in a fresh process: the float32 precision settings are the process's, and once the per-backend
# ones are set torch refuses reads of the global ones for the rest of the process.
PRECISION_SCRIPT = r"""
import sys, torch, adapeft
from test_probe import mlp, with_gradient
how = sys.argv[1]
if how == "global":
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
elif how == "per_backend":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"

def settings():
    per_backend = [getattr(getattr(torch.backends, b), op).fp32_precision
                   for b, op in (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"),
                                 ("mkldnn", "conv"), ("mkldnn", "rnn"))]
    if how == "per_backend":
        return per_backend
    return per_backend + [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                          torch.backends.cudnn.allow_tf32]

def full_precision():
    if how == "per_backend":
        return all(p == "ieee" for p in settings())
    return torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32 \
        and not torch.backends.cudnn.allow_tf32

model, batch, loss_fn = mlp(torch.float32)
with_gradient(model, batch, loss_fn)
before = settings()
seen, fail_at = [], []

def watched(model, batch):
    seen.append(full_precision())
    if len(seen) in fail_at:
        raise ValueError("fails midway")
    return loss_fn(model, batch)

adapeft.Prober(model, None, watched).step(batch, 1e-3)
assert settings() == before, (settings(), before)
fail_at.append(len(seen) + 3)
try:
    adapeft.Prober(model, None, watched).step(batch, 1e-3)
    raise AssertionError("the second probe did not fail")
except RuntimeError:
    pass
assert settings() == before, (settings(), before)
assert len(seen) == fail_at[0] and all(seen), seen
assert not full_precision() or how == "untouched"
print("precision checked", how)
"""


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch before 2.9 has no per-backend precision settings")
@pytest.mark.parametrize("how", ["untouched", "global", "per_backend"])
def test_probe_measures_at_full_float32_precision_and_restores_the_settings(how):
    """A process that trains in TF32 (or bfloat16-emulated float32 on CPUs) still probes at full float32
    precision, set through whichever API the process uses; the settings come back exactly, also after
    a failed probe."""
    done = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT, how], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and f"precision checked {how}" in done.stdout, done.stdout + done.stderr[-3000:]


@requires_cuda
def test_cuda_probe_under_tf32_equals_the_float32_probe():
    """With TF32 on for training, the probe's losses are those of full float32 matrix products, which TF32
    ones are not (checked, so that the test can fail)."""
    model, batch, loss_fn = tiny_gpt2(torch.float32, "cuda", attention="sdpa")
    with_gradient(model, batch, loss_fn)
    previous = torch.get_float32_matmul_precision()
    try:
        want = adapeft.Prober(model, None, loss_fn).step(batch, 1e-4)
        full = loss_fn(model, batch)
        torch.set_float32_matmul_precision("high")
        assert not torch.equal(loss_fn(model, batch), full)
        got = adapeft.Prober(model, None, loss_fn).step(batch, 1e-4)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_same_probe(got, want)


def test_nan_loss_rejects_only_that_group():
    model, batch, loss_fn, optimizer = trained_model()
    before = snapshot(model, optimizer)
    groups = adapeft.group_parameters(model)
    first = groups.params(groups.names[0])[0]
    unperturbed = first.detach().clone()

    def sometimes_nan(model, batch):  # nan at the points where the first group's step is positive
        loss = loss_fn(model, batch)
        return loss * math.nan if bool(((first - unperturbed) * first.grad < 0).any()) else loss

    result = adapeft.Prober(model, groups, sometimes_nan).step(batch, 1e-2)
    assert not result.accepted[0] and torch.isnan(result.losses[0]).any()
    assert result.accepted[1:].any()
    assert_same(before, snapshot(model, optimizer))


def glibc_in_use():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_no_copies_on_cpu(backend):
    """While the model is perturbed, the probe holds its side buffers and nothing the size of a group."""
    try:
        glibc_in_use()
    except (AttributeError, OSError):
        pytest.skip("needs glibc's mallinfo2")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 4))
    batch = (torch.randn(8, 512), torch.randint(0, 4, (8,)))
    with_gradient(model, batch, cross_entropy)
    in_use = []

    def measured(model, batch):
        in_use.append(glibc_in_use())
        return cross_entropy(model, batch)

    prober = adapeft.Prober(model, None, measured, backend=backend)
    prober.step(batch, 1e-3)  # the first step allocates the ledgers and tables
    in_use.clear()
    prober.step(batch, 1e-3)
    extra = max(in_use[1:]) - in_use[0]
    largest_group = max(g * 4 for g in prober.groups.numel)
    if backend == "compiled":
        assert extra < 64 * 1024, f"{extra} bytes held while perturbed"
    else:
        assert extra >= largest_group, "the plain backend keeps a copy of the group; the test should see it"


def test_bf16_steps_below_resolution_are_flagged():
    model, batch, loss_fn = mlp(torch.bfloat16)
    with_gradient(model, batch, loss_fn)
    with pytest.warns(UserWarning, match=r"did not move: groups \[.*'others'.*\]: most of their elements did not "
                                          r"change.*below the resolution.*float32 master weights"):
        result = adapeft.Prober(model, None, loss_fn, step_policy="fixed").step(batch, 1e-7)
    others = result.names.index("others")
    assert not result.reliable[others] and not result.accepted[others]
    assert result.changed[others, [0, 1, 3, 4]].max() < 0.5 * adapeft.group_parameters(model).numel[others]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        larger = adapeft.Prober(model, None, loss_fn).step(batch, 0.3)  # well above the resolution
    assert larger.reliable[others]  # (acceptance is another matter: a bfloat16 loss is itself coarse)
    assert not any("'others'" in str(w.message) for w in caught)
    assert result.reasons()[others] == "did not move"
    # Steps of their own grow where the elements did not move: 64 times in each of the first probe's two
    # bracketing rounds, 16 times a probe after that.
    adapting = adapeft.Prober(model, None, loss_fn)
    first = adapting.step(batch, 1e-7)
    assert bool((first.scale >= 1e-7 * 64**2 * (1 - 1e-6)).all())
    second = adapting.step(batch, 1e-7)
    assert first.reasons()[others] != "did not move" or \
        second.scale[others].item() >= 16 * first.scale[others].item() * (1 - 1e-6)


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_a_sparse_direction_is_reliable(backend):
    """An embedding's gradient is zero on the rows a batch does not use, so few of its elements move; the
    realized step along the direction is the nominal one, and the fit holds (here in float32, against float64
    autograd at the same point)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(2000, 16), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    batch = (torch.randint(0, 20, (32, 4)), torch.randint(0, 3, (32,)))  # 20 of the 2000 rows in use

    def loss_fn(model, batch):
        return cross_entropy(model, batch)

    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that the embedding did not move
        result = adapeft.Prober(model, groups, loss_fn, backend=backend, step_policy="fixed").step(batch, 1.0)  # resolves A
    embed = groups.names.index("embed")
    assert result.changed[embed, [0, 1, 3, 4]].max() < 0.02 * groups.numel[embed]
    assert result.reliable[embed] and result.resolved[embed] and result.accepted[embed]
    b, _ = autograd_b_and_A(model.double(), (batch[0], batch[1]), loss_fn, groups)[embed]
    assert result.b[embed].item() == pytest.approx(b, rel=1e-3)


def test_curvature_below_the_loss_rounding_is_not_resolved():
    """At a step so small that A t^2 / 2 is within a few float32 roundings of the loss, A is noise and
    APPI ~ b^2 / A with it: such fits are not resolved (the noise moves A by more than 10%), and
    require_resolved=True never accepts them. The same steps in float64 resolve."""
    from adapeft.steps import RESOLVED_SHARE
    from adapeft.steps import ROUNDINGS_PER_NOISE, fit_weights
    eta = 1e-5
    for dtype, expect_resolved in ((torch.float32, False), (torch.float64, True)):
        model, batch, loss_fn = mlp(dtype)
        with_gradient(model, batch, loss_fn)
        result = adapeft.Prober(model, None, loss_fn, require_resolved=True, step_policy="fixed").step(batch, eta)
        # the resolution: the loss's rounding (the measured noise is that of a forward pass in its own dtype)
        assert result.resolution == torch.finfo(dtype).eps * result.losses[0, 2].abs()
        # resolved: the noise through the fit's weights moves A by at most RESOLVED_SHARE of it
        _, weights = fit_weights(result.steps, slope_known=False)
        moved_by_noise = result.resolution / ROUNDINGS_PER_NOISE * (weights.square().sum(1) + weights.sum(1).square()).sqrt()
        assert bool((result.A_error >= moved_by_noise).all())  # the error reported holds the noise's part
        assert torch.equal(result.resolved, moved_by_noise <= RESOLVED_SHARE * result.A.abs())
        assert not bool((result.accepted & ~result.resolved).any())
        if expect_resolved:  # every group of a curvature clear of 0, whatever its sign
            assert bool(result.resolved[result.A.abs() > 1e-3].all()) and bool(result.accepted.any())
        else:
            assert not bool(result.resolved.any())


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_steps_of_their_own_resolve_groups_far_below_resolution_at_eta(backend):
    """At eta = 1e-5 no float32 group is resolved (above); with steps of their own (the default) each group's
    step grows from eta as its fits ask (a first round at eta brackets it, so the first probe is already at a
    larger step), every group is resolved from the second probe on, and b and A agree with float64 autograd
    at the same point."""
    model, batch, loss_fn = mlp(torch.float32)
    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    prober = adapeft.Prober(model, groups, loss_fn, backend=backend)
    results = [prober.step(batch, 1e-5) for _ in range(4)]
    oracle = autograd_b_and_A(model.double(), (batch[0].double(), batch[1]), loss_fn, groups)  # the same point
    assert bool((results[0].scale > 1e-5).all())
    curved = torch.tensor([abs(A) > 1e-2 * abs(b) for b, A in oracle])  # the norm gain's A is ~0 here
    for result in results[1:]:
        assert bool(result.resolved[curved].all()) and bool(result.reliable.all())
        # The inner points at +-t_k, the outer ones at the ratio adapeft.steps.outer_ratio gives
        ratio = result.steps[:, 4] / result.steps[:, 3]
        assert bool(((ratio >= 2 * (1 - 1e-3)) & (ratio <= OUTER_MOST * (1 + 1e-3))).all())
        nominal = result.scale[:, None] * torch.stack([-ratio, -torch.ones_like(ratio), torch.ones_like(ratio), ratio], 1)
        assert torch.allclose(result.steps[:, [0, 1, 3, 4]], nominal, rtol=1e-3)
        for k, (b, A) in enumerate(oracle):
            # Where the outer points went far out (the norm gain's, whose A is ~0), the cubic term moves b by up
            # to what the probe says it may
            b_error = max(1e-2 * abs(b), 2 * result.b_error[k].item())
            assert result.b[k].item() == pytest.approx(b, abs=b_error), groups.names[k]
            assert result.A[k].item() == pytest.approx(A, rel=5e-2, abs=1e-2 * abs(b)), groups.names[k]


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_outer_points_resolve_a_curvature_that_dropped_since_the_last_probe(backend, monkeypatch):
    """The step comes from the last probe, but the direction moved: from a stiff axis (A = 1e4) to a flat one
    (A = 1). At the step the stiff axis chose, the flat curvature is below the loss's resolution at +-2 t: the
    outer points, placed from what the inner ones show, go far enough out to resolve it, and A is right. With
    the outer points held at +-2 t (OUTER_MOST = 2) the same probe leaves it unresolved."""
    def probe_twice():
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(torch.tensor([0.3, 0.2]))
        stiffness = torch.tensor([1e4, 1.0])

        def loss_fn(model, batch):
            return 0.5 * (stiffness * model.w * model.w).sum() + model.w.sum() + 2.0

        direction = torch.tensor([1.0, 0.0])
        prober = adapeft.Prober(model, adapeft.group_parameters(model, rules=[("w", "w")]), loss_fn,
                                direction={"w": [direction]}, backend=backend)
        first = prober.step(None, 1e-6)
        direction.copy_(torch.tensor([0.0, 1.0]))
        return first, prober.step(None, 1e-6)

    first, second = probe_twice()
    assert bool(first.resolved[0]) and first.A[0].item() == pytest.approx(1e4, rel=1e-3)
    assert bool(second.resolved[0]) and second.A[0].item() == pytest.approx(1.0, rel=1e-2)
    assert second.steps[0, 4] / second.steps[0, 3] > 8
    monkeypatch.setattr(adapeft.steps, "OUTER_MOST", 2.0)
    _, held = probe_twice()
    assert not bool(held.resolved[0])


def test_a_loss_that_is_no_parabola_is_still_rejected():
    """|w - w0| along d: a kink at every probe point's centre. No step makes a parabola fit it (R^2 about 0.83
    whatever the scale), so adapting the step never makes it accepted. Beside it, smooth groups, from whose
    fourth differences the loss's noise is measured (the kink's own is no noise, and is outvoted)."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(64))
    for i in range(4):
        model.register_parameter(f"v{i}", torch.nn.Parameter(torch.randn(8)))
    center = model.w.detach().clone()

    def kink(model, batch):
        smooth = sum((getattr(model, f"v{i}") ** 2).sum() * (i + 1) for i in range(4))
        return (model.w - center).abs().sum() + smooth + 1.0

    groups = adapeft.group_parameters(model, rules=[(name, name) for name in ("w", "v0", "v1", "v2", "v3")])
    directions = {"w": [torch.ones(64)], **{f"v{i}": [torch.randn(8)] for i in range(4)}}
    prober = adapeft.Prober(model, groups, kink, direction=directions)
    for _ in range(3):
        result = prober.step(None, 1e-2)
        assert not bool(result.accepted[0]) and result.r2[0].item() < 0.9 and bool(result.resolved[0])
        assert result.reasons()[0] in ("b <= 0", "R^2") and bool(result.resolved[1:].all())  # b = 0: symmetric
    assert torch.equal(model.w.detach(), center)


def lm_loss_in_float32(model, batch):
    logits = model(input_ids=batch).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def test_noise_of_a_bfloat16_forward_is_measured_and_float32_compute_removes_it():
    """A bfloat16 forward pass rounds every activation: the probe measures that noise (far above a float32
    loss's rounding) and resolves curvatures against it. compute="float32" gives the losses of the model stored
    in float32, bit for bit, from the bfloat16 weights, and the noise of float32; the weights stay as they were."""
    import copy
    model, batch, _ = tiny_gpt2(torch.bfloat16, attention="sdpa")
    batch = torch.randint(0, 61, (8, 32))
    with_gradient(model, batch, lm_loss_in_float32)
    stored = [p.detach().clone() for p in model.parameters()]
    native = adapeft.Prober(model, None, lm_loss_in_float32).step(batch, 1e-2)
    raised = adapeft.Prober(model, None, lm_loss_in_float32, compute="float32").step(batch, 1e-2)
    with torch.no_grad():
        want = lm_loss_in_float32(copy.deepcopy(model).float().eval(), batch)
    assert torch.equal(raised.losses[:, 2], want.double().expand(len(raised.names)))
    eps = torch.finfo(torch.float32).eps * want.item()
    # measured: noise 13 roundings in bfloat16, 1.6 in float32 (the rest: the weights' own bfloat16 steps)
    assert native.noise.item() > 4 * raised.noise.item() and native.resolution.item() > 20 * eps
    assert raised.resolution.item() < 10 * eps
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), stored))
    with pytest.raises(ValueError, match="compute must be one of"):
        adapeft.Prober(model, None, lm_loss_in_float32, compute="fp32")


def test_frozen_groups_are_skipped_with_a_note():
    model, batch, loss_fn = mlp(torch.float64)
    model[1].requires_grad_(False)
    with_gradient(model, batch, loss_fn)
    with pytest.warns(UserWarning, match=r"group 'norm': 1 of its 1 tensors have no gradient"):
        result = adapeft.Prober(model, None, loss_fn).step(batch, 1e-4)
    norm = result.names.index("norm")
    assert not result.probed[norm] and not result.accepted[norm] and result.probed.sum() == len(result.names) - 1


def test_appi_and_history_accumulate():
    model, batch, loss_fn = mlp(torch.float64)
    with_gradient(model, batch, loss_fn)
    prober = adapeft.Prober(model, None, loss_fn)
    first = prober.step(batch, 1e-4)
    second = prober.step(batch, 1e-4)
    torch.testing.assert_close(prober.appi, first.ppi + second.ppi)
    assert len(prober.history) == 2 and torch.equal(prober.history[1], second.ppi)
    functional = adapeft.probe(model, batch, loss_fn, 1e-4)
    torch.testing.assert_close(functional.b, second.b)


def bits(tensors):
    return [t.detach().clone().view(torch.int64 if t.dtype == torch.float64 else torch.int32) for t in tensors]


@pytest.mark.parametrize("make", [mlp, tiny_gpt2], ids=["mlp", "gpt2"])
@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_exact_slope_is_the_probe_mode_gradient_along_the_direction(make, backend):
    """slope="autograd": b is g.d with g the eval-mode gradient on the probe batch, exactly (float64 autograd
    at the same point, to rounding); A is fitted through it and still matches d.H.d; the five points' own
    slope agrees (slope_error ~ 0 on a float64 parabola); p.grad, taken in train mode with dropout, is
    untouched, and b is not |p.grad|^2."""
    model, batch, loss_fn = make()
    model.train()
    model.zero_grad()
    loss_fn(model, batch).backward()
    groups = adapeft.group_parameters(model)
    grads = bits(p.grad for p in model.parameters())
    result = adapeft.Prober(model, groups, loss_fn, backend=backend, slope="autograd").step(batch, 1e-4)
    assert all(torch.equal(a, b) for a, b in zip(grads, bits(p.grad for p in model.parameters())))
    for k, (b, A) in enumerate(autograd_b_and_A(model, batch, loss_fn, groups)):
        name = groups.names[k]
        assert result.b[k].item() == pytest.approx(b, rel=1e-12), name
        assert result.A[k].item() == pytest.approx(A, rel=1e-4, abs=1e-4 * abs(b)), name
        assert abs(result.slope_error[k].item()) < 1e-5, name
        assert result.b_fit[k].item() == pytest.approx(b, rel=1e-5), name
    if make is mlp:  # dropout: the training gradient is not the probe's
        squared = torch.tensor([sum(p.grad.double().square().sum() for p in groups.params(n)) for n in groups.names])
        assert not torch.allclose(result.b, squared, rtol=1e-3)


def test_exact_slope_along_the_optimizer_update():
    """direction="optimizer": b = g.u with u the AdamW update per unit learning rate, against u read off a copy
    of the optimizer stepped at lr = 1 (w - w_after), and the five points' slope agrees."""
    import copy
    model, batch, loss_fn = mlp(torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train_then_backward(model, optimizer, loss_fn, batch, 3)
    groups = adapeft.group_parameters(model)
    result = adapeft.Prober(model, groups, loss_fn, direction="optimizer", optimizer=optimizer,
                            slope="autograd").step(batch, 1e-4)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1.0, weight_decay=0.1)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    for group in twin_optimizer.param_groups:
        group["lr"] = 1.0
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    before = [p.detach().clone() for p in twin.parameters()]
    twin_optimizer.step()
    update = {id(p): w0 - t.detach() for p, w0, t in zip(model.parameters(), before, twin.parameters())}
    model.eval()
    g = dict(zip(map(id, model.parameters()), torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))))
    model.train()
    for k, name in enumerate(groups.names):
        expected = sum((g[id(p)] * update[id(p)]).sum().item() for p in groups.params(name))
        assert result.b[k].item() == pytest.approx(expected, rel=1e-9), name
        assert abs(result.slope_error[k].item()) < 1e-4, name


def test_slope_error_sees_a_cubic_that_r2_lets_through():
    """L = 2 - x + x^2/2 + c x^3 at the step x along d: the exact slope is 1; the five points' least squares
    puts the cubic's odd part into their slope, 1 - c sum(x^4)/sum(x^2) = 1 - c 17/5 t^2, which R^2 barely
    sees."""
    w = torch.nn.Parameter(torch.zeros(16, dtype=torch.float64))
    model = torch.nn.Module()
    model.w = w
    c = 30.0

    def cubic(model, batch):
        x = -model.w.mean()  # w = w0 - x d with w0 = 0 and d = 1
        return 2 - x + x * x / 2 + c * x ** 3

    groups = adapeft.group_parameters(model, rules=[("w", "w")])
    direction = {"w": [torch.ones(16, dtype=torch.float64)]}
    result = adapeft.Prober(model, groups, cubic, direction=direction, slope="autograd",
                            step_policy="fixed").step(None, 1e-2)
    t = result.scale[0].item()
    assert result.b[0].item() == pytest.approx(1.0, rel=1e-12)
    assert result.slope_error[0].item() == pytest.approx(-c * 17 / 5 * t * t, rel=1e-6)
    assert result.r2[0].item() > 0.99 and abs(result.slope_error[0].item()) > 1e-2
    assert torch.equal(model.w.detach(), torch.zeros(16, dtype=torch.float64))


def test_exact_slope_of_a_frozen_tensor_and_errors():
    model, batch, loss_fn = mlp(torch.float64)
    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    given = {name: [p.grad.clone() for p in groups.params(name)] for name in groups.names}
    exact = adapeft.Prober(model, groups, loss_fn, slope="autograd").step(batch, 1e-4).b
    assert torch.isnan(adapeft.Prober(model, groups, loss_fn).step(batch, 1e-4).slope_error).all()  # slope="fit"
    for p in model.parameters():
        p.requires_grad_(False)
    from_given = adapeft.Prober(model, groups, loss_fn, direction=given, slope="autograd").step(batch, 1e-4)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(from_given.b, exact, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="slope must be one of"):
        adapeft.Prober(model, groups, loss_fn, slope="exact")
    weights = bits(model.parameters())

    def detached(model, batch):
        return loss_fn(model, batch).detach()

    with pytest.raises(RuntimeError, match="slope='autograd' needs a loss_fn"):
        adapeft.Prober(model, groups, detached, direction=given, slope="autograd").step(batch, 1e-4)
    assert all(torch.equal(a, b) for a, b in zip(weights, bits(model.parameters())))
    assert not any(p.requires_grad for p in model.parameters())


def test_custom_directions():
    model, batch, loss_fn = mlp(torch.float64)
    with_gradient(model, batch, loss_fn)
    groups = adapeft.group_parameters(model)
    given = {name: [p.grad.clone() for p in groups.params(name)] for name in groups.names}
    from_dict = adapeft.Prober(model, groups, loss_fn, direction=given).step(batch, 1e-4)
    from_grad = adapeft.Prober(model, groups, loss_fn).step(batch, 1e-4)
    torch.testing.assert_close(from_dict.b, from_grad.b)
    only_head = adapeft.Prober(model, groups, loss_fn,
                               direction=lambda name, params: given[name] if name == "head" else None)
    with pytest.warns(UserWarning, match="no direction was given"):
        result = only_head.step(batch, 1e-4)
    assert result.probed.tolist() == [name == "head" for name in groups.names]


def test_bad_input_is_named_and_changes_nothing():
    other, _, _ = mlp(torch.float32, seed=1)
    split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    model, batch, loss_fn, optimizer = trained_model()
    wrong_batch = (torch.randn(3, 5), batch[1])
    before = snapshot(model, optimizer)
    prober = adapeft.Prober(model, None, loss_fn)
    for eta, error in ((0.0, ValueError), (-1e-3, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                       ("1e-3", TypeError), (True, TypeError)):
        with pytest.raises(error, match="eta must be"):
            prober.step(batch, eta)
    with pytest.raises(RuntimeError, match=r"loss_fn\(model, batch\) failed on the unperturbed model"):
        prober.step(wrong_batch, 1e-3)
    with pytest.raises(TypeError, match="loss_fn must return a one-element floating tensor"):
        adapeft.Prober(model, None, lambda m, b: 1.0).step(batch, 1e-3)
    with pytest.raises(TypeError, match=r"floating tensor, got a torch.int64 tensor of shape \(\)"):
        adapeft.Prober(model, None, lambda m, b: loss_fn(m, b).long()).step(batch, 1e-3)
    with pytest.raises(ValueError, match="not this model's"):
        adapeft.Prober(model, adapeft.group_parameters(other), loss_fn)
    with pytest.raises(TypeError, match="groups must come from adapeft.group_parameters"):
        adapeft.Prober(model, ["head"], loss_fn)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        adapeft.Prober(model, None, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        adapeft.Prober(model, None, loss_fn, backend="numpy")
    with pytest.raises(ValueError, match="on several devices"):
        adapeft.Prober(split, None, loss_fn)
    assert_same(before, snapshot(model, optimizer))


@requires_cuda
@pytest.mark.parametrize("slope", ["fit", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_has_no_host_sync(dtype, slope):
    model, batch, loss_fn = tiny_gpt2(dtype, "cuda")
    with_gradient(model, batch, loss_fn)

    prober = adapeft.Prober(model, None, model_syncs_allowed(loss_fn), slope=slope)
    prober.step(batch, 1e-2)  # warm-up: tables, ledgers and kernels are set up outside the check
    with forbid_host_sync():
        result = prober.step(batch, 1e-2)
    assert result.probed.all() and torch.isfinite(result.losses).all()
    if dtype == torch.float32:
        assert result.accepted.any()


@requires_cuda
def test_cuda_memory_is_bounded_by_side_buffers():
    model, batch, loss_fn = tiny_gpt2(torch.float32, "cuda")
    with_gradient(model, batch, loss_fn)
    prober = adapeft.Prober(model, None, loss_fn)
    prober.step(batch, 1e-3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        loss_fn(model.eval(), batch)
    forward_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    prober.step(batch, 1e-3)
    probe_peak = torch.cuda.max_memory_allocated() - base
    side = prober.ledger_bytes + 1 << 20
    assert probe_peak <= forward_peak + side, (probe_peak, forward_peak, side)


@requires_cuda
def test_cuda_and_cpu_probes_agree():
    cpu_model, batch, loss_fn = tiny_gpt2(torch.float64)
    with_gradient(cpu_model, batch, loss_fn)
    cuda_model, _, _ = tiny_gpt2(torch.float64, "cuda")
    cuda_model.load_state_dict(cpu_model.state_dict())
    for p, q in zip(cuda_model.parameters(), cpu_model.parameters()):
        p.grad = q.grad.cuda()
    on_cpu = adapeft.Prober(cpu_model, None, loss_fn).step(batch, 1e-4)
    on_cuda = adapeft.Prober(cuda_model, None, loss_fn).step(batch.cuda(), 1e-4)
    torch.testing.assert_close(on_cuda.b.cpu(), on_cpu.b, rtol=1e-6, atol=0)
    # A is only determined to ~1e-4 of the slope where the curvature is tiny (see the autograd test).
    for k in range(len(on_cpu.names)):
        assert on_cuda.A[k].item() == pytest.approx(on_cpu.A[k].item(), rel=1e-4, abs=1e-4 * abs(on_cpu.b[k].item()))


def test_cuda_graph_option_is_checked_and_harmless_on_cpu():
    model, batch, loss_fn = mlp()
    with_gradient(model, batch, loss_fn)
    with pytest.raises(ValueError, match="cuda_graph=True needs backend='compiled'"):
        adapeft.Prober(model, None, loss_fn, backend="torch", cuda_graph=True)
    with pytest.warns(UserWarning, match="cuda_graph=True has no effect on cpu"):
        graphed = adapeft.Prober(model, None, loss_fn, cuda_graph=True)
    eager = adapeft.Prober(model, None, loss_fn)
    assert torch.equal(graphed.step(batch, 1e-3).b, eager.step(batch, 1e-3).b)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bits_equal(before, model):
    for w0, p in zip(before, model.parameters()):
        assert torch.equal(w0.view(torch.uint8), p.detach().view(torch.uint8))


def assert_same_probe(got, want):
    """The same verdicts; the same losses and moved elements but where a group's ledger ran full (which of its
    chunks then stay unmoved depends on the order the blocks reserve ledger room, on CUDA: such a group is
    rejected as "ledger full", and its losses are not reproducible); the realized steps to float64 rounding
    (the CUDA and CPU kernels add a group's float64 sums in different orders), and so b and A of the accepted
    groups (a rejected group's b can be pure rounding noise)."""
    torch.testing.assert_close(got.verdict, want.verdict, rtol=0, atol=0)
    kept = want.verdict != VERDICT["ledger full"]
    for field in ("losses", "changed", "accepted"):
        torch.testing.assert_close(getattr(got, field)[kept], getattr(want, field)[kept], rtol=0, atol=0,
                                   equal_nan=True)
    torch.testing.assert_close(got.steps[kept], want.steps[kept], rtol=1e-12, atol=0, equal_nan=True)
    for field in ("b", "A"):
        torch.testing.assert_close(getattr(got, field)[want.accepted], getattr(want, field)[want.accepted],
                                   rtol=1e-9, atol=0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_match_eager(dtype):
    model, batch, loss_fn = tiny_gpt2(dtype, "cuda", attention="sdpa")
    with_gradient(model, batch, loss_fn)
    other_batch = torch.randint(0, 61, batch.shape, device="cuda")
    longer_batch = torch.randint(0, 61, (4, 24), device="cuda")
    eager = adapeft.Prober(model, None, loss_fn)
    graphed = adapeft.Prober(model, None, loss_fn, cuda_graph=True)
    before = weights(model)
    # capture (step 1), replays with new values at the same addresses (a new eta, a new batch), a new shape
    for b, eta in ((batch, 1e-2), (batch, 2e-2), (other_batch, 1e-2), (longer_batch, 1e-2), (batch, 1e-2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = graphed.step(b, eta)
        assert not [w for w in caught if "cuda_graph" in str(w.message)]  # captured or replayed, never eager
        assert_bits_equal(before, model)
        want = eager.step(b, eta)
        assert_bits_equal(before, model)
        assert_same_probe(got, want)
    assert graphed.graph_captures >= 3 and graphed.graph_disabled is None  # each new shape is a new capture
    torch.testing.assert_close(graphed.appi, eager.appi, rtol=1e-12, atol=0)


@requires_cuda
def test_cuda_graph_follows_new_gradients_and_has_no_host_sync():
    model, batch, loss_fn = tiny_gpt2(torch.float32, "cuda", attention="sdpa")
    with_gradient(model, batch, loss_fn)
    graphed = adapeft.Prober(model, None, loss_fn, cuda_graph=True)
    eager = adapeft.Prober(model, None, loss_fn)
    first = next(model.parameters())
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.grad.mul_(1.5)  # new values at the same addresses: the graph replays them
            if step == 1:
                first.grad = first.grad.clone()  # a new address: a new table and a new capture
        with forbid_host_sync(active=step >= 2):  # replays
            got = graphed.step(batch, 1e-2)
        assert_same_probe(got, eager.step(batch, 1e-2))
    assert graphed.graph_captures >= 2 and graphed.graph_disabled is None  # the new address made a new capture


@requires_cuda
def test_cuda_graph_recaptures_when_a_tensor_outside_the_groups_moves():
    """A parameter that no group probes (it has no gradient) but the forward pass reads, given new storage
    between steps: a replay would read its old address, so the prober captures again."""
    model, batch, loss_fn = tiny_gpt2(torch.float32, "cuda", attention="sdpa")
    with_gradient(model, batch, loss_fn)
    still = model.transformer.ln_f.weight
    still.grad = None
    graphed = adapeft.Prober(model, None, loss_fn, cuda_graph=True)
    eager = adapeft.Prober(model, None, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the group of the parameter without a gradient says so
        for step in range(3):
            if step == 2:
                with torch.no_grad():
                    still.data = still.data * 2  # new values at a new address
            got = graphed.step(batch, 1e-2)
            assert_same_probe(got, eager.step(batch, 1e-2))
            assert graphed.graph_captures == (1 if step < 2 else 2)


@requires_cuda
def test_cuda_graph_falls_back_to_eager_when_capture_fails():
    model, batch, loss_fn = tiny_gpt2(torch.float32, "cuda", attention="sdpa")
    with_gradient(model, batch, loss_fn)

    def synchronising(model, batch):
        loss = loss_fn(model, batch)
        loss.item()  # a host synchronisation: not capturable
        return loss

    before = weights(model)
    eager = adapeft.Prober(model, None, loss_fn)
    wanted = [eager.step(batch, 1e-2) for _ in range(2)]  # each probe's steps come from the last one's fit
    graphed = adapeft.Prober(model, None, synchronising, cuda_graph=True)
    with pytest.warns(UserWarning, match="capturing the forward passes failed"):
        first = graphed.step(batch, 1e-2)
    assert_bits_equal(before, model)
    second = graphed.step(batch, 1e-2)
    assert_bits_equal(before, model)
    for got, want in zip((first, second), wanted):
        assert_same_probe(got, want)
    torch.randint(0, 2, (3,), device="cuda")  # the device's generator still works after the failed capture
    with pytest.warns(UserWarning, match="the batch holds a tensor on cpu"):
        adapeft.Prober(model, None, lambda m, b: loss_fn(m, b.cuda()), cuda_graph=True).step(batch.cpu(), 1e-2)
    assert_bits_equal(before, model)


@requires_cuda
def test_cuda_graph_restores_when_loss_fn_fails_after_capture():
    model, batch, loss_fn = tiny_gpt2(torch.float32, "cuda", attention="sdpa")
    with_gradient(model, batch, loss_fn)
    failing = {"shape": None, "calls": 0}

    def sometimes_failing(model, batch):
        if batch.shape == failing["shape"]:
            failing["calls"] += 1
            if failing["calls"] == 7:  # mid-way, with the second group perturbed
                raise ValueError("this batch cannot be scored")
        return loss_fn(model, batch)

    graphed = adapeft.Prober(model, None, sometimes_failing, cuda_graph=True)
    graphed.step(batch, 1e-2)
    before = weights(model)
    failing["shape"] = (4, 24)
    with pytest.raises(RuntimeError, match="this batch cannot be scored"):
        graphed.step(torch.randint(0, 61, (4, 24), device="cuda"), 1e-2)  # a new shape: eager warm-up, fails
    assert_bits_equal(before, model)
    assert torch.isfinite(graphed.step(batch, 1e-2).losses).all()
    assert_bits_equal(before, model)


def test_tables_are_built_once_while_nothing_moves():
    model, batch, loss_fn = mlp(torch.float32)
    with_gradient(model, batch, loss_fn)
    prober = adapeft.Prober(model, None, loss_fn)
    prober.step(batch, 1e-3)
    prober.flush()
    kept = {name: prober.perturbation(name) for name in prober.names}
    prober.step(batch, 1e-3)
    assert all(prober.perturbation(name) is group for name, group in kept.items())
    with torch.no_grad():  # a new direction at a new address: that group's table is rebuilt
        model[0].weight.grad = model[0].weight.grad.clone()
    prober.step(batch, 1e-3)
    changed = [name for name, group in kept.items() if prober.perturbation(name) is not group]
    assert changed == ["others"], changed  # 0.weight is the only tensor of "others"


def test_the_ledger_grows_with_the_steps_it_will_be_asked_to_hold(monkeypatch):
    """A step 16 times the last one saves several times the elements (benchmarks/bench_ledger.py): the room the
    prober makes for the next probe grows with its groups' steps, so no later probe runs its ledger full (the
    ledger starts empty here, so the first probe does)."""
    from adapeft import steps
    from adapeft.probe import ledgers
    monkeypatch.setattr(ledgers, "SAVE_ALL_BELOW", 1)
    monkeypatch.setattr(ledgers, "CAPACITY_FRACTION", 0.0)
    monkeypatch.setattr(steps, "next_scale", lambda scale, *args, **kwargs: scale * 16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    batch = (torch.randn(64, 256), torch.randint(0, 4, (64,)))
    with_gradient(model, batch, cross_entropy)
    prober = adapeft.Prober(model, None, cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verdicts = [prober.step(batch, 1e-6).reasons() for _ in range(4)]
    assert "ledger full" in verdicts[0]
    assert all("ledger full" not in later for later in verdicts[1:]), verdicts


def test_no_first_probe_of_small_groups_runs_its_ledger_full():
    """Groups of up to ledgers.SAVE_ALL_BELOW elements start with room to save every element: at a step that moves
    every element (LoRA's B is 0 at first, and 0 - x + x is not always 0 in a 16-bit dtype), the first probe
    measures every group."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 4)).bfloat16()
    batch = (torch.randn(64, 512, dtype=torch.bfloat16), torch.randint(0, 4, (64,)))
    with_gradient(model, batch, cross_entropy)
    prober = adapeft.Prober(model, None, cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for eta in (1e-1, 1.0):  # steps large enough that the moves change most elements
            assert "ledger full" not in prober.step(batch, eta).reasons()
