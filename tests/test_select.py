"""Knapsack selection: greedy, exact (refined), Pareto frontier and exhaustive, against enumeration."""
import json
import math
import statistics
import warnings

import numpy as np
import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.select import FAR_STEPS, all_subsets, horizon_appi

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
ops = torch.ops.adapeft


def random_instance(rng, k):
    """Values and counts of the kinds real probes give, and the awkward ones: ties, duplicates, zeros,
    huge and tiny counts."""
    kind = rng.integers(0, 6)
    if kind == 0:
        values = rng.random(k)
    elif kind == 1:
        values = rng.pareto(1.0, k) * 1e-3  # heavy-tailed
    elif kind == 2:
        values = rng.choice([0.0, 0.5, 1.0, 2.0], size=k)  # many ties and zeros
    elif kind == 3:
        values = np.zeros(k)
    else:
        values = rng.random(k) * 10.0 ** rng.integers(-12, 3)
    counts = np.exp(rng.uniform(0, math.log(1e11), k)).astype(np.int64) + 1 if rng.random() < 0.5 \
        else rng.integers(1, 20, k)
    if kind == 5:  # duplicated groups: same value and count
        values[k // 2:] = values[:k - k // 2]
        counts[k // 2:] = counts[:k - k // 2]
    return torch.tensor(values, dtype=torch.float64), torch.tensor(counts, dtype=torch.int64)


def test_all_subsets_are_exact_sums_rounded_once():
    rng = np.random.default_rng(7)
    for k in (1, 5, 11):
        values, counts = random_instance(rng, k)
        subset_counts, subset_values = all_subsets(values, counts)
        bits = (np.arange(1 << k)[:, None] >> np.arange(k)) & 1
        assert subset_counts.tolist() == (bits @ counts.numpy()).tolist()
        assert subset_values.tolist() == [math.fsum(v for v, b in zip(values.tolist(), row) if b) for row in bits]


def realistic(k, seed=0):
    rng = np.random.default_rng(seed)
    values = torch.tensor(rng.pareto(1.0, k) * rng.random(k), dtype=torch.float64)
    counts = torch.tensor(np.exp(rng.uniform(math.log(1e3), math.log(1e9), k)).astype(np.int64))
    return values, counts


def test_exact_at_scale_beats_or_ties_greedy():
    values, counts = realistic(100_000)
    rank = torch.arange(100_000)
    capacity = int(0.3 * counts.sum())
    mask, info = ops.knapsack_exact(values, counts, rank, capacity, 10**8)
    assert info[0] == 1 and int(counts[mask].sum()) <= capacity
    greedy = adapeft.select(values=values, counts=counts, budget=0.3, method="greedy")
    assert math.fsum(values[mask].tolist()) >= greedy.value and greedy.count <= capacity


def test_selection_api():
    names = ["lora_A", "lora_B", "head", "norm", "bias", "embed", "others"]
    values = [0.3, 0.1, 0.5, 0.2, 0.05, 0.01, 0.4]
    counts = [1000, 1000, 500, 300, 200, 50_000, 1_000_000]
    exact = adapeft.select(values=values, counts=counts, budget=0.002, method="exact", names=names)
    assert exact.proven and exact.count <= 0.002 * sum(counts)
    assert exact.mask.dtype == bool and exact.mask.shape == (7,)
    assert exact.value == pytest.approx(sum(v for v, m in zip(values, exact.mask) if m))
    greedy = adapeft.select(values=values, counts=counts, method="greedy", names=names)
    assert [p[0] for p in greedy.frontier] == sorted(p[0] for p in greedy.frontier)
    masks = [p[2] for p in greedy.frontier]
    assert all((a <= b).all() for a, b in zip(masks, masks[1:])), "greedy sets must be nested"
    pareto = adapeft.select(values=values, counts=counts, method="pareto", names=names, budget=0.002)
    assert pareto.labels == ["exact"] * len(pareto.frontier)
    assert pareto.value == pytest.approx(exact.value) and pareto.count == exact.count
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(pareto.frontier, pareto.frontier[1:]))
    assert "chosen:" in pareto.table()


def test_a_table_of_values_given_does_not_call_them_appi(tmp_path):
    """select(values=...) takes any values (|g|^2 from adapeft.signals, say): its table and saved file say they were
    given, where a selection from a Prober's probes calls them APPI."""
    given = adapeft.select(values=[0.3, 0.1], counts=[10, 20], budget=0.5, method="exact")
    assert given.signal == "given" and "value 0.3 (the values given to adapeft.select;" in given.table()
    assert "APPI" not in given.table()
    given.save(tmp_path / "selection.json")
    assert adapeft.Selection.load(tmp_path / "selection.json").table() == given.table()
    prober, batch = mlp_prober()
    prober.step(batch, 1e-4)
    from_probes = adapeft.select(prober, budget=0.5, method="exact")
    assert from_probes.signal is None and "(APPI x parameters: b^2/A summed over the probes;" in from_probes.table()


def test_pareto_beyond_the_exact_limit_is_labelled():
    values, counts = realistic(80, seed=3)
    selection = adapeft.select(values=values, counts=counts, method="pareto", budgets=(0.1, 0.3))
    assert "greedy" in selection.labels and {"exact@0.1", "exact@0.3"} <= set(selection.labels)
    assert any("more than the 64" in note for note in selection.notes)
    exact = adapeft.select(values=values, counts=counts, method="exact", budget=0.3)
    point = selection.frontier[selection.labels.index("exact@0.3")]
    assert point[0] == exact.count and point[1] == pytest.approx(exact.value)
    # Values proportional to counts tie every efficiency: the frontier holds every distinct subset size,
    # passes the point limit, and the answer falls back the same way. (It is a subset-sum instance: the
    # exact search may stop at its state limit, and then says so.)
    tied_counts = torch.tensor(np.random.default_rng(5).integers(10**3, 10**9, 40))
    tied = adapeft.select(values=tied_counts * 1e-6, counts=tied_counts, method="pareto", budgets=(0.5,))
    assert any("past its limit of 5,000,000 points" in note for note in tied.notes)
    assert ("exact@0.5" in tied.labels and tied.proven) or ("best@0.5" in tied.labels and not tied.proven)


def test_all_zero_values_select_nothing():
    for method in ("greedy", "exact", "pareto"):
        selection = adapeft.select(values=[0.0, 0.0, 0.0], counts=[5, 1, 3], budget=0.5, method=method)
        assert not selection.mask.any() and selection.value == 0.0
    greedy = adapeft.select(values=[0.0, 0.0, 0.0], counts=[5, 1, 3], method="greedy")
    assert [p[0] for p in greedy.frontier] == [0, 1, 4, 9]  # ties: fewer parameters first


def test_a_choice_of_nothing_says_why():
    for method in ("greedy", "exact", "pareto"):  # every group of positive value over the budget
        nothing = adapeft.select(values=[1.0, 2.0, 0.0], counts=[30, 20, 1], names=["a", "b", "c"], budget=0.3,
                                 method=method)
        assert nothing.chosen == [] and nothing.notes[-1] == (
            "no group of positive value fits in the budget of 30.000% of the parameters (15 of 51): the smallest, "
            "'b', holds 20")
    # greedy's nested sets by value per parameter stop at 'big', though 'small' fits; exact takes it
    greedy = adapeft.select(values=[20.0, 1.0], counts=[100, 10], names=["big", "small"], budget=0.1, method="greedy")
    assert greedy.chosen == [] and greedy.notes[-1] == (
        "the nested sets by value per parameter hold none within the budget (11 of 110 parameters), though 'small' "
        "(10) fits in it; method='exact' chooses the best set within it")
    assert adapeft.select(values=[20.0, 1.0], counts=[100, 10], names=["big", "small"], budget=0.1,
                          method="exact").chosen == ["small"]
    # nothing of positive value: said so
    assert adapeft.select(values=[0.0, 0.0], counts=[1, 1], budget=0.5, method="exact").notes == [
        "no group has a positive value: none is expected to lower the loss, so none is chosen"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(values=[1.0, math.nan], counts=[1, 1], budget=0.5), ValueError, r"values\[1\] = nan"),
    (dict(values=[1.0, math.inf], counts=[1, 1], budget=0.5), ValueError, r"values\[1\] = inf.*finite and >= 0"),
    (dict(values=[1.0, -1.0], counts=[1, 1], budget=0.5), ValueError, r"values\[1\] = -1"),
    (dict(values=[1.0, 1.0], counts=[1, 0], budget=0.5), ValueError, r"counts\[1\] = 0"),
    (dict(values=[1.0, 1.0], counts=[1, -3], budget=0.5), ValueError, r"counts\[1\] = -3"),
    (dict(values=[1.0, 1.0], counts=[1, 2**43], budget=0.5), ValueError, r"counts\[1\] = 8796093022208.*2\^42"),
    (dict(values=[1.0, 1.0], counts=[1, 1.5], budget=0.5), ValueError, "whole numbers"),
    (dict(values=[1.0, 1.0], counts=[1, math.nan], budget=0.5), ValueError, "whole numbers"),
    (dict(values=["a", "b"], counts=[1, 1], budget=0.5), TypeError, "values must be numbers"),
    (dict(values=[None, 1.0], counts=[1, 1], budget=0.5), TypeError, "values must be numbers"),
    (dict(values=[[1.0], [2.0]], counts=[1, 1], budget=0.5), ValueError, r"values must be a vector.*\(2, 1\)"),
    (dict(values=[1.0, 2.0], counts=[True, True], budget=0.5), TypeError, "counts must be numbers"),
    (dict(values=[2**60, 1], counts=[1, 1], budget=0.5), ValueError, "beyond 2\\^53"),
    (dict(values=[1.0, 1.0], counts=[1, 1], budget=True), ValueError, "budget must be a share"),
    (dict(values=[1.0, 1.0], counts=[1, 1], budget="0.5"), ValueError, "budget must be a share"),
    (dict(values=[1.0, 1.0], counts=[1, 1], budget=1.5), ValueError, "budget must be a share"),
    (dict(values=[1.0, 1.0], counts=[1, 1], budget=-0.1), ValueError, "budget must be a share"),
    (dict(values=[], counts=[], budget=0.5), ValueError, r"K = 0"),
    (dict(values=[1.0], counts=[1, 2], budget=0.5), ValueError, "values has 1 groups but counts has 2"),
    (dict(values=[1.0], counts=[1]), ValueError, "needs a budget"),
])
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        adapeft.select(method="exact", **kwargs)


def test_ops_opcheck():
    values, counts = realistic(9, seed=4)
    rank = torch.arange(9)
    torch.library.opcheck(ops.knapsack_greedy.default, (values, counts, rank))
    torch.library.opcheck(ops.knapsack_exact.default, (values, counts, rank, int(counts.sum() // 3), 10**6))
    torch.library.opcheck(ops.knapsack_exhaustive.default, (values, counts, rank))
    # The frontier's length depends on the data; fake tensors give it an unbacked size.
    torch.library.opcheck(ops.knapsack_pareto.default, (values, counts, rank, 10**6),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def tiny_gpt2(layers):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=61, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                   peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))


def test_apply_save_load_and_transfer_to_a_larger_model(tmp_path):
    small = tiny_gpt2(2)
    groups = adapeft.group_parameters(small)
    values = {"lora_A": 0.2, "lora_B": 0.5, "norm": 0.3, "bias": 0.1, "embed": 0.01, "others": 0.05}
    selection = adapeft.select(values=[values[n] for n in groups.names], counts=groups.numel, names=groups.names,
                               budget=0.05, method="exact")
    path = tmp_path / "selection.json"
    selection.save(path)
    assert json.loads(path.read_text())["chosen"] == selection.chosen
    loaded = adapeft.Selection.load(path)
    assert loaded.chosen == selection.chosen and loaded.method == "exact"
    large = tiny_gpt2(4)
    large_groups = adapeft.group_parameters(large)
    report = loaded.apply(large, large_groups)
    assert set(report["trained"]) == set(selection.chosen) and "lora_B" in report["trained"]
    for name in large_groups.names:
        assert all(p.requires_grad == (name in selection.chosen) for p in large_groups.params(name))
    assert report["trainable_parameters"] == sum(p.numel() for p in large.parameters() if p.requires_grad)
    layered = adapeft.group_parameters(large, granularity="layer")
    with pytest.raises(ValueError, match="do not match"):
        loaded.apply(large, layered)


def mlp_prober(**options):
    """A Prober (with `options`) of a small float64 MLP with its gradient, and a batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    batch = (torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,)))

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    loss_fn(model, batch).backward()
    return adapeft.Prober(model, None, loss_fn, **options), batch


def test_select_from_a_prober():
    prober, batch = mlp_prober()
    prober.step(batch, 1e-4)
    selection = adapeft.select(prober, budget=0.2, method="exact")
    assert selection.names == prober.names and selection.counts == prober.groups.numel
    expected = (prober.appi * torch.tensor(prober.groups.numel, dtype=torch.float64)).tolist()
    assert selection.values == pytest.approx(expected)


def test_a_selection_from_a_prober_notes_when_eta_star_is_many_probe_steps_away():
    """The values b^2/2A are the gain of a step of eta*; where eta* is a median FAR_STEPS or more of the probes' eta,
    the selection says a training at eta would not get there soon. eta*/eta is kept per group, nan until accepted."""
    prober, batch = mlp_prober()
    assert torch.isnan(prober.last_eta_star_steps).all()
    result = prober.step(batch, 1e-4)
    steps, accepted = prober.last_eta_star_steps, result.accepted
    assert accepted.sum() >= 2 and torch.equal(torch.isfinite(steps), accepted)
    torch.testing.assert_close(steps[accepted], result.eta_star[accepted] / 1e-4, rtol=1e-15, atol=0)

    def notes():
        return [n for n in adapeft.select(prober, budget=0.2, method="exact").notes if "eta*" in n]

    median = statistics.median(steps[accepted].tolist())
    assert len(notes()) == (median >= FAR_STEPS)
    prober.last_eta_star_steps = steps / median * FAR_STEPS * 1.01
    found = notes()
    assert len(found) == 1 and f"median {FAR_STEPS * 1.01:.3g} times" in found[0]
    assert f"the {int(accepted.sum())} accepted groups" in found[0]
    prober.last_eta_star_steps = steps / median * FAR_STEPS * 0.99
    assert notes() == []
    prober.last_eta_star_steps = torch.full_like(steps, math.nan)
    assert notes() == []


def test_a_selection_at_a_horizon_values_what_that_many_steps_of_eta_reach():
    """horizon=T values each accepted probe by the quadratic's reduction at x = min(T eta, eta*), x b - x^2 A/2,
    over the parameters (twice that, as APPI's b^2/A is twice a step's reduction), and a fit rejected for A <= 0
    alone (here the LayerNorm's, resolved, R^2 1) by its linear term x b at x = T eta: computed here from b and A
    alone. A long horizon gives APPI's values to the groups of no concave fit; a short one ranks by b; the
    far-step note goes, as the values then say what it warns about."""
    prober, batch = mlp_prober()
    for eta in (1e-4, 3e-4):
        prober.step(batch, eta)
    counts = torch.tensor(prober.groups.numel, dtype=torch.float64)
    concave = [[verdict == "A <= 0" and r2 > 0.99 for verdict, r2 in zip(result.reasons(), result.r2.tolist())]
               for result in prober.results]
    assert [c[prober.names.index("norm")] for c in concave] == [True, True] and sum(map(sum, concave)) == 2
    for horizon in (1, 7.5, 1e9):
        want = torch.zeros(len(prober.names), dtype=torch.float64)
        for result, concave_here in zip(prober.results, concave):
            for k in range(len(prober.names)):
                b, A = result.b[k].item(), result.A[k].item()
                if result.accepted[k]:
                    x = min(horizon * result.eta, b / A)
                    want[k] += 2 * (x * b - x * x * A / 2) / counts[k].item()
                elif concave_here[k]:
                    want[k] += 2 * horizon * result.eta * b / counts[k].item()
        selection = adapeft.select(prober, budget=0.3, method="exact", horizon=horizon)
        torch.testing.assert_close(torch.tensor(selection.values, dtype=torch.float64), want * counts, rtol=1e-12, atol=0)
        torch.testing.assert_close(horizon_appi(prober, horizon), want, rtol=1e-12, atol=0)
        assert not [n for n in selection.notes if "eta*" in n]
        assert selection.horizon == horizon and f"at a horizon of {horizon:g} steps" in selection.table()
    accepted = prober.results[0].accepted & prober.results[1].accepted
    assert accepted.sum() >= 2
    convex = torch.tensor([not any(c[k] for c in concave) for k in range(len(prober.names))])
    torch.testing.assert_close(horizon_appi(prober, 1e300)[convex], prober.appi[convex], rtol=1e-15, atol=0)
    # One step short of every eta*: each probe's value is about 2 eta b per parameter, the order of b.
    short = horizon_appi(prober, 1e-6) * counts
    slopes = sum(torch.where(r.accepted | torch.tensor(c), 2e-6 * r.eta * r.b, torch.zeros_like(r.b))
                 for r, c in zip(prober.results, concave))
    torch.testing.assert_close(short, slopes, rtol=1e-5, atol=0)
    plain = adapeft.select(prober, budget=0.3)
    assert plain.horizon is None and "APPI x parameters" in plain.table()
    units = prober.groups  # units of one part each: the same values
    assert adapeft.select(prober, budget=0.3, units=units, horizon=3).values == \
        adapeft.select(prober, budget=0.3, horizon=3).values


@pytest.mark.parametrize("horizon", [0, -2, math.nan, math.inf, True, "20"])
def test_a_bad_horizon_is_named(horizon):
    prober, batch = mlp_prober()
    prober.step(batch, 1e-4)
    with pytest.raises(ValueError, match="adapeft.select: horizon must be a finite number of training steps > 0"):
        adapeft.select(prober, budget=0.2, horizon=horizon)


def test_a_horizon_needs_a_prober_and_its_history():
    with pytest.raises(TypeError, match="horizon= applies to a Prober's probes"):
        adapeft.select(values=[1.0, 2.0], counts=[1, 1], budget=0.5, horizon=10)
    prober, batch = mlp_prober()
    prober.results = None  # as Prober(history=False) keeps them
    with pytest.raises(ValueError, match="history=False"):
        adapeft.select(prober, budget=0.2, horizon=10)


def test_loading_what_is_not_a_selection_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json is not JSON \(.*line 1, column 2\)"):
        adapeft.Selection.load(tmp_path / "bad.json")
    saved = adapeft.select(values=[1.0, 2.0], counts=[1, 1], budget=0.5, method="exact").as_dict()
    del saved["names"]
    (tmp_path / "part.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"part.json lacks the fields \['names'\]"):
        adapeft.Selection.load(tmp_path / "part.json")
    (tmp_path / "probe.json").write_text(json.dumps({"format": "adapeft.probe/1"}))
    with pytest.raises(ValueError, match="probe.json is not an adapeft selection"):
        adapeft.Selection.load(tmp_path / "probe.json")


def test_given_selection_names_its_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    groups = adapeft.group_parameters(model)
    selection = adapeft.Selection.given(["norm", "bias"], groups)
    assert selection.chosen == [n for n in groups.names if n in ("norm", "bias")]
    assert selection.count == sum(c for n, c in zip(groups.names, groups.numel) if n in ("norm", "bias"))
    with pytest.raises(ValueError, match="no groups named \\['lora_A'\\]"):
        adapeft.Selection.given(["lora_A"], groups)
