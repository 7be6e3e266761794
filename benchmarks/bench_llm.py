"""One whole probe step (Prober.step) on Llama-shaped causal LMs, the probe's modes side by side, against the floors.

Llama configs with random weights (SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B, and a tiny one for CPU smoke runs),
sdpa attention, peft LoRA (r=8, alpha 16) on every linear layer of the blocks with the base frozen, every lora_B
drawn from N(0, 0.02) (a zero B would leave lora_A without a gradient), gradients from one backward pass of
adapeft.causal_lm_loss on random token ids, groups from group_parameters(model, GRANULARITY, trainable_only=True).
A case is SHAPE:GRANULARITY:SEQSxTOKENS. Modes (MODES: name -> Prober options): today {}, prefix
{reuse_prefix: True}, three {points: 3, slope: "autograd"}, three prefix (both), on CUDA today graphed, prefix
graphed and three graphed (the same with cuda_graph=True), torch {backend:
"torch"}, batched {backend: "batched"}. Every mode probes at
fixed steps (step_policy="fixed"): an adaptive probe's later steps run the same passes, and its first one's
bracketing rounds would only lengthen the warm-up. Each mode: one warm-up step (graphed: the capture), then the
median of --repeats steps. Columns:
  K, L       groups with a gradient, blocks in the model's stack
  fwd ms     one eager forward pass with the loss, no_grad, eval mode: QUEUED passes queued back to back between two
             synchronisations, as the probe queues its passes, over QUEUED (median); a pass timed alone would add
             the host's launch time of a host-bound model to its floor
  today s    Prober.step, eager; tod/fl: over its floor, (forward passes of a step) x fwd
  prefix s   Prober(reuse_prefix=True).step; pre/pfl: over the prefix floor: the unperturbed passes x fwd plus,
             per perturbed pass, t_out + (L - b) x t_block, with t_out the time of what runs outside the blocks
             (embedding, final norm, head, cross-entropy), t_block = (fwd - t_out) / L, b the boundary the
             group's passes start from (prober.prefix.starts and .kept)
  pfl/fl     the prefix floor over today's floor: the most prefix reuse can save
  pre/tod    prefix s / today s
  g.tod s    today graphed; g.pre s: prefix graphed; g.3 s: three graphed (CUDA only); gpre/gtod, g3/gtod: over
             today graphed
  torch/tod  Prober(backend="torch").step / today s
  3pre s     three prefix; 3pre/tod: over today s (the target: 0.35)
  bat/tod    Prober(backend="batched").step (each group's points of a round in one vmapped pass) / today s
  passes     forward passes of one step (Prober.forward_passes, replays included): today / prefix / three
             (4K+1, 4K+1, 2K+1 and one backward)
  same       the last timed step's losses (K x 5), prefix against today, three prefix against three and prefix
             graphed against today graphed, equal bit for bit
  blocks     prober.prefix.block_share(): the share of the blocks' work the prefix probe's perturbed passes run
  kept MB    prober.prefix.nbytes: the kept block outputs (the boundaries are listed under the row)
  syncs      host synchronisations of one step (CUDA: today / prefix / today graphed / prefix graphed / three
             graphed),
             torch.cuda.set_sync_debug_mode("warn"), those of the model's own forward passes excluded
  extra MB   peak memory over a forward pass's, one step (CUDA: today / prefix / today graphed / prefix graphed /
             three graphed / torch; a graphed mode's at its capture step, where the graph's memory is allocated; an eager mode's at
             the step after the timed ones, which counts its syncs too)
A mode that fails prints "error" in its cells and its message under the table; "-" is a value not measured. Each
mode's step time, passes, syncs and extra memory also go to stderr as the mode ends, so a run cut short (a GPU
call's time limit) keeps what it measured.

    python benchmarks/bench_llm.py                                         # smollm2 and llama-1b, bfloat16
    python benchmarks/bench_llm.py --cases llama-8b:module:8x512 --modes today,prefix --json llm.json
    python benchmarks/bench_llm.py --device cpu --dtype float32 --cases tiny:module:2x32,tiny:type:2x32 --repeats 1
"""
import argparse
import gc
import json
import statistics
import sys
import time
import warnings

import torch

import adapeft
from adapeft.algorithm import equip_lora
from adapeft.groups import GRANULARITIES
from bench_probe import extra_peak_mb, model_syncs_allowed, syncs

SHAPES = {  # the published configs' shapes
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=500),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                    rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=4096),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=4096),
}
THREE = {"points": 3, "slope": "autograd"}
MODES = {"today": {}, "prefix": {"reuse_prefix": True}, "three": THREE, "three prefix": {**THREE, "reuse_prefix": True},
         "today graphed": {"cuda_graph": True}, "prefix graphed": {"reuse_prefix": True, "cuda_graph": True},
         "three graphed": {**THREE, "cuda_graph": True},
         "torch": {"backend": "torch"}, "batched": {"backend": "batched"}}
DEFAULT_CASES = "smollm2:module:8x512,llama-1b:module:8x512,llama-1b:type:8x512"
QUEUED = 8  # forward passes a floor measurement queues between two synchronisations
LORA_R, LORA_ALPHA, ETA = 8, 16, 1e-2  # fixed steps: 1e-4 leaves bfloat16 LoRA weights unmoved
ERROR = "error"


def parse_case(text):
    shape, granularity, size = text.split(":")
    seqs, tokens = (int(n) for n in size.lower().split("x"))
    if shape not in SHAPES or granularity not in GRANULARITIES:
        raise ValueError(f"shape one of {list(SHAPES)}, granularity one of {GRANULARITIES}")
    return shape, granularity, seqs, tokens


def build(shape, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(attn_implementation="sdpa", **SHAPES[shape])
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(config)
        model = equip_lora(model, adapeft.lora_targets(model), r=LORA_R, alpha=LORA_ALPHA, train_all=False).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, repeats, device):
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def queued_seconds(fn, repeats, device):
    """One call of fn, timed over QUEUED calls queued back to back (median over repeats)."""
    return seconds(lambda: [fn() for _ in range(QUEUED)], repeats, device) / QUEUED


def outside_seconds(model, ids, repeats, device):
    """What a forward pass runs outside the blocks: the embedding of the batch, then the final norm, the head and
    the cross-entropy on a hidden state of the batch's shape (as causal_lm_loss computes it)."""
    base = model.get_base_model()
    embed, norm, head = base.model.embed_tokens, base.model.norm, base.lm_head
    hidden = torch.randn(*ids.shape, base.config.hidden_size, dtype=head.weight.dtype, device=device)

    def outside():
        with torch.no_grad():
            embed(ids)
            logits = head(norm(hidden))[:, :-1]
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    outside()
    return queued_seconds(outside, repeats, device)


def progress(line):
    print(line, file=sys.stderr, flush=True)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_mode(name, model, groups, ids, repeats, device, forward_peak):
    """One mode's figures: step seconds, passes and losses of the last timed step, syncs, extra MB, prefix."""
    loss = model_syncs_allowed(adapeft.causal_lm_loss) if device.type == "cuda" else adapeft.causal_lm_loss
    prober = adapeft.Prober(model, groups, loss, step_policy="fixed", **MODES[name])
    graphed = MODES[name].get("cuda_graph") and device.type == "cuda"
    out = {}
    if graphed:  # the capture step: its peak (the graph's memory pool is allocated then)
        out["extra MB"] = extra_peak_mb(lambda: prober.step(ids, ETA), forward_peak)
    else:
        prober.step(ids, ETA)
    times = []
    for _ in range(repeats):
        passes = prober.forward_passes
        synchronize(device)
        start = time.perf_counter()
        result = prober.step(ids, ETA)
        synchronize(device)
        times.append(time.perf_counter() - start)
    out.update(seconds=statistics.median(times), passes=prober.forward_passes - passes, losses=result.losses.clone())
    if MODES[name].get("cuda_graph") and (prober.graph_disabled is not None or not prober.graph_captures):
        out["note"] = f"no CUDA graph, probed eagerly: {prober.graph_disabled}"
    # One more step counts the host syncs and, eager, the peak memory too (a step fewer a mode: LLM steps are long).
    step = lambda: prober.step(ids, ETA)  # noqa: E731
    counted = step if name == "torch" else lambda: out.__setitem__("syncs", syncs(step))
    if device.type == "cuda" and not graphed:
        out["extra MB"] = extra_peak_mb(counted, forward_peak)
    elif device.type == "cuda":
        counted()
    prefix = prober.prefix
    if prefix is not None:
        out.update(blocks=prefix.block_share(), kept=list(prefix.kept))
        out["kept MB"] = prefix.nbytes / 2**20
        out["boundaries"] = {g: prefix.boundary(g) for g in groups.names}
        if prefix.disabled:
            out["note"] = f"prefix reuse disabled: {prefix.disabled}"
    prober.flush()
    return out


def measure(case, dtype, device, modes, repeats):
    """One case's row; failures of its modes go to row["errors"]."""
    shape, granularity, seqs, tokens = parse_case(case)
    row = {"case": case, "dtype": str(dtype).split(".")[1], "errors": {}}
    model = build(shape, dtype, device)
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (seqs, tokens), device=device)
    model.train()
    adapeft.causal_lm_loss(model, ids).backward()
    model.eval()
    groups = adapeft.group_parameters(model, granularity, trainable_only=True)
    with_grad = [g for g in groups.names if any(p.grad is not None for p in groups.params(g))]
    row["K"], row["L"] = len(with_grad), model.config.num_hidden_layers

    def forward():
        with torch.no_grad():
            adapeft.causal_lm_loss(model, ids)

    forward()
    forward_peak = 0
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward()
        forward_peak = torch.cuda.max_memory_allocated() - base
    row["fwd"] = queued_seconds(forward, max(repeats, 3), device)
    row["t_out"] = outside_seconds(model, ids, max(repeats, 5), device)
    # Each mode's figures also go to stderr as it ends, so a run cut short (a GPU call's time limit) keeps them.
    progress(f"{case}: K {row['K']}, L {row['L']}, fwd {1e3 * row['fwd']:.2f} ms, t_out {1e3 * row['t_out']:.2f} ms")
    losses = {}
    for name in modes:
        try:
            out = run_mode(name, model, groups, ids, repeats, device, forward_peak)
            losses[name], row[name] = out.pop("losses"), out
            if "note" in out:
                row["errors"][name] = out["note"]
            progress(f"{case} {name}: {out['seconds']:.3f} s a step, {out['passes']} passes, syncs "
                     f"{out.get('syncs', '-')}, extra MB {out.get('extra MB', '-')}")
        except Exception as error:  # noqa: BLE001 - one failing mode must not end the run
            row[name], row["errors"][name] = ERROR, f"{type(error).__name__}: {error}"
            progress(f"{case} {name}: {row['errors'][name]}")
        free(device)  # the mode's prober (and, after a failure, its traceback) is gone by now
    for full, reused in (("today", "prefix"), ("three", "three prefix"), ("today graphed", "prefix graphed")):
        if full in losses and reused in losses:  # bit for bit, nan included
            same = torch.equal(losses[full].view(torch.int64), losses[reused].view(torch.int64))
            row[reused]["same"] = "yes" if same else "NO"
    floors(row, with_grad)
    return row


def floors(row, with_grad):
    """today's floor, the prefix floor and the ratios of the measured steps to them and to each other."""
    today, prefix = row.get("today"), row.get("prefix")
    t_block = (row["fwd"] - row["t_out"]) / row["L"]
    if isinstance(today, dict):
        row["floor"] = today["passes"] * row["fwd"]
        row["tod/fl"] = today["seconds"] / row["floor"]
    if isinstance(prefix, dict) and "boundaries" in prefix:
        perturbed = 4 * len(with_grad)
        row["prefix floor"] = (prefix["passes"] - perturbed) * row["fwd"] + 4 * sum(
            row["t_out"] + (row["L"] - prefix["boundaries"][g]) * t_block for g in with_grad)
        row["pre/pfl"] = prefix["seconds"] / row["prefix floor"]
        if "floor" in row:
            row["pfl/fl"] = row["prefix floor"] / row["floor"]
    for key, top, bottom in (("pre/tod", "prefix", "today"), ("g3/gtod", "three graphed", "today graphed"),
                             ("gpre/gtod", "prefix graphed", "today graphed"),
                             ("torch/tod", "torch", "today"), ("3pre/tod", "three prefix", "today"),
                             ("bat/tod", "batched", "today")):
        if isinstance(row.get(top), dict) and isinstance(row.get(bottom), dict):
            row[key] = row[top]["seconds"] / row[bottom]["seconds"]


COLUMNS = [  # (header, width, the cell's text from the row)
    ("case", 24, lambda r: r["case"]),
    ("K", 5, lambda r: r.get("K")),
    ("L", 3, lambda r: r.get("L")),
    ("fwd ms", 8, lambda r: r.get("fwd") and f"{1e3 * r['fwd']:.2f}"),
    ("today s", 8, lambda r: mode_value(r, "today", "seconds", "{:.3f}")),
    ("tod/fl", 7, lambda r: ratio(r, "tod/fl")),
    ("prefix s", 8, lambda r: mode_value(r, "prefix", "seconds", "{:.3f}")),
    ("pre/pfl", 7, lambda r: ratio(r, "pre/pfl")),
    ("pfl/fl", 7, lambda r: ratio(r, "pfl/fl")),
    ("pre/tod", 7, lambda r: ratio(r, "pre/tod")),
    ("g.tod s", 8, lambda r: mode_value(r, "today graphed", "seconds", "{:.3f}")),
    ("g.pre s", 8, lambda r: mode_value(r, "prefix graphed", "seconds", "{:.3f}")),
    ("gpre/gtod", 9, lambda r: ratio(r, "gpre/gtod")),
    ("g.3 s", 8, lambda r: mode_value(r, "three graphed", "seconds", "{:.3f}")),
    ("g3/gtod", 9, lambda r: ratio(r, "g3/gtod")),
    ("torch/tod", 9, lambda r: ratio(r, "torch/tod")),
    ("3pre s", 8, lambda r: mode_value(r, "three prefix", "seconds", "{:.3f}")),
    ("3pre/tod", 8, lambda r: ratio(r, "3pre/tod")),
    ("bat/tod", 7, lambda r: ratio(r, "bat/tod")),
    ("passes", 13, lambda r: joined(r, ("today", "prefix", "three"), "passes", "{}")),
    ("same", 9, lambda r: joined(r, ("prefix", "three prefix", "prefix graphed"), "same", "{}")),
    ("blocks", 6, lambda r: mode_value(r, "prefix", "blocks", "{:.3f}")),
    ("kept MB", 7, lambda r: mode_value(r, "prefix", "kept MB", "{:.1f}")),
    ("syncs", 13, lambda r: joined(r, ("today", "prefix", "today graphed", "prefix graphed", "three graphed"), "syncs",
                                   "{}")),
    ("extra MB", 21, lambda r: joined(r, ("today", "prefix", "today graphed", "prefix graphed", "three graphed", "torch"),
                                      "extra MB", "{:.0f}")),
]


def mode_value(row, mode, key, fmt):
    value = row.get(mode)
    if value == ERROR:
        return ERROR
    return fmt.format(value[key]) if isinstance(value, dict) and key in value else None


def ratio(row, key):
    return f"{row[key]:.3f}" if key in row else None


def joined(row, modes, key, fmt):
    cells = [mode_value(row, mode, key, fmt) or "-" for mode in modes]
    return None if all(cell == "-" for cell in cells) else "/".join(cells)


def table_line(cells):
    return " ".join(f"{'-' if cell is None else cell!s:>{width}}" if i else f"{cell!s:<{width}}"
                    for i, (cell, (_, width, _)) in enumerate(zip(cells, COLUMNS)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="SHAPE:GRANULARITY:SEQSxTOKENS, comma-separated; "
                        f"shapes {', '.join(SHAPES)}; granularity module, type or layer")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=3, help="timed probe steps per mode (median)")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of: {', '.join(MODES)}")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the probes' verdicts (unmoved, unresolved groups) are no figure here
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cases = [case for case in args.cases.split(",") if case]
    for case in cases:
        try:
            parse_case(case)
        except ValueError as error:  # a malformed case also raises here, before any model is built
            parser.error(f"--cases {case!r}: SHAPE:GRANULARITY:SEQSxTOKENS, {error}")
    chosen = [m.strip() for m in args.modes.split(",")] if args.modes else \
        [m for m in MODES if device.type == "cuda" or not MODES[m].get("cuda_graph")]
    if any(m not in MODES for m in chosen):
        parser.error(f"--modes: choose from {list(MODES)}")
    modes = [m for m in MODES if m in chosen]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {args.dtype}, LoRA r={LORA_R} (alpha {LORA_ALPHA}) on every "
          f"linear layer of the blocks, eta {ETA}, median of {args.repeats} steps, modes: {', '.join(modes)}")
    print(table_line([header for header, _, _ in COLUMNS]), flush=True)
    rows = []
    for case in cases:
        try:
            row = measure(case, dtype, device, modes, args.repeats)
        except Exception as error:  # noqa: BLE001 - a case that cannot be built (memory) leaves the others
            row = {"case": case, "errors": {"case": f"{type(error).__name__}: {error}"}, "K": ERROR}
        free(device)  # the case's model
        rows.append(row)
        print(table_line([cell(row) for _, _, cell in COLUMNS]), flush=True)
        if isinstance(row.get("prefix"), dict):
            print(f"{'':24} kept boundaries {row['prefix']['kept']}, t_out {1e3 * row['t_out']:.2f} ms", flush=True)
    for row in rows:
        for mode, message in row["errors"].items():
            print(f"{row['case']} {mode}: {message}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": name, "torch": torch.__version__, "dtype": args.dtype, "lora_r": LORA_R,
                       "eta": ETA, "repeats": args.repeats, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
