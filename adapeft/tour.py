"""A short tour of the two adapeft ops on a small model: probe every parameter group of a model once.

For each group, the group alone is moved in place to w0 - eta_j * g for eta_j in {-2,-1,1,2}*eta, the
loss is measured at each point, the group is restored bit for bit, and one fused fit turns the K x 5
losses into b ~ G.g, A ~ g.H.g, R^2, the per-parameter influence PPI = b^2/(A n) and eta* = b/A.

    python -m adapeft.tour [--device cuda] [--eta 1e-3]
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
    return model, inputs, labels


def groups_of(model):
    """The paper's coarse groups for this model: norm weights, biases, head, other weights."""
    head = model[-1]
    groups = {"norm": [], "bias": [], "head": [], "others": []}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if module is head:
                groups["head"].append(p)
            elif isinstance(module, torch.nn.LayerNorm) and name == "weight":
                groups["norm"].append(p)
            elif name == "bias":
                groups["bias"].append(p)
            else:
                groups["others"].append(p)
    return groups


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eta", type=float, default=1e-2)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, inputs, labels = make_model_and_data(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(args.train_steps):
        optimizer.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    optimizer.zero_grad()
    loss_fn(model(inputs), labels).backward()

    groups = groups_of(model)
    names = list(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = torch.tensor([-2.0, -1.0, 1.0, 2.0], device=device) * args.eta
    losses = torch.empty(len(names), 5, device=device)
    report = adapeft.new_report(len(names) * 5, device)
    counts = torch.tensor([sum(p.numel() for p in groups[n]) for n in names], device=device)
    appi = torch.zeros(len(names), dtype=torch.float64, device=device)

    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        base = loss_fn(model(inputs), labels)
        for k, name in enumerate(names):
            params = groups[name]
            with adapeft.GroupPerturbation(params, [p.grad for p in params], steps) as group:
                for column, j in zip((0, 1, 3, 4), range(4)):
                    group.move(j, report, 5 * k + column)
                    losses[k, column] = loss_fn(model(inputs), labels)
            losses[k, 2] = base
            report[5 * k + 2].zero_()
    realized = report.view(len(names), 5, -1)[:, :, adapeft.REPORT_FIELDS.index("step")]
    fit = adapeft.quadratic_fit(losses, realized, counts, appi)
    elapsed = time.perf_counter() - start

    exact = all(torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32))
                for n, p in model.named_parameters())
    print(f"adapeft {adapeft.__version__}: one probe of {len(names)} groups on {device} "
          f"({4 * len(names) + 1} forward passes, {elapsed * 1e3:.1f} ms), eta = {args.eta:g}")
    print(f"kernels: {', '.join(f'{op} {b[device.type]}' for op, b in adapeft.BACKENDS.items())}")
    print(f"{'group':8} {'params':>7} {'b = G.g':>11} {'A = gHg':>11} {'R^2':>8} {'kept':>5} {'PPI':>10} {'eta*':>9}")
    for k, name in enumerate(names):
        print(f"{name:8} {int(counts[k]):7d} {fit.b[k].item():11.4e} {fit.A[k].item():11.4e} {fit.r2[k].item():8.5f} "
              f"{'yes' if fit.accepted[k] else 'no':>5} {fit.ppi[k].item():10.3e} {fit.eta_star[k].item():9.3g}")
    print(f"every parameter bit-identical after the probe: {exact}")
    if not exact:
        raise SystemExit("restore was not bit-exact")


if __name__ == "__main__":
    main()
