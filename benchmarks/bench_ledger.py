"""How many elements a perturbation step cannot invert exactly (and so must save in the ledger).

Weights ~ N(0, 0.02), directions ~ N(0, 1), steps {-2, -1, 1, 2} * eta with eta chosen so that the
relative step r = |eta d| / |w| (ratio of norms) spans 1e-6 .. 1e-2. For each dtype it prints the
fraction of elements saved per step (the mean and the worst of the four steps), the fraction whose
bits changed, and the realized step over the nominal one (the bias a fit with nominal steps would
have). Also the zero-initialised case (a fresh LoRA B). Runs on any device:

    python benchmarks/bench_ledger.py [--device cuda] [--numel 4000000]
"""
import argparse

import torch

import adapeft


def measure(weights, direction, eta, device):
    steps = torch.tensor([-2 * eta, -eta, eta, 2 * eta], dtype=torch.float32, device=device)
    report = adapeft.new_report(4, device)
    original = weights.clone()
    with adapeft.GroupPerturbation([weights], [direction], steps, capacity=weights.numel()) as group:
        for j in range(4):
            group.move(j, report, j)
    assert torch.equal(weights.view(torch.uint8), original.view(torch.uint8)), "restore was not bit-exact"
    rows = report.cpu()
    nominal = steps.double().cpu()
    n = weights.numel()
    saved = rows[:, adapeft.REPORT_FIELDS.index("saved")] / n
    changed = rows[:, adapeft.REPORT_FIELDS.index("changed")] / n
    realized = rows[:, adapeft.REPORT_FIELDS.index("step")] / nominal
    return saved.mean().item(), saved.max().item(), changed.mean().item(), realized.mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    base = torch.randn(args.numel, generator=generator, dtype=torch.float64) * 0.02
    direction64 = torch.randn(args.numel, generator=generator, dtype=torch.float64)
    ratio_of_norms = (base.norm() / direction64.norm()).item()
    print(f"device {args.device}, {args.numel} elements, w ~ N(0, 0.02), d ~ N(0, 1)")
    print(f"{'dtype':9} {'init':6} {'r':>7} {'saved mean':>11} {'saved max':>10} {'changed':>8} {'realized/nominal':>17}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for init in ("normal", "zeros"):
            for r in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
                weights = (base if init == "normal" else torch.zeros_like(base)).to(dtype).to(args.device)
                direction = direction64.to(torch.float32).to(args.device)
                eta = r * ratio_of_norms
                saved_mean, saved_max, changed, realized = measure(weights, direction, eta, args.device)
                print(f"{str(dtype).split('.')[1]:9} {init:6} {r:7.0e} {saved_mean:11.3e} {saved_max:10.3e} "
                      f"{changed:8.3f} {realized:17.3f}")


if __name__ == "__main__":
    main()
