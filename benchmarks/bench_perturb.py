"""One perturbation step of a parameter group: adapeft against PyTorch, and against the hardware floor.

Groups shaped like GPT-2 small/large at a relative step |eta d| / |w| of 1e-3 (norm and bias groups: ~100-150 small tensors; a large "others"
group). Parameter and direction dtypes (--dtypes): float32; bfloat16 and float16 with directions of their own
dtype, as the probe moves a 16-bit model (its gradients and AdamW's moments are 16-bit); and bfloat16 with
float32 directions ("bf16/f32d", as where a user passes float32 directions). Columns (median microseconds a step):
  adapeft     one rebase (rebuild w0, write w0 - eta_j d, keep the ledger), GPU time from CUDA-graph replays
  loop        a Python loop of per-tensor `p.add_(d, alpha=-eta)`, eager
  foreach     `torch._foreach_add_(params, directions, alpha=-eta)` with directions in the parameter dtype
              (its one-launch path needs one dtype), GPU time from CUDA-graph replays
  floor       bytes moved (read w, read d, write w, in their dtypes) / measured copy bandwidth, or one empty
              launch if larger
  saved       share of elements the step saved in the ledger
  eager       adapeft called from Python without a graph (host overhead included)

    python benchmarks/bench_perturb.py [--quick] [--groups large.others ...] [--dtypes float32 bfloat16 ...]
"""
import argparse

import torch

import adapeft

# label: (param dtype, direction dtype)
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bf16/f32d": (torch.bfloat16, torch.float32),
}

SHAPES = {
    # name: (tensor sizes) -- GPT-2 small has 12 blocks of hidden 768; large 36 blocks of 1280.
    "small.norm": [768] * 25,
    "small.bias": [2304, 768, 3072, 768] * 12 + [768] * 25,
    "large.norm": [1280] * 73,
    "large.bias": [3840, 1280, 5120, 1280] * 36 + [1280] * 73,
    "small.others": [768 * 2304, 768 * 768, 768 * 3072, 3072 * 768] * 12,
    "large.others": [1280 * 3840, 1280 * 1280, 1280 * 5120, 5120 * 1280] * 36,
}


def median_us(fn, repeats):
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(start, end))[repeats // 2] * 1e3


def graph_us(fn, calls, repeats=20):
    """GPU time per call of `calls` back-to-back calls replayed from a CUDA graph (no host overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_us(graph.replay, repeats) / calls


def copy_bandwidth():
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    us = median_us(lambda: b.copy_(a), 20)
    return 2 * a.numel() * 4 / (us * 1e-6)


def empty_launch_us():
    x = torch.zeros(1, device="cuda")
    return graph_us(lambda: x.add_(0), 50)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--groups", nargs="+", choices=sorted(SHAPES), help="only these groups (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="parameter and direction dtypes (default: all)")
    parser.add_argument("--relative-step", type=float, default=1e-3, help="|eta d| / |w| (default 1e-3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    launch = empty_launch_us()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"empty launch {launch:.1f} us")
    print(f"{'group':14} {'dtype':9} {'tensors':>7} {'elements':>11} {'adapeft':>9} {'loop':>9} {'foreach':>9} "
          f"{'floor':>8} {'vs foreach':>10} {'floor/adapeft':>13} {'saved':>8} {'eager':>8}")
    for name, sizes in SHAPES.items():
        if args.quick and "others" in name and "large" in name or args.groups and name not in args.groups:
            continue
        for label in args.dtypes:
            dtype, direction_dtype = DTYPES[label]
            params = [torch.randn(n, device="cuda", dtype=dtype) * 0.02 for n in sizes]
            directions = [torch.randn(n, device="cuda", dtype=direction_dtype) for n in sizes]
            numel = sum(sizes)
            eta = args.relative_step * 0.02  # |w| ~ 0.02, |d| ~ 1
            steps = torch.tensor([-2 * eta, -eta, eta, 2 * eta], device="cuda")
            group = adapeft.GroupPerturbation(params, directions, steps)
            repeats = 20 if numel > 10**8 else 200
            state = {"j": 0}

            def rebase():
                group.move(state["j"] % 4)
                state["j"] += 1

            t_eager = median_us(rebase, repeats)
            group.restore()
            t_adapeft = graph_us(rebase, 20, repeats=5 if numel > 10**8 else 20)
            group.restore()
            report = adapeft.new_report(1, "cuda")
            with group:
                group.move(3, report, 0)
            saved = report[0, adapeft.REPORT_FIELDS.index("saved")].item() / numel
            assert report[0, adapeft.REPORT_FIELDS.index("unmoved")].item() == 0
            t_loop = median_us(lambda: [p.add_(d, alpha=-eta) for p, d in zip(params, directions)], repeats)
            same = [d.to(dtype) for d in directions]
            t_foreach = graph_us(lambda: torch._foreach_add_(params, same, alpha=-eta), 20,
                                 repeats=5 if numel > 10**8 else 20)
            bytes_moved = numel * (2 * params[0].element_size() + directions[0].element_size())
            floor = max(bytes_moved / bandwidth * 1e6, launch)
            print(f"{name:14} {label:9} {len(sizes):7d} {numel:11d} {t_adapeft:9.1f} "
                  f"{t_loop:9.1f} {t_foreach:9.1f} {floor:8.1f} {t_foreach / t_adapeft:10.2f} "
                  f"{floor / t_adapeft:13.2f} {saved:8.1e} {t_eager:8.1f}")
            del group, params, directions, same
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
