"""One whole probe step (4K+1 forward passes, every move and restore, the fit) on GPT-2-shaped models.

GPT-2 small / medium / large configs with random weights, peft LoRA (r=8) on c_attn, every parameter
trainable (the probing phase is full fine-tuning), gradients from one backward pass, batch 8 x 128
tokens (--batch: the paper's appendix D fine-tunes GPT-2-small at a physical batch of 64 and GPT-2-large
at 8, both of 128 tokens), float32 and bfloat16. K = the groups with a gradient (lora_A, lora_B, norm, bias, embed, others:
GPT-2's head is tied to the embedding). Columns (median milliseconds per probe step unless noted):
  fwd        one eager forward pass with the loss, no_grad, eval mode (eager fl. / (4K+1))
  graph fwd  the same forward replayed from a CUDA graph
  eager fl.  4K+1 eager forward passes back to back: the floor of an eager probe
  graph fl.  (4K+1) x graph fwd: the floor of a graphed probe
  adapeft    Prober.step, eager, timed alternately with the eager floor; adapeft/eager fl. is the median of
             the pairs' ratios (the host-bound forward pass drifts by tens of percent between calls)
  graphed    Prober(cuda_graph=True).step (captured at the first step, replayed after)
  torch      Prober(backend="torch").step: per-tensor loops, a saved copy per group, .item() per forward,
             a numpy fit (the same algorithm in plain PyTorch)
  GeN        gen-optim's lr_parabola (its default 3 points, one global learning rate; it also calls
             optimizer.step()), in forward-pass equivalents (time / fwd)
  syncs      host synchronisations per probe step (adapeft eager / graphed / torch / GeN), counted with
             torch.cuda.set_sync_debug_mode("warn"), those of the model's own forward passes excluded (GeN:
             less those of three forward passes)
  extra MB   peak memory over a forward pass (adapeft eager / graphed / torch / GeN); for graphed, what it
             keeps reserved between steps (the graph's memory pool and the ledgers, column "held") less
             a forward pass's peak

    python benchmarks/bench_probe.py [--quick] [--models small,large] [--dtypes bfloat16] [--batch 8]
    python benchmarks/bench_probe.py --models small --batch 64     # the paper's appendix D shape for GPT-2-small
"""
import argparse
import gc
import statistics
import time
import warnings

import torch

import adapeft
from adapeft.algorithm import equip_lora

CONFIGS = {  # GPT-2's published shapes, and a tiny one for smoke runs on a CPU
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=503),
    "small": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "large": dict(n_layer=36, n_embd=1280, n_head=20),
}
BATCH, TOKENS, VOCAB = 8, 128, 50257
ETA = 1e-4


def vocab_of(size):
    return CONFIGS[size].get("vocab_size", VOCAB)


def build(size, dtype, device="cuda"):
    """GPT-2 of that size with random weights and LoRA (r=8) on c_attn, every parameter trainable."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        **{"vocab_size": VOCAB, **CONFIGS[size]})
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = equip_lora(GPT2LMHeadModel(config), ["c_attn"]).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as after some training: a zero B would leave lora_A without a gradient
                p.normal_(0, 0.02)
    return model


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_seconds(first, second, pairs):
    """first() and second() timed alternately, `pairs` times, which of them leads swapped from pair to pair:
    their median seconds, and the median of the per-pair ratios first / second, which host drift moves far
    less than either time."""
    times = []
    for pair in range(pairs):
        spent = [0.0, 0.0]
        for which in ((0, 1), (1, 0))[pair % 2]:
            spent[which] = seconds((first, second)[which], 1)
        times.append(spent)
    return (statistics.median(one for one, _ in times), statistics.median(two for _, two in times),
            statistics.median(one / two for one, two in times))


def graph_forward_seconds(model, batch, repeats=20):
    static = {k: v.clone() for k, v in batch.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            lm_loss(model, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        lm_loss(model, static)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / repeats


def syncs(fn):
    """Host synchronisations that fn() makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def model_syncs_allowed(loss_fn):
    """loss_fn, with the host syncs of the model's own forward pass left out of syncs()' count: GPT-2's
    forward synchronises now and then (0 or 1 times in 25 passes), which is no probe's doing."""
    def wrapped(model, batch):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return loss_fn(model, batch)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    return wrapped


def extra_peak_mb(fn, forward_peak):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - forward_peak) / 2**20


def gen_step(model, optimizer, batch):
    """One call of GeN's lr_parabola on the same batch (its iterator yields it again and again)."""
    from GeN import lr_parabola
    from transformers import BatchEncoding
    encoding = BatchEncoding(batch)
    lr_parabola(model, optimizer, tr_iter=iter(lambda: encoding, None), task="NLU", lr_factor=[-1, 0, 1])


def measure(size, dtype, repeats, with_gen, batch_size):
    model = build(size, dtype)
    ids = torch.randint(0, VOCAB, (batch_size, TOKENS), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    lm_loss(model, batch).backward()
    model.eval()
    groups = adapeft.group_parameters(model)
    k = sum(1 for name in groups.names if any(p.grad is not None for p in groups.params(name)))
    points = 4 * k + 1
    row = {"model": size, "dtype": str(dtype).split(".")[1], "K": k,
           "params": sum(p.numel() for p in model.parameters())}

    def forward():
        with torch.no_grad():
            lm_loss(model, batch)

    def forwards(count):
        for _ in range(count):
            forward()

    def eager_floor():
        forwards(points)

    eager_floor()  # warm-up
    probe_loss = model_syncs_allowed(lm_loss)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward()
    forward_peak = torch.cuda.max_memory_allocated() - base
    row["graph fwd"] = graph_forward_seconds(model, batch)
    row["graph floor"] = points * row["graph fwd"]

    for label, options in (("adapeft", {}), ("torch", {"backend": "torch"})):
        prober = adapeft.Prober(model, groups, probe_loss, **options)
        prober.step(batch, ETA)  # tables, ledgers, kernels set up
        if label == "adapeft":
            row[label], row["eager floor"], row["adapeft/eager floor"] = alternating_seconds(
                lambda: prober.step(batch, ETA), eager_floor, 3 * repeats)
            row["fwd"] = row["eager floor"] / points
        else:
            row[label] = seconds(lambda: prober.step(batch, ETA), repeats)
        row[f"{label} syncs"] = syncs(lambda: prober.step(batch, ETA))
        row[f"{label} MB"] = extra_peak_mb(lambda: prober.step(batch, ETA), forward_peak)
        prober.flush()
        del prober
    gc.collect()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    prober = adapeft.Prober(model, groups, probe_loss, cuda_graph=True)
    start = time.perf_counter()
    prober.step(batch, ETA)  # eager warm-up and capture
    torch.cuda.synchronize()
    row["capture s"] = time.perf_counter() - start
    row["graphed"] = seconds(lambda: prober.step(batch, ETA), repeats)
    row["graphed syncs"] = syncs(lambda: prober.step(batch, ETA))
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved() - reserved
    # A replay allocates nothing: the forward's memory is the graph's pool, held from step to step.
    row["graphed held MB"] = held / 2**20
    row["graphed MB"] = (held - forward_peak) / 2**20
    assert prober.graph_captures and prober.graph_disabled is None, prober.graph_disabled
    del prober

    if with_gen:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen_step(model, optimizer, batch)  # Adam's state allocated
        row["GeN"] = seconds(lambda: gen_step(model, optimizer, batch), repeats)
        row["GeN syncs"] = syncs(lambda: gen_step(model, optimizer, batch)) - syncs(lambda: forwards(3))
        row["GeN MB"] = extra_peak_mb(lambda: gen_step(model, optimizer, batch), forward_peak)
        del optimizer
    del model, groups
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPT-2 small only, fewer repeats")
    parser.add_argument("--models", default="small,medium,large")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sequences of {TOKENS} tokens")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    try:
        import GeN  # noqa: F401
        with_gen = True
    except ImportError:
        with_gen = False
        print("gen-optim is not installed (pip install gen-optim): the GeN column is left out")
    models = ["small"] if args.quick else args.models.split(",")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    repeats = 3 if args.quick else 7
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x {TOKENS} tokens, "
          f"LoRA r=8 on c_attn, eta {ETA}")
    print(f"{'model':7} {'dtype':9} {'K':>2} {'fwd':>7} {'graph fwd':>9} {'eager fl.':>9} {'graph fl.':>9} "
          f"{'adapeft':>8} {'graphed':>8} {'torch':>8} {'GeN fwd-eq':>10} {'torch/graphed':>13} "
          f"{'adapeft/eager fl.':>17} {'graphed/graph fl.':>17} {'syncs':>12} {'extra MB':>22} {'held MB':>8}")
    for size in models:
        for dtype in dtypes:
            r = measure(size, dtype, repeats, with_gen, args.batch)
            ms = {key: 1e3 * value for key, value in r.items() if isinstance(value, float)}
            gen = f"{r['GeN'] / r['fwd']:10.2f}" if with_gen else f"{'-':>10}"
            gen_syncs = r.get("GeN syncs", "-")
            gen_mb = f"{r['GeN MB']:.0f}" if with_gen else "-"
            print(f"{size:7} {r['dtype']:9} {r['K']:2d} {ms['fwd']:7.2f} {ms['graph fwd']:9.2f} "
                  f"{ms['eager floor']:9.1f} {ms['graph floor']:9.1f} {ms['adapeft']:8.1f} {ms['graphed']:8.1f} "
                  f"{ms['torch']:8.1f} {gen} {r['torch'] / r['graphed']:13.2f} "
                  f"{r['adapeft/eager floor']:17.3f} {r['graphed'] / r['graph floor']:17.3f} "
                  f"{r['adapeft syncs']:>2}/{r['graphed syncs']}/{r['torch syncs']}/{gen_syncs:<3} "
                  f"{r['adapeft MB']:5.0f}/{r['graphed MB']:.0f}/{r['torch MB']:.0f}/{gen_mb:<6} "
                  f"{r['graphed held MB']:8.0f}", flush=True)
            print(f"{'':19} capture {r['capture s']:.2f} s, {r['params'] / 1e6:.0f}M parameters", flush=True)


if __name__ == "__main__":
    main()
