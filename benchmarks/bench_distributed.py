"""Probing across ranks: DDP and FSDP2 against one device on the same global batch.

Run with torchrun, one process per GPU (NCCL), or on CPU with gloo for a smoke run:

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py                  # GPT-2-small on 2 GPUs
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --model tiny

Every rank builds the same GPT-2 + LoRA (bench_probe.build; float32 or --dtype) and takes
its share of one global batch; gradients come from one backward pass. Rank 0 also probes an unwrapped
copy on the whole global batch (the single-device reference). For DDP and for FSDP2 (fully_shard on
every block and the root) it prints: the largest relative difference of b and A (accepted groups) and
of APPI from the reference, whether the selections agree, whether every rank's parameters (shards) are
bit-identical after each probe and equal across ranks, and per rank the probe step's median time and
peak memory over the forward pass.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import adapeft
from bench_probe import CONFIGS, build, vocab_of


def lm_loss(model, batch):
    # In the model's dtype (transformers' own loss computes in float32 whatever the model's dtype).
    logits = model(input_ids=batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(model, batch, device, repeats, eta, require_resolved):
    """(results of two steps, prober, median step seconds, peak bytes over a forward pass)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch).backward()
    prober = adapeft.Prober(model, None, lm_loss, require_resolved=require_resolved)
    results = [prober.step(batch, eta) for _ in range(2)]
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        prober.step(batch, eta)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            lm_loss(model, batch)
        forward = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        prober.step(batch, eta)
        peak = torch.cuda.max_memory_allocated(device) - base - forward
    prober.flush()
    return results, prober, statistics.median(times), peak


def local_tensors(model):
    return [(p.to_local() if type(p).__name__ == "DTensor" else p).detach().clone() for p in model.parameters()]


def summary(results, prober):
    return {"b": results[-1].b.cpu(), "A": results[-1].A.cpu(), "accepted": results[-1].accepted.cpu(),
            "loss": float(results[-1].losses.abs().max()),
            "appi": prober.appi.cpu(), "chosen": adapeft.select(prober, budget=0.05, method="exact").chosen}


def largest_difference(got, want, mask=None, unit=None):
    """Largest relative difference, or the largest absolute one in `unit`s."""
    got, want = (got[mask], want[mask]) if mask is not None else (got, want)
    if got.numel() == 0:
        return 0.0
    scale = unit if unit is not None else want.abs().clamp(min=1e-300)
    return float(((got - want).abs() / scale).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--per-rank-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eta", type=float, default=1e-3)
    parser.add_argument("--dtype", default="float32", help="float64 separates the probe from float32 rounding")
    parser.add_argument("--require-resolved", action="store_true",
                        help="Prober(require_resolved=True): accept only fits resolved above the loss rounding")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    generator = torch.Generator().manual_seed(1)
    global_batch = torch.randint(0, vocab_of(args.model), (world * args.per_rank_batch, args.tokens),
                                 generator=generator).to(device)
    local = global_batch[rank * args.per_rank_batch:(rank + 1) * args.per_rank_batch]

    reference = None
    if rank == 0:
        results, prober, seconds, peak = probe(build(args.model, dtype, device), global_batch, device, args.repeats,
                                             args.eta, args.require_resolved)
        reference = summary(results, prober)
        print(f"device {device.type} x {world}, torch {torch.__version__}, GPT-2-{args.model} + LoRA, {args.dtype}, eta {args.eta}, "
              f"{'resolved fits only, ' if args.require_resolved else ''}"
              f"global batch {world * args.per_rank_batch} x {args.tokens}; one device on the global batch: "
              f"{1e3 * seconds:.1f} ms a probe step", flush=True)
    dist.barrier()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def wrap_ddp(model):
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                         else None)

    def wrap_fsdp2(model):
        mesh = init_device_mesh(device.type, (world,))
        for block in model.base_model.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    for mode, wrap in (("DDP", wrap_ddp), ("FSDP2", wrap_fsdp2)):
        model = wrap(build(args.model, dtype, device))
        before = local_tensors(model)
        results, prober, seconds, peak = probe(model, local, device, args.repeats, args.eta, args.require_resolved)
        restored = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                       for a, b in zip(before, local_tensors(model)))
        mine = summary(results, prober)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"summary": mine, "restored": restored, "seconds": seconds, "peak": peak})
        if rank == 0:
            same = all(torch.equal(g["summary"][key], mine[key]) for g in gathered for key in ("b", "A", "appi"))
            accepted = reference["accepted"] & mine["accepted"]
            # The losses' own resolution: b and A are differences of losses over steps of eta, so a loss
            # rounded to within delta leaves b uncertain by about delta / eta and A by delta / eta^2.
            delta = reference["loss"] * torch.finfo(dtype).eps
            print(f"{mode:6} accepted {int(accepted.sum())}/{accepted.numel()} groups  chosen {mine['chosen']} "
                  f"(one device: {reference['chosen']})\n       b {largest_difference(mine['b'], reference['b'], accepted):.1e}  "
                  f"A {largest_difference(mine['A'], reference['A'], accepted):.1e}  "
                  f"APPI {largest_difference(mine['appi'], reference['appi'], reference['appi'] > 0):.1e} "
                  f"(relative, vs one device); in units of the loss resolution (delta/eta, delta/eta^2): "
                  f"b {largest_difference(mine['b'], reference['b'], None, delta / args.eta):.2f}  "
                  f"A {largest_difference(mine['A'], reference['A'], None, delta / args.eta ** 2):.2f}\n       "
                  f"accepted same {torch.equal(mine['accepted'], reference['accepted'])}  "
                  f"selection same {all(g['summary']['chosen'] == reference['chosen'] for g in gathered)}  "
                  f"ranks bit-identical {same}  restored {all(g['restored'] for g in gathered)}  "
                  + "  ".join(f"rank {r}: {1e3 * g['seconds']:.1f} ms, {g['peak'] / 2**20:.0f} MB extra"
                              for r, g in enumerate(gathered)), flush=True)
        del model, prober, results
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
