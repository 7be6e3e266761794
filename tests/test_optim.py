"""Directions read from an optimizer's state: the next update without stepping, no copies, exact restore."""
import copy

import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.ops import layout as L
from adapeft.ops import reference

from conftest import forbid_host_sync, requires_cuda, train_then_backward
from oracle import bits_of

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=2e-3, betas=(0.8, 0.95), amsgrad=True),
    "adam-maximize": lambda p: torch.optim.Adam(p, lr=1e-3, maximize=True, decoupled_weight_decay=True,
                                                weight_decay=0.05),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01,
                                              maximize=True),
}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-7, torch.bfloat16: 0.1}


def trained(make, dtype, device="cpu", steps_taken=2, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 7)).to(dtype).to(device)
    optimizer = make(model.parameters())
    x = torch.randn(64, 40, dtype=dtype, device=device)
    for step in range(steps_taken + 1):
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        if step < steps_taken:
            optimizer.step()
    return model, optimizer


def next_weights(model, optimizer, make):
    """What optimizer.step() would give, on a deep copy."""
    twin = copy.deepcopy(model)
    twin_optimizer = make(twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p, q in zip(twin.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    twin_optimizer.step()
    return [p.detach() for p in twin.parameters()]


def state_snapshot(optimizer):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in optimizer.state.values()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("steps_taken", [0, 2], ids=["no-state-yet", "after-2-steps"])
def test_step_of_lr_reaches_the_optimizers_next_weights(device, name, dtype, steps_taken):
    make = OPTIMIZERS[name]
    model, optimizer = trained(make, dtype, device, steps_taken)
    params = list(model.parameters())
    before_state = state_snapshot(optimizer)
    expected = next_weights(model, optimizer, make)
    w0 = [bits_of(p) for p in params]
    found = adapeft.optimizer_direction(optimizer, params)
    lr = optimizer.param_groups[0]["lr"]
    steps = torch.tensor([lr, -lr, 0.5 * lr], device=device)
    report = adapeft.new_report(3, device)
    with adapeft.GroupPerturbation(params, found.directions, steps, states=found.states, layout=found.layout,
                                   hyper=found.hyper, capacity=sum(p.numel() for p in params)) as group:
        group.move(0, report, 0)
        for p, q, b in zip(params, expected, w0):
            update = (q.double() - torch.from_numpy(b).view(torch.float64 if dtype == torch.float64 else
                                                            (torch.float32 if dtype == torch.float32 else torch.bfloat16))
                      .double().view_as(q).to(q.device)).abs().max()
            # The two differ by the rounding of each step (an ulp or two of w) and the arithmetic of the
            # update (float32 for bfloat16 storage here, bfloat16 in torch's).
            rounding = 4 * torch.finfo(dtype).eps * q.double().abs().max()
            assert (p.double() - q.double()).abs().max() <= TOLERANCE[dtype] * update + rounding, name
        group.move(1, report, 1)
        group.move(2, report, 2)
    assert all((bits_of(p) == b).all() for p, b in zip(params, w0)), "restore was not bit-exact"
    after_state = state_snapshot(optimizer)
    for s, t in zip(before_state, after_state):
        for k, v in s.items():
            assert torch.equal(v, t[k]) if torch.is_tensor(v) else v == t[k]
    if dtype != torch.bfloat16:
        assert report[0, adapeft.REPORT_FIELDS.index("step")].item() == pytest.approx(lr, rel=1e-3)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_matches_reference_bitwise(name):
    make = OPTIMIZERS[name]
    model, optimizer = trained(make, torch.float32)
    params = list(model.parameters())
    twin = copy.deepcopy(model)
    twin_params = list(twin.parameters())
    for p, q in zip(twin_params, params):
        p.grad = q.grad.clone()
    found = adapeft.optimizer_direction(optimizer, params)
    lr = optimizer.param_groups[0]["lr"]
    steps = torch.tensor([-2 * lr, -lr, lr, 2 * lr])
    chunks = L.count_chunks(params)
    words = sum(p.numel() for p in params)
    results = []
    for implementation, group_params, directions in (("compiled", params, found.directions),
                                                     ("reference", twin_params, [p.grad for p in twin_params])):
        pack = adapeft.pack_group if implementation == "compiled" else reference.pack_group
        move = adapeft.perturb_ if implementation == "compiled" else reference.perturb_
        table = pack(group_params, directions, found.states, found.layout)
        fingerprint = L.group_fingerprint(group_params, directions, found.states, found.layout)
        ledgers = [adapeft.new_ledger(chunks, words, "cpu") for _ in range(2)]
        report = adapeft.new_report(5, "cpu")
        snapshots, position, current = [], -1, 0
        for row, target in enumerate([0, 1, 2, 3, -1]):
            with torch.no_grad():
                move(group_params, directions, found.states, found.layout, table, fingerprint, found.hyper, steps,
                     position, target, ledgers[current], ledgers[1 - current], report, row)
            position, current = target, 1 - current
            snapshots.append([bits_of(p) for p in group_params])
        results.append((snapshots, report))
    (got, got_report), (want, want_report) = results
    for row, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            assert (x == y).all(), f"move {row}"
    assert torch.equal(got_report[:, 1:], want_report[:, 1:])
    torch.testing.assert_close(got_report[:, 0], want_report[:, 0], rtol=1e-12, atol=0)


def test_unsupported_setups_are_named():
    model, optimizer = trained(OPTIMIZERS["sgd"], torch.float32)
    with pytest.raises(TypeError, match="RMSprop is not supported"):
        adapeft.optimizer_direction(torch.optim.RMSprop(model.parameters()), list(model.parameters()))
    l2_adam = torch.optim.Adam(model.parameters(), weight_decay=0.01)
    with pytest.raises(ValueError, match="Adam with \\(L2\\) weight_decay"):
        adapeft.optimizer_direction(l2_adam, list(model.parameters()))
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"params\[0\] is not optimized by this optimizer"):
        adapeft.optimizer_direction(optimizer, [stranger])
    model[0].weight.grad = None
    with pytest.raises(ValueError, match=r"params\[0\] has no gradient"):
        adapeft.optimizer_direction(optimizer, list(model.parameters()))
    with pytest.raises(ValueError, match="direction='optimizer' needs the optimizer"):
        adapeft.Prober(model, None, lambda m, b: m(b).sum(), direction="optimizer")
    # refused when the Prober is made, not at its first step
    with pytest.raises(TypeError, match="adapeft.Prober: RMSprop is not supported; direction='optimizer' knows"):
        adapeft.Prober(model, None, lambda m, b: m(b).sum(), direction="optimizer",
                       optimizer=torch.optim.RMSprop(model.parameters()))


def test_prober_refuses_an_optimizer_that_leaves_trainable_tensors_out_naming_them():
    model, optimizer = trained(OPTIMIZERS["sgd"], torch.float32)
    head_only = torch.optim.SGD(model[2].parameters(), lr=1e-2)
    # it was refused at step() as "adapeft.optimizer_direction: params[0] is not optimized by this optimizer"
    with pytest.raises(ValueError, match=r"adapeft.Prober: optimizer does not update 2 parameters .*"
                                         r"\(0.bias, 0.weight\)"):
        adapeft.Prober(model, None, lambda m, b: m(b).sum(), direction="optimizer", optimizer=head_only)
    model[0].requires_grad_(False)
    adapeft.Prober(model, None, lambda m, b: m(b).sum(), direction="optimizer", optimizer=head_only)


def test_prober_with_optimizer_direction_gives_learning_rates():
    """Along AdamW's own update, eta* is a learning rate for AdamW; the probe leaves its state alone."""
    make = OPTIMIZERS["adamw"]
    model, optimizer = trained(make, torch.float64, steps_taken=5)
    x = torch.randn(64, 40, dtype=torch.float64)

    def loss_fn(model, batch):
        return model(batch).pow(2).mean()

    optimizer.zero_grad()
    loss_fn(model, x).backward()
    before = state_snapshot(optimizer)
    groups = adapeft.group_parameters(model)
    compiled = adapeft.Prober(model, groups, loss_fn, direction="optimizer", optimizer=optimizer).step(x, 1e-4)
    plain = adapeft.Prober(model, groups, loss_fn, direction="optimizer", optimizer=optimizer,
                           backend="torch").step(x, 1e-4)
    torch.testing.assert_close(compiled.b, plain.b, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(compiled.A, plain.A, rtol=1e-6, atol=1e-12)
    assert compiled.accepted.all()
    for s, t in zip(before, state_snapshot(optimizer)):
        for k, v in s.items():
            assert torch.equal(v, t[k]) if torch.is_tensor(v) else v == t[k]
    # b is the slope along the update: G . d, with d from an actual optimizer step of size lr.
    lr = optimizer.param_groups[0]["lr"]
    after = next_weights(model, optimizer, make)
    for k, name in enumerate(groups.names):
        update = [(p.detach() - q) / lr for p, q in zip(model.parameters(), after)]
        index = {id(p): u for p, u in zip(model.parameters(), update)}
        slope = sum((p.grad * index[id(p)]).sum().item() for p in groups.params(name))
        assert compiled.b[k].item() == pytest.approx(slope, rel=1e-4), name


@requires_cuda
def test_capturable_adam_on_cuda_needs_no_sync():
    make = lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, capturable=True)  # noqa: E731
    model, optimizer = trained(make, torch.float32, "cuda")
    assert optimizer.state[next(model.parameters())]["step"].device.type == "cuda"
    params = list(model.parameters())
    expected = next_weights(model, optimizer, make)
    steps = torch.tensor([1e-3], device="cuda")
    with forbid_host_sync():
        found = adapeft.optimizer_direction(optimizer, params)
        group = adapeft.GroupPerturbation(params, found.directions, steps, states=found.states, layout=found.layout,
                                          hyper=found.hyper, capacity=sum(p.numel() for p in params))
        group.move(0)
    for p, q in zip(params, expected):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    group.restore()


def probe_setup(lr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3)).double()
    x, y = torch.randn(128, 10, dtype=torch.float64), torch.randint(0, 3, (128,))
    groups = adapeft.group_parameters(model)

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    return model, groups, loss_fn, (x, y)


def test_apply_lr_follows_eta_star_with_gens_safeguards():
    model, groups, loss_fn, batch = probe_setup(0.05)
    optimizer = torch.optim.SGD(adapeft.param_groups(groups, lr=0.05, momentum=0.9), lr=0.05)
    train_then_backward(model, optimizer, loss_fn, batch, 3)
    prober = adapeft.Prober(model, groups, loss_fn, direction="optimizer", optimizer=optimizer, apply_lr=True)
    before = [g["lr"] for g in optimizer.param_groups]
    result = prober.step(batch, 1e-3)
    accepted, eta_star = result.accepted.tolist(), result.eta_star.tolist()
    assert any(accepted)
    for k, group in enumerate(optimizer.param_groups):
        if accepted[k]:
            target = min(max(eta_star[k], 0.5 * before[k]), 2.0 * before[k])
            assert group["lr"] == pytest.approx(0.9 * before[k] + 0.1 * target)
            assert 0.95 * before[k] <= group["lr"] <= 1.1 * before[k]
        else:
            assert group["lr"] == before[k]


def test_apply_lr_updates_tensor_learning_rates_in_place():
    model, groups, loss_fn, batch = probe_setup(1e-3)
    rates = [torch.tensor(1e-2, dtype=torch.float64) for _ in groups.names]
    optimizer = torch.optim.AdamW([{"params": groups.params(n), "adapeft_group": n, "lr": r}
                                   for n, r in zip(groups.names, rates)], foreach=False)
    train_then_backward(model, optimizer, loss_fn, batch, 2)
    result = adapeft.Prober(model, groups, loss_fn, direction="optimizer", optimizer=optimizer,
                            apply_lr=True).step(batch, 1e-4)
    for k, group in enumerate(optimizer.param_groups):
        assert group["lr"] is rates[k]
        if result.accepted[k]:
            target = min(max(result.eta_star[k].item(), 5e-3), 2e-2)
            assert rates[k].item() == pytest.approx(0.9 * 1e-2 + 0.1 * target)
        else:
            assert rates[k].item() == 1e-2


def test_apply_lr_needs_matching_param_groups():
    model, groups, loss_fn, batch = probe_setup(0.05)
    plain = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="needs direction='optimizer'"):
        adapeft.Prober(model, groups, loss_fn, optimizer=plain, apply_lr=True)
    with pytest.raises(ValueError, match="one optimizer param group per adapeft group"):
        adapeft.Prober(model, groups, loss_fn, direction="optimizer", optimizer=plain, apply_lr=True)


def test_probe_schedule():
    schedule = adapeft.ProbeSchedule(7)
    assert schedule.interval == 28 and schedule.forward_passes_per_step == pytest.approx(29 / 28)
    assert [t for t in range(100) if schedule(t)] == [0, 28, 56, 84]
    windowed = adapeft.ProbeSchedule(7, interval=10, start=5, stop=40)
    assert [t for t in range(100) if windowed(t)] == [5, 15, 25, 35]
    with pytest.raises(ValueError, match="interval must be at least 1"):
        adapeft.ProbeSchedule(7, interval=0)
    model, groups, loss_fn, batch = probe_setup(0.05)
    loss_fn(model, batch).backward()
    prober = adapeft.Prober(model, groups, loss_fn, schedule=adapeft.ProbeSchedule(len(groups), interval=3))
    ran = [prober.maybe_step(t, batch, 1e-4) is not None for t in range(7)]
    assert ran == [True, False, False, True, False, False, True] and len(prober.history) == 3
    with pytest.raises(TypeError, match=r"adapeft.Prober: schedule must be a callable .*, got int 3"):
        adapeft.Prober(model, groups, loss_fn, schedule=3)
