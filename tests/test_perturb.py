"""adapeft::perturb_ (op 1): in-place multi-tensor perturbation with bit-exact restore."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.ops import layout as L
from adapeft.ops import reference
from adapeft.perturb import _SigintDeferred

from conftest import SEED, requires_cuda

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
from oracle import bits_of, direction_float32, step

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
PROBE_SEQUENCE = [0, 1, 2, 3, -1]  # w0 -> -2eta -> -eta -> +eta -> +2eta -> w0
FIELD = {name: i for i, name in enumerate(adapeft.REPORT_FIELDS)}


NO_HYPER = {}


def compiled_perturb(params, directions, *args):
    device = params[0].device
    torch.ops.adapeft.perturb_(params, directions, [], [], args[0], args[1], NO_HYPER.setdefault(
        device, torch.empty(0, dtype=torch.float64, device=device)), *args[2:])


def reference_perturb(params, directions, *args):
    reference.perturb_(params, directions, [], [], args[0], args[1], torch.empty(0, dtype=torch.float64), *args[2:])


IMPLEMENTATIONS = {"compiled": (lambda p, d: torch.ops.adapeft.pack_group(p, d, [], []), compiled_perturb),
                   "reference": (reference.pack_group, reference_perturb)}


def random_group(generator, device, sizes, dtypes, direction_float32=True, scale=0.02):
    params, directions = [], []
    for i, n in enumerate(sizes):
        dtype = dtypes[i % len(dtypes)]
        params.append((torch.randn(n, generator=generator) * scale).to(dtype).to(device))
        direction_dtype = torch.float32 if direction_float32 or i % 2 else dtype
        directions.append(torch.randn(n, generator=generator).to(direction_dtype).to(device))
    return params, directions


def run_moves(implementation, params, directions, steps, sequence, capacity=None):
    """Apply `sequence` of moves; return the bits of every tensor after each move and the report."""
    pack, perturb = IMPLEMENTATIONS[implementation]
    device = params[0].device
    table = pack(params, directions)
    fingerprint = adapeft.group_fingerprint(params, directions)
    chunks = L.count_chunks(params)
    words = sum(p.numel() * L.entry_words(p.dtype) for p in params)
    ledgers = [adapeft.new_ledger(chunks, words if capacity is None else capacity, device) for _ in range(2)]
    report = adapeft.new_report(len(sequence), device)
    snapshots = []
    position, current = -1, 0
    for row, target in enumerate(sequence):
        with torch.no_grad():
            perturb(params, directions, table, fingerprint, steps, position, target, ledgers[current],
                    ledgers[1 - current], report, row)
        position, current = target, 1 - current
        snapshots.append([bits_of(p) for p in params])
    return snapshots, report.cpu()


def clone_group(params, directions):
    return [p.clone() for p in params], [d.clone() for d in directions]


def assert_same_bits(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}: tensor {i} shape"
        mismatch = np.flatnonzero(a != e)
        assert mismatch.size == 0, f"{what}: tensor {i} differs at {mismatch[:5]} ({a[mismatch[:5]]} vs {e[mismatch[:5]]})"


AWKWARD_SIZES = [
    [1],
    [0, 5, 0],
    [4095, 4096, 4097],
    [8193, 31, 12345],
    [3] * 200 + [1, 2, 7] * 30,
    [70_001],
]


@pytest.mark.parametrize("sizes", AWKWARD_SIZES, ids=lambda s: f"{len(s)}x{sum(s)}")
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], DTYPES],
                         ids=["f32", "bf16", "f16", "mixed"])
@pytest.mark.parametrize("direction_in_float32", [True, False], ids=["d32", "dparam"])
def test_compiled_matches_reference_and_restores(device, generator, sizes, dtypes, direction_in_float32):
    params, directions = random_group(generator, device, sizes, dtypes, direction_in_float32)
    original = [bits_of(p) for p in params]
    eta = 10 ** float(torch.empty(()).uniform_(-4, -1, generator=generator))
    steps = torch.tensor([-2 * eta, -eta, eta, 2 * eta], dtype=torch.float32, device=device)
    twin_params, twin_directions = clone_group(params, directions)
    got, got_report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE)
    want, want_report = run_moves("reference", twin_params, twin_directions, steps, PROBE_SEQUENCE)
    for row, (g, w) in enumerate(zip(got, want)):
        assert_same_bits(g, w, f"after move {row}")
    assert_same_bits(got[-1], original, "after restore")
    counts = [FIELD[name] for name in ("changed", "unmoved", "saved", "nonfinite")]
    assert torch.equal(got_report[:, counts], want_report[:, counts])
    torch.testing.assert_close(got_report[:, FIELD["step"]], want_report[:, FIELD["step"]], rtol=1e-12, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_numpy_oracle(device, generator, dtype):
    """Each perturbed point is round(w0 - eta_j * d) computed by numpy in float32; the report's counts
    and realized step agree with those values, computed in float64."""
    params, directions = random_group(generator, device, [5000, 4096, 77], [dtype])
    w0 = [bits_of(p) for p in params]
    d32 = [direction_float32(d) for d in directions]
    eta = 3e-3
    steps = torch.tensor([-2 * eta, -eta, eta, 2 * eta], dtype=torch.float32, device=device)
    snapshots, report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE)
    for j in range(4):
        moved_and_flags = [step(b, d, steps[j].item(), dtype) for b, d in zip(w0, d32)]
        assert_same_bits(snapshots[j], [m for m, _ in moved_and_flags], f"step {j}")
        from oracle import to_float32
        dw = np.concatenate([to_float32(m, dtype).astype(np.float64) - to_float32(b, dtype).astype(np.float64)
                             for (m, _), b in zip(moved_and_flags, w0)])
        d = np.concatenate(d32).astype(np.float64)
        assert report[j, FIELD["step"]].item() == pytest.approx(-(d @ dw) / (d @ d), rel=1e-12)
        assert report[j, FIELD["changed"]] == sum(int((m != b).sum()) for (m, _), b in zip(moved_and_flags, w0))
        assert report[j, FIELD["saved"]] == sum(int(f.sum()) for _, f in moved_and_flags)
        assert report[j, FIELD["unmoved"]] == 0 and report[j, FIELD["nonfinite"]] == 0


def special_values(generator, dtype, n):
    """Values that stress exact inversion: powers of two and their neighbours, subnormals, signed
    zeros, extremes of the dtype, random bit patterns and ordinary weights (built in float64, which
    holds every value of the smaller dtypes exactly)."""
    info = torch.finfo(dtype)
    f64 = torch.float64
    exponents = torch.randint(int(math.log2(info.tiny)) - 10, int(math.log2(info.max)), (n,), generator=generator)
    signs = torch.where(torch.rand(n, generator=generator, dtype=f64) < 0.5, -1.0, 1.0).to(f64)
    powers = (torch.pow(2.0, exponents.to(f64)) * signs).to(dtype)
    above = torch.nextafter(powers, torch.full_like(powers, math.inf))
    below = torch.nextafter(powers, torch.full_like(powers, -math.inf))
    subnormal = (torch.rand(n, generator=generator, dtype=f64) * info.tiny * signs).to(dtype)
    zeros = torch.where(signs > 0, torch.zeros(n, dtype=f64), torch.full((n,), -0.0, dtype=f64)).to(dtype)
    extremes = (torch.tensor([info.max, -info.max, info.tiny, -info.tiny, info.eps, 1.0, -1.0], dtype=f64)
                .repeat(n // 7 + 1)[:n].to(dtype))
    width = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16, torch.float64: 64}[dtype]
    if width == 64:
        halves = torch.randint(0, 2**32, (n, 2), generator=generator)
        random_bits = ((halves[:, 0] << 32) | halves[:, 1]).view(torch.float64)
    else:
        random_bits = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), (n,), generator=generator)
        random_bits = random_bits.to(torch.int32 if width == 32 else torch.int16).view(dtype)
    random_bits = torch.where(torch.isfinite(random_bits), random_bits, torch.zeros_like(random_bits))
    weights = (torch.randn(n, generator=generator, dtype=f64) * 0.02).to(dtype)
    values = torch.cat([powers, above, below, subnormal, zeros, extremes, random_bits, weights])
    return values[torch.randperm(values.numel(), generator=generator)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_is_bit_exact_on_hard_values(device, generator, dtype):
    draws = 12 if device == "cpu" else 40
    for _ in range(draws):
        w = special_values(generator, dtype, 3000).to(device)
        scale = 10.0 ** torch.randint(-45, 38, (w.numel(),), generator=generator).float()
        d = (torch.randn(w.numel(), generator=generator) * scale).to(device)
        d[torch.rand(w.numel(), generator=generator) < 0.05] = 0.0
        eta = 10 ** float(torch.empty(()).uniform_(-12, 3, generator=generator))
        steps = torch.tensor([-2 * eta, -eta, eta, 2 * eta, eta * 1e30], dtype=torch.float32, device=device)
        original = bits_of(w)
        group = [w[:1000], w[1000:1001], w[1001:]]
        directions = [d[:1000], d[1000:1001], d[1001:]]
        sequence = [0, 1, 2, 3, 4, 0, -1]
        got, report = run_moves("compiled", group, directions, steps, sequence)
        assert_same_bits([np.concatenate(got[-1])], [original], f"restore (eta={eta:g})")
        assert report[:, FIELD["unmoved"]].sum() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rebase_equals_separate_restore_and_perturb(device, generator, dtype):
    """Rebuilding w0 and writing the next step in one pass gives the bits of two separate passes."""
    params, directions = random_group(generator, device, [9000, 4096, 3], [dtype])
    twin_params, twin_directions = clone_group(params, directions)
    steps = torch.tensor([-2e-2, -1e-2, 1e-2, 2e-2], device=device)
    fused, fused_report = run_moves("compiled", params, directions, steps, [0, 1, 2, 3, -1])
    separate, separate_report = run_moves("compiled", twin_params, twin_directions, steps,
                                          [0, -1, 1, -1, 2, -1, 3, -1])
    for fused_row, separate_row in ((0, 0), (1, 2), (2, 4), (3, 6), (4, 7)):
        assert_same_bits(fused[fused_row], separate[separate_row], f"move {fused_row}")
        assert torch.equal(fused_report[fused_row, 1:], separate_report[separate_row, 1:])
        torch.testing.assert_close(fused_report[fused_row, 0], separate_report[separate_row, 0], rtol=1e-12,
                                   atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_direction_restores_and_flags_the_step(device, generator, dtype):
    params, directions = random_group(generator, device, [3000, 5000], [dtype])
    directions[0][17] = math.inf
    directions[1][4000] = math.nan
    directions[1][4001] = -math.inf
    original = [bits_of(p) for p in params]
    steps = torch.tensor([-2e-3, -1e-3, 1e-3, 2e-3], device=device)
    snapshots, report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE)
    assert_same_bits(snapshots[-1], original, "restore")
    assert report[:4, FIELD["nonfinite"]].tolist() == [3.0] * 4
    assert torch.isnan(report[:4, FIELD["step"]]).all()
    fit = adapeft.quadratic_fit(torch.rand(1, 5, dtype=torch.float64),
                                torch.cat([report[:2, 0], torch.zeros(1, dtype=torch.float64), report[2:4, 0]])[None],
                                torch.tensor([8000]))
    assert not fit.accepted.item()
    with pytest.raises(ValueError, match=r"directions\[0\] contains inf or nan"):
        adapeft.GroupPerturbation(params, directions, steps, validate=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_ledger_leaves_chunks_at_w0_and_stays_exact(device, generator, dtype):
    """With too little room, chunks that cannot save their entries are left exactly at w0, the report
    says how many elements, the realized step reflects it, and the restore is still exact."""
    sizes = [3 * L.CHUNK_ELEMENTS + 5, 2 * L.CHUNK_ELEMENTS]
    params, directions = random_group(generator, device, sizes, [dtype])
    params[1].zero_()  # in bfloat16 every zero is saved; in float32 none is
    w0 = [bits_of(p) for p in params]
    eta = 5e-3
    steps = torch.tensor([-2 * eta, -eta, eta, 2 * eta], device=device)
    for capacity in (0, 10, 300):
        snapshots, report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE, capacity=capacity)
        assert_same_bits(snapshots[-1], w0, f"restore with capacity {capacity}")
        for j in range(4):
            moved_and_flags = [step(b, direction_float32(d), steps[j].item(), dtype) for b, d in zip(w0, directions)]
            unmoved = 0
            for (moved, flags), before, now in zip(moved_and_flags, w0, snapshots[j]):
                for c in range(L.chunks_of(before.size)):
                    part = slice(c * L.CHUNK_ELEMENTS, (c + 1) * L.CHUNK_ELEMENTS)
                    if np.array_equal(now[part], before[part]) and not np.array_equal(moved[part], before[part]):
                        unmoved += now[part].size
                        assert flags[part].any(), "a chunk with nothing to save was left unmoved"
                    else:
                        assert np.array_equal(now[part], moved[part]), "a moved chunk is not at its step"
            assert report[j, FIELD["unmoved"]] == unmoved
            assert report[j, FIELD["saved"]] == sum(int(f.sum()) for _, f in moved_and_flags)
            if capacity == 0 and dtype == torch.float32:
                assert unmoved > 0


def test_group_perturbation_grows_and_restores_on_error(device, generator):
    params, directions = random_group(generator, device, [9000, 100], [torch.bfloat16])
    params[0].zero_()
    original = [bits_of(p) for p in params]
    steps = torch.tensor([-2e-3, -1e-3, 1e-3, 2e-3], device=device)
    report = adapeft.new_report(4, device)
    group = adapeft.GroupPerturbation(params, directions, steps, capacity=0)
    with pytest.raises(RuntimeError, match="loss was nan"):
        with group:
            group.move(0, report, 0)
            assert group.position == 0
            raise RuntimeError("loss was nan")
    assert group.position == -1
    assert_same_bits([bits_of(p) for p in params], original, "after an exception")
    assert report[0, FIELD["unmoved"]] > 0
    group.grow(int(report[0, FIELD["saved"]]))
    with group:
        group.move(0, report, 0)
        with pytest.raises(RuntimeError, match="restore the group first"):
            group.grow(10**6)
    assert report[0, FIELD["unmoved"]] == 0
    assert_same_bits([bits_of(p) for p in params], original, "after grow")


def test_ctrl_c_during_moves_leaves_weights_intact(generator):
    params, directions = random_group(generator, "cpu", [5000], [torch.float32])
    original = [bits_of(p) for p in params]
    steps = torch.tensor([-2e-2, -1e-2, 1e-2, 2e-2])
    # Python's own Ctrl-C handler, whatever an earlier test or library in this process left installed (the
    # deferral stands aside under a handler of the user's).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # and delivered to this thread
    try:
        with pytest.raises(KeyboardInterrupt):
            with adapeft.GroupPerturbation(params, directions, steps) as group:
                group.move(0)
                with _SigintDeferred() as deferred:
                    assert deferred.active
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    # The signal reaches Python's handler at some later bytecode, later still on a loaded
                    # machine: wait for it, so that it lands here.
                    waited = time.monotonic()
                    while not deferred.received and time.monotonic() - waited < 10:
                        time.sleep(0.001)
                    assert deferred.received
                    group.move(1)  # the interrupt waits until this move is recorded
                group.move(2)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, previous)
    assert group.position == -1
    assert_same_bits([bits_of(p) for p in params], original, "after Ctrl-C")


def test_steps_can_be_rewritten_between_probes(device, generator):
    params, directions = random_group(generator, device, [6000], [torch.float32])
    steps = torch.tensor([-2e-3, -1e-3, 1e-3, 2e-3], device=device)
    group = adapeft.GroupPerturbation(params, directions, steps)
    for eta in (1e-3, 1e-1, 1e-5):
        steps.copy_(torch.tensor([-2 * eta, -eta, eta, 2 * eta]))
        before = [bits_of(p) for p in params]
        with group:
            for j in range(4):
                group.move(j)
        assert_same_bits([bits_of(p) for p in params], before, f"eta {eta}")


def test_pack_group_matches_reference(device, generator):
    params, directions = random_group(generator, device, [0, 1, 4096, 4097, 9000], DTYPES, False)
    table = adapeft.pack_group(params, directions)
    assert table.device.type == device and table.dtype == torch.int64
    assert torch.equal(table.cpu(), reference.pack_group(params, directions).cpu())
    header = table[:L.TABLE_HEADER_WORDS].tolist()
    assert header == [5, L.count_chunks(params), sum(p.numel() for p in params), L.TABLE_LAYOUT_VERSION]


def test_errors_name_the_argument(device):
    p = torch.zeros(6, 4, device=device)
    d = torch.ones(6, 4, device=device)
    steps = torch.tensor([1e-3], device=device)
    pack = adapeft.pack_group
    with pytest.raises(Exception, match=r"params has 1 tensors but directions has 2"):
        pack([p], [d, d])
    with pytest.raises(Exception, match=r"params\[0\] is not contiguous"):
        pack([p.t()], [d.t().contiguous()])
    with pytest.raises(Exception, match=r"directions\[0\] has shape"):
        pack([p], [d.view(-1)])
    with pytest.raises(Exception, match=r"directions\[0\] has dtype"):
        pack([p.half()], [d.double()])
    with pytest.raises(Exception, match=r"params\[0\] has dtype"):
        pack([p.int()], [d.int()])
    with pytest.raises(Exception, match=r"params\[0\] and params\[1\] overlap"):
        pack([p, p], [d, d.clone()])
    with pytest.raises(Exception, match=r"directions\[0\] overlaps params\[0\]"):
        pack([p], [p])
    with pytest.raises(Exception, match=r"the group has no tensors"):
        pack([], [])
    with pytest.raises(Exception, match="steps must be a float32"):
        adapeft.GroupPerturbation([p], [d], steps.double())
    group = adapeft.GroupPerturbation([p], [d], steps)
    ledger = group.ledgers[0]
    report = adapeft.new_report(1, device)
    args = [group.params, group.directions, [], [], group.table, group.fingerprint, group.hyper, steps, -1, 0,
            ledger, group.ledgers[1], report, 0]

    def call(**change):
        names = ["params", "directions", "states", "layout", "table", "fingerprint", "hyper", "steps", "from_step",
                 "to_step", "ledger_in", "ledger_out", "report", "report_row"]
        values = dict(zip(names, args))
        values.update(change)
        adapeft.perturb_(*[values[n] for n in names])

    with pytest.raises(Exception, match="to_step=1 is outside"):
        call(to_step=1)
    with pytest.raises(Exception, match="from_step=-2 is outside"):
        call(from_step=-2)
    with pytest.raises(Exception, match="report_row=3 is outside"):
        call(report_row=3)
    with pytest.raises(Exception, match="ledger_in and ledger_out must be different"):
        call(from_step=0, ledger_out=ledger)
    with pytest.raises(Exception, match="ledger_out must be int64"):
        call(ledger_out=torch.zeros(1, dtype=torch.int64, device=device))
    with pytest.raises(Exception, match="report must be float64"):
        call(report=torch.zeros(4, dtype=torch.float64, device=device))
    with pytest.raises(Exception, match="steps must be float32"):
        call(steps=steps.double())
    with pytest.raises(Exception, match="table does not describe this group"):
        call(table=group.table[:-1])


def test_stale_table_is_rebuilt_for_the_call(device, generator):
    """The table caches addresses; if a parameter moved to new memory the op still acts on the tensors
    it is given, never on the old addresses (and warns once on stderr that it rebuilt the table)."""
    params, directions = random_group(generator, device, [5000, 20], [torch.float32, torch.bfloat16])
    steps = torch.tensor([-1e-2, 1e-2], device=device)
    group = adapeft.GroupPerturbation(params, directions, steps, capacity=5020)
    old = params[0].data
    params[0].data = old.clone()
    old.fill_(7.0)
    original = [bits_of(p) for p in params]
    report = adapeft.new_report(1, device)
    with group:
        group.move(0, report, 0)
        assert report[0, FIELD["changed"]] > 5000 and report[0, FIELD["unmoved"]] == 0
    assert (old == 7.0).all()
    assert_same_bits([bits_of(p) for p in params], original, "restore with a rebuilt table")


def test_reference_raises_the_same_errors():
    p, d = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"directions\[0\] overlaps params\[0\]"):
        reference.pack_group([p], [p])
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        reference.pack_group([torch.zeros(3, 2).t()], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap"):
        ledger = adapeft.new_ledger(1, 0, "cpu")
        reference.perturb_([p, p], [d, d], [], [], reference.pack_group([p], [d]), 0, torch.empty(0), torch.ones(1),
                           -1, 0, ledger, ledger.clone(), adapeft.new_report(1, "cpu"), 0)


def test_python_fingerprint_matches_extension(generator):
    params, directions = random_group(generator, "cpu", [0, 3, 4097], DTYPES)
    params.append(torch.zeros(4, 3).t())
    directions.append(torch.zeros(3, 4))
    states = [torch.zeros(3), torch.zeros(4097)]
    layout = [0, -1, -1, -1, 1, 0, -1, -1, 1, 1, -1, -1, 0, -1, -1, -1, 0, -1, -1, -1]
    for args in ((params, directions, [], []), (params, directions, states, layout)):
        assert L.group_fingerprint(*args) == _backend._C.group_fingerprint(*args)


def test_opcheck(device, generator):
    # One chunk per tensor and one CPU task, so that ledger offsets (claimed in completion order) are the
    # same in every run that opcheck compares.
    params, directions = random_group(generator, device, [4000, 7], [torch.float32, torch.bfloat16])
    torch.library.opcheck(torch.ops.adapeft.pack_group.default, (params, directions, [], []),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    table = adapeft.pack_group(params, directions)
    fingerprint = adapeft.group_fingerprint(params, directions)
    chunks = L.count_chunks(params)
    ledgers = [adapeft.new_ledger(chunks, 6000, device) for _ in range(2)]
    report = adapeft.new_report(2, device)
    steps = torch.tensor([1e-3, -1e-3], device=device)
    # opcheck runs the op on copies of the tensors, for which the table is rebuilt (with a warning).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for from_step, to_step, ledger_in, ledger_out in ((-1, 0, ledgers[1], ledgers[0]),
                                                          (0, -1, ledgers[0], ledgers[1])):
            torch.library.opcheck(
                torch.ops.adapeft.perturb_.default,
                (params, directions, [], [], table, fingerprint, torch.empty(0, dtype=torch.float64, device=device),
                 steps, from_step, to_step, ledger_in, ledger_out, report, 0))


@requires_cuda
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], DTYPES],
                         ids=["f32", "bf16", "f16", "mixed"])
@pytest.mark.parametrize("sizes", [[4097, 1, 0, 33, 9000] + [5] * 300, [4097, 1, 0, 33, 700] + [5] * 60],
                         ids=["more_chunks_than_blocks", "a_chunk_a_block"])
def test_cuda_equals_cpu_bitwise(generator, dtypes, sizes):
    """Both launches on GPUs with stage buffers: staged (more chunks than resident blocks) and not."""
    params, directions = random_group(generator, "cpu", sizes, dtypes)
    steps = torch.tensor([-4e-3, -2e-3, 2e-3, 4e-3])
    cuda_params = [p.cuda() for p in params]
    cuda_directions = [d.cuda() for d in directions]
    on_cpu, cpu_report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE)
    on_cuda, cuda_report = run_moves("compiled", cuda_params, cuda_directions, steps.cuda(), PROBE_SEQUENCE)
    for row, (a, b) in enumerate(zip(on_cuda, on_cpu)):
        assert_same_bits(a, b, f"CUDA vs CPU after move {row}")
    assert torch.equal(cuda_report[:, 1:], cpu_report[:, 1:])
    torch.testing.assert_close(cuda_report[:, 0], cpu_report[:, 0], rtol=1e-12, atol=0)


@requires_cuda
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], DTYPES],
                         ids=["f32", "bf16", "f16", "mixed"])
def test_cuda_many_chunks_and_unaligned_views_equal_cpu_and_report_the_same_bits(generator, dtypes):
    """More chunks than resident blocks (each block walks several), mixed with views at odd offsets
    (not 16-byte aligned). Every run reports the same bits: the blocks' sums are added in block order,
    not in arrival order."""
    params, directions = random_group(generator, "cpu", [1_500_001, 40_000, 4096 * 3, 5, 700_000], dtypes)
    for i in (1, 3):  # views 1 element past a 16-byte boundary, directions too
        for group in (params, directions):
            flat = torch.empty(group[i].numel() + 1, dtype=group[i].dtype)
            flat[1:] = group[i]
            group[i] = flat[1:]
    steps = torch.tensor([-4e-3, -2e-3, 2e-3, 4e-3])
    cuda_params, cuda_directions = [], []
    for p, d in zip(params, directions):
        cuda_params.append(p.cuda() if p.storage_offset() == 0 else torch.cat([p[:1], p]).cuda()[1:])
        cuda_directions.append(d.cuda() if d.storage_offset() == 0 else torch.cat([d[:1], d]).cuda()[1:])
    assert cuda_params[1].data_ptr() % 16 != 0
    on_cpu, cpu_report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE)
    originals = [p.clone() for p in cuda_params]
    reports = []
    for run in range(3):
        on_cuda, cuda_report = run_moves("compiled", cuda_params, cuda_directions, steps.cuda(), PROBE_SEQUENCE)
        for row, (a, b) in enumerate(zip(on_cuda, on_cpu)):
            assert_same_bits(a, b, f"run {run}: CUDA vs CPU after move {row}")
        reports.append(cuda_report)
    assert all(torch.equal(p, o) for p, o in zip(cuda_params, originals))
    assert torch.equal(reports[0][:, 1:], cpu_report[:, 1:])
    torch.testing.assert_close(reports[0][:, 0], cpu_report[:, 0], rtol=1e-12, atol=0)
    for report in reports[1:]:
        assert torch.equal(report.view(torch.int64), reports[0].view(torch.int64))


@requires_cuda
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], DTYPES],
                         ids=["f32", "bf16", "f16", "mixed"])
def test_cuda_chunks_with_more_entries_than_a_block_stages_equal_cpu(generator, dtypes):
    """Chunks whose steps save more elements than a block has threads (a block keeps that many of a chunk's
    entries in shared memory and reads the others from the ledger), in a group of more chunks than resident
    blocks (the staged launch on Hopper) and in a group of a few: the CUDA moves equal the CPU's bit for bit."""
    chunks = 3 * torch.cuda.get_device_properties(0).multi_processor_count
    for sizes in ([chunks * L.CHUNK_ELEMENTS - 7, 3000], [3 * L.CHUNK_ELEMENTS, 5]):
        params, directions = random_group(generator, "cpu", sizes, dtypes)
        for d in directions:  # a step far larger than w loses w0's bits: about a third of each chunk is saved
            d[torch.rand(d.numel(), generator=generator) < 0.3] *= 1e6
        steps = torch.tensor([-4e-3, -2e-3, 2e-3, 4e-3])
        on_cpu, cpu_report = run_moves("compiled", params, directions, steps, PROBE_SEQUENCE)
        assert cpu_report[0, FIELD["saved"]] > 0.25 * sum(sizes)
        on_cuda, cuda_report = run_moves("compiled", [p.cuda() for p in params], [d.cuda() for d in directions],
                                         steps.cuda(), PROBE_SEQUENCE)
        for row, (a, b) in enumerate(zip(on_cuda, on_cpu)):
            assert_same_bits(a, b, f"{len(sizes)} tensors of {sizes}: CUDA vs CPU after move {row}")
        assert torch.equal(cuda_report[:, 1:], cpu_report[:, 1:])
        torch.testing.assert_close(cuda_report[:, 0], cpu_report[:, 0], rtol=1e-12, atol=0, equal_nan=True)


def move_kernel_launch(trace_path, dtype, chunks):
    """The profiler's record of the move kernel's launch for a group of `chunks` chunks of `dtype` (one
    tensor of whole chunks, but for a last one of 10 elements): its shared memory a block, grid, block, registers."""
    params = [torch.randn((chunks - 1) * 4096, device="cuda", dtype=dtype), torch.randn(10, device="cuda", dtype=dtype)]
    group = adapeft.GroupPerturbation(params, [torch.randn_like(p) for p in params],
                                      torch.tensor([-1e-3, 1e-3], device="cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        group.move(0)
        group.move(-1)
        torch.cuda.synchronize()
    profile.export_chrome_trace(str(trace_path))
    with open(trace_path) as f:
        launches = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel" and "move_kernel" in e["name"]]
    assert launches, "the profiler recorded no move kernel"
    return launches[0]["args"]


@requires_cuda
def test_cuda_stage_buffers_only_where_they_fit(tmp_path):
    """The move kernel of a group without float64 has its stage buffers on Hopper and later GPUs with
    room for them, unless ADAPEFT_CUDA_STAGE=0 or the group has no more chunks than resident blocks;
    without them it fits GPUs that allow about 100 KB a block. Staged, a group of float32 has two blocks of 256
    threads an SM (107 KB each) and a group of 16-bit params two (75 KB: its ledger values and stage buffers
    are narrower); unstaged, float32 has one block of 512 threads an SM and 16-bit params two of 256."""
    properties = torch.cuda.get_device_properties(0)
    staged = (os.environ.get("ADAPEFT_CUDA_STAGE") != "0" and properties.major >= 9
              and properties.shared_memory_per_block_optin >= 200 * 1024)
    sms = properties.multi_processor_count
    wide = move_kernel_launch(tmp_path / "trace32.json", torch.float32, 2 * sms + 1)
    narrow = move_kernel_launch(tmp_path / "trace16.json", torch.bfloat16, 2 * sms + 1)
    if staged:
        assert 96 * 1024 < wide["shared memory"] < 112 * 1024
        assert 64 * 1024 < narrow["shared memory"] < 80 * 1024
        assert wide["grid"][0] == 2 * sms and wide["block"][0] == 256 and wide["registers per thread"] <= 128
    else:
        assert 0 < wide["shared memory"] < 96 * 1024 and 0 < narrow["shared memory"] < 48 * 1024
        assert wide["grid"][0] == sms and wide["block"][0] == 512
    assert narrow["grid"][0] == 2 * sms and narrow["block"][0] == 256 and narrow["registers per thread"] <= 128
    # A chunk a block: nothing for stage buffers to overlap.
    one_each = [move_kernel_launch(tmp_path / "one_each32.json", torch.float32, sms),
                move_kernel_launch(tmp_path / "one_each16.json", torch.bfloat16, 2 * sms)]
    assert 0 < one_each[0]["shared memory"] < 96 * 1024 and 0 < one_each[1]["shared memory"] < 48 * 1024
    assert one_each[0]["grid"][0] == sms and one_each[1]["grid"][0] == 2 * sms
    # With float64 (64-bit ledger values) never staged: it fits an A100's 163 KB a block.
    assert 64 * 1024 < move_kernel_launch(tmp_path / "trace64.json", torch.float64, 3)["shared memory"] < 160 * 1024


@requires_cuda
def test_cuda_without_stage_buffers_equals_cpu():
    """The launch that GPUs without room for the stage buffers get (every chunk prefetched into L2)
    passes the bitwise CUDA tests, run in a process with ADAPEFT_CUDA_STAGE=0."""
    env = dict(os.environ, ADAPEFT_CUDA_STAGE="0", ADAPEFT_TEST_SEED=str(SEED))
    selected = "cuda_equals_cpu_bitwise or cuda_many_chunks or more_entries_than or stage_buffers_only_where_they_fit"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b17 passed", done.stdout), done.stdout[-3000:]


@requires_cuda
def test_cuda_graph_replays_moves_with_new_steps(generator):
    params, directions = random_group(generator, "cuda", [70000, 300, 5], [torch.float32, torch.bfloat16])
    steps = torch.tensor([-2e-3, -1e-3, 1e-3, 2e-3], device="cuda")
    report = adapeft.new_report(5, "cuda")
    group = adapeft.GroupPerturbation(params, directions, steps, capacity=sum(p.numel() for p in params))
    twin_params, twin_directions = clone_group(params, directions)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for j in PROBE_SEQUENCE:  # warm-up outside the capture
            group.move(j, report, j if j >= 0 else 4)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in PROBE_SEQUENCE:
            group.move(j, report, j if j >= 0 else 4)
    for eta in (3e-3, 7e-2):
        steps.copy_(torch.tensor([-2 * eta, -eta, eta, 2 * eta]))
        before = [bits_of(p) for p in params]
        graph.replay()
        expected_steps = steps.clone()
        _, eager_report = run_moves("compiled", twin_params, twin_directions, expected_steps, PROBE_SEQUENCE)
        torch.cuda.synchronize()
        assert_same_bits([bits_of(p) for p in params], before, f"graph replay eta={eta}")
        assert torch.equal(report.cpu()[:4, 1:], eager_report[:4, 1:])
        torch.testing.assert_close(report.cpu()[:4, 0], eager_report[:4, 0], rtol=1e-12, atol=0)


@requires_cuda
def test_cuda_group_beyond_32bit_indexing():
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < n * 8 + 2**30:
        pytest.skip(f"needs {n * 8 / 2**30:.1f} GiB of free GPU memory")
    generator = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(n, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02)
    d = torch.randn(n, device="cuda", generator=generator, dtype=torch.bfloat16)
    original = w.clone()
    steps = torch.tensor([-4e-4, -2e-4, 2e-4, 4e-4], device="cuda")  # relative steps 1e-2 .. 2e-2
    report = adapeft.new_report(4, "cuda")
    with adapeft.GroupPerturbation([w], [d], steps, capacity=n // 8) as group:
        for j in range(4):
            group.move(j, report, j)
        assert not torch.equal(w[-5000:], original[-5000:]), "the elements beyond 2^31 did not move"
    assert torch.equal(w.view(torch.int16), original.view(torch.int16))
    assert report[:, FIELD["unmoved"]].sum().item() == 0
    assert (report[:, FIELD["changed"]] > 0.5 * n).all()
    assert (report[:, FIELD["saved"]] > 0).all()
