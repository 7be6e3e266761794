"""Would evaluating a group's perturbed points in one batched pass pay? Measured before building it.

A probe runs one forward pass per perturbed point (4 a group, 2 with points=3). Batching a group's n points into
one pass (each point's weights applied to its own copy of the batch) can only pay where one pass over n copies
of the batch costs less than n passes over one: where the forward is launch-bound (small models, short
sequences). For each case this prints, on Llama-shaped models with LoRA on every linear layer of the blocks:
  fwd ms        one forward pass with the loss, no autograd (median)
  xN/N*fwd      one pass over the batch repeated N times, over N passes: the floor of any batching
  vmap/N*fwd    the N points of one group (the LoRA A of the middle block's q_proj) in one pass, through
                torch.func.vmap over torch.func.functional_call: what batching would run
  max rel diff  the batched losses against N sequential passes (batching changes the reduction order: the
                losses are no longer the sequential probe's bit for bit)
Batching pays where the ratios are below 1.

    python benchmarks/bench_batching.py --device cpu --dtype float32 --cases tiny:2x32,smollm2:4x64
    python benchmarks/bench_batching.py --cases smollm2:8x512,smollm2:1x128,llama-1b:8x512     # CUDA, bfloat16
"""
import argparse

import torch

import adapeft
from bench_llm import SHAPES, build, seconds

POINTS = 4
ETAS = (-2e-2, -1e-2, 1e-2, 2e-2)


def parse(case):
    shape, size = case.split(":")
    seqs, tokens = (int(n) for n in size.lower().split("x"))
    if shape not in SHAPES:
        raise ValueError(f"shape one of {list(SHAPES)}")
    return shape, seqs, tokens


def median_seconds(fn, repeats, device):
    fn()  # warm-up
    return seconds(fn, repeats, device)


def measure(case, dtype, device, repeats):
    shape, seqs, tokens = parse(case)
    model = build(shape, dtype, device).eval()
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (seqs, tokens), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    repeated = ids.repeat(POINTS, 1)
    middle = model.config.num_hidden_layers // 2
    name = next(n for n, _ in model.named_parameters() if f"layers.{middle}.self_attn.q_proj.lora_A" in n)
    weight = dict(model.named_parameters())[name].detach()
    direction = torch.randn_like(weight)
    stacked = torch.stack([weight - eta * direction for eta in ETAS])

    def one_point(w):
        return adapeft.causal_lm_loss(
            lambda **kw: torch.func.functional_call(model, {name: w}, args=(), kwargs=kw), ids)

    batched = torch.func.vmap(one_point)
    with torch.no_grad():
        fwd = median_seconds(lambda: adapeft.causal_lm_loss(model, ids), repeats, device)
        times_n = median_seconds(lambda: adapeft.causal_lm_loss(model, repeated), repeats, device)
        row = {"case": case, "fwd": fwd, "xN": times_n / (POINTS * fwd)}
        try:
            vmapped = median_seconds(lambda: batched(stacked), repeats, device)
            losses = batched(stacked)
            sequential = torch.stack([one_point(w) for w in stacked])
            row["vmap"] = vmapped / (POINTS * fwd)
            row["diff"] = ((losses - sequential).abs() / sequential.abs()).max().item()
        except Exception as error:  # noqa: BLE001 - a model vmap cannot batch is a finding, not a crash
            row["vmap"], row["diff"] = None, None
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="smollm2:8x512,smollm2:1x128,llama-1b:8x512",
                        help=f"SHAPE:SEQSxTOKENS, comma-separated; shapes {', '.join(SHAPES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    for case in cases:
        try:
            parse(case)
        except ValueError as error:
            parser.error(f"--cases {case!r}: SHAPE:SEQSxTOKENS, {error}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}, {args.dtype}, {POINTS} points, median of {args.repeats}")
    print(f"{'case':18} {'fwd ms':>9} {'xN/N*fwd':>9} {'vmap/N*fwd':>11} {'max rel diff':>13}")
    for case in cases:
        row = measure(case, dtype, device, args.repeats)
        vmap = "error" if row["vmap"] is None else f"{row['vmap']:.2f}"
        diff = "-" if row["diff"] is None else f"{row['diff']:.1e}"
        print(f"{case:18} {1e3 * row['fwd']:9.2f} {row['xN']:9.2f} {vmap:>11} {diff:>13}", flush=True)
        if "error" in row:
            print(f"{'':18} vmap: {row['error']}")


if __name__ == "__main__":
    main()
