"""A short tour: probe every parameter group of a small model, a few times during training.

For each group alone, the model is moved in place to w - eta_j * d for eta_j in {-2,-1,1,2}*eta (d the
gradient, or the optimizer's next update), the loss is measured, and the group is restored bit for bit;
one fused fit turns the K x 5 losses into b ~ G.d, A ~ d.H.d, R^2, the per-parameter influence
PPI = b^2/(A n) and eta* = b/A. APPI, the running sum of PPI, ranks the groups.

    python -m adapeft.apps.tour [--device cuda] [--direction optimizer]
"""
import argparse
import time

import torch

import adapeft


def make_model_and_data(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
        torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
        torch.nn.Linear(64, 4),
    ).to(device)
    inputs = torch.randn(256, 32, device=device)
    teacher = torch.nn.Linear(32, 4).to(device)
    labels = teacher(inputs).argmax(1)
    return model, (inputs, labels)


def loss_fn(model, batch):
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs), labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--direction", choices=("grad", "optimizer"), default="grad")
    parser.add_argument("--eta", type=float, default=None, help="probe step (default: 1e-2, or the lr)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, batch = make_model_and_data(device)
    groups = adapeft.group_parameters(model)
    print(groups.summary())
    optimizer = torch.optim.AdamW(adapeft.param_groups(groups, lr=3e-3)) if args.direction == "optimizer" \
        else torch.optim.SGD(model.parameters(), lr=0.1)
    eta = args.eta or (3e-3 if args.direction == "optimizer" else 1e-2)
    prober = adapeft.Prober(model, groups, loss_fn, direction=args.direction, optimizer=optimizer,
                            schedule=adapeft.ProbeSchedule(len(groups), interval=10))
    before, elapsed, result = None, 0.0, None
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        if prober.schedule(step):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            start = time.perf_counter()
            result = prober.step(batch, eta)
            elapsed += time.perf_counter() - start
            exact = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
            if not exact:
                raise SystemExit("restore was not bit-exact")
        optimizer.step()
    probes = len(prober.history)
    print(f"\nadapeft {adapeft.__version__} on {device}: {probes} probes of {len(groups)} groups "
          f"({4 * len(groups) + 1} forward passes each, {elapsed / probes * 1e3:.1f} ms per probe), direction "
          f"{args.direction}, eta {eta:g}; final loss {loss.item():.4f}")
    print(f"kernels: {', '.join(f'{op} {b[device.type]}' for op, b in adapeft.BACKENDS.items())}")
    print("\nlast probe:")
    print(result.table())
    ranking = sorted(zip(groups.names, prober.appi.tolist()), key=lambda item: -item[1])
    print("\nAPPI (accumulated per-parameter influence), highest first:")
    for name, value in ranking:
        print(f"  {name:8} {value:.3e}")
    print("every parameter bit-identical after every probe: True")


if __name__ == "__main__":
    main()
