"""The free and cheap signals a user could rank groups by instead of the probe, as knapsack values.

Each gives one value per group, for the same knapsack under the same budget as APPI x n:
- squared gradient norm |g_k|^2, summed over the probe steps (the training gradient in p.grad: free);
- diagonal empirical Fisher, sum over the examples of a batch of |grad l_i|^2 per group, averaged over the
  examples and summed over the probe steps (one forward and backward pass per example, in eval mode);
- weight signal-to-noise (the score Spectrum ranks layers by, Hartford et al. 2024): per matrix, the sum of
  its singular values above the Marchenko-Pastur edge of a noise level estimated from their spread, over the
  sum of those below (the smallest, where none is below), divided by the largest; a group's value is its
  matrices' parameter-weighted mean times its size (tensors of fewer than 2 dimensions have no score);
- random values, for random selections under the budget.
Values are totals per group, so the knapsack's ratio value / n ranks groups per parameter, as APPI does.
"""
import math
import time

import torch

from .probe.distributed import is_sharded, local, sum_over_ranks

SIGNALS = ("squared gradient", "Fisher", "weight SNR", "random")
IQR_TO_SIGMA = 1.349  # a normal distribution's interquartile range in units of its standard deviation


def squared_gradient(groups):
    """|g_k|^2 of each group from p.grad (float64, one value per group; tensors without a gradient add 0). Under
    FSDP2 each rank holds shards of the gradients: their squares are summed over the ranks of the shards' mesh,
    so that every rank gets the whole tensors' |g|^2 (a collective: every rank must call it)."""
    grads = [[p.grad for p in groups.params(name) if p.grad is not None] for name in groups.names]
    values = torch.stack([sum((local(g).double().square().sum() for g in group),
                              torch.zeros((), dtype=torch.float64, device=_device(groups))) for group in grads])
    sharded = next((g for group in grads for g in group if is_sharded(g)), None)
    if sharded is not None:  # every parameter sharded over one 1-D mesh (adapeft.Prober refuses others): no
        # plain tensor, whose square every rank holds whole, is counted once a rank
        values = sum_over_ranks(values, sharded.device_mesh.get_group())
    return values.cpu()


def empirical_fisher(model, groups, loss_fn, examples):
    """The diagonal empirical Fisher summed over each group: mean over `examples` (batches of one example)
    of |grad l_i|^2, by torch.autograd.grad in eval mode, so that p.grad and the training flags stay."""
    modes = [(module, module.training) for module in model.modules()]
    params = [[p for p in groups.params(name) if p.requires_grad] for name in groups.names]
    flat = [p for group in params for p in group]
    totals = torch.zeros(len(groups.names), dtype=torch.float64, device=_device(groups))
    model.eval()  # no dropout: the Fisher of the model, not of a random sub-network
    try:
        for example in examples:
            grads = iter(torch.autograd.grad(loss_fn(model, example), flat, allow_unused=True))
            for k, group in enumerate(params):
                for _ in group:
                    g = next(grads)
                    if g is not None:
                        totals[k] += g.double().square().sum()
    finally:
        for module, training in modes:
            module.training = training
    return totals.cpu() / max(len(examples), 1)


def matrix_snr(weight):
    """Spectrum's signal-to-noise score of one matrix (0 for a zero matrix)."""
    singular = torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1))
    largest = singular.max()
    if largest == 0:
        return 0.0
    q1, q3 = torch.quantile(singular, torch.tensor([0.25, 0.75], dtype=torch.float64, device=singular.device)).tolist()
    sigma = (q3 - q1) / IQR_TO_SIGMA
    rows, cols = weight.shape[0], weight[0].numel()
    edge = sigma * (1 + math.sqrt(min(rows, cols) / max(rows, cols)))
    below = singular <= edge
    # With no singular value under the edge (a matrix of a few rows), the smallest stands for the noise.
    noise = singular[below].sum() if below.any() else singular.min()
    if noise == 0:
        return math.inf
    return float(singular[~below].sum() / noise) / float(largest)


def mean_snr(tensors):
    """The SNR of the matrices among `tensors`, their mean weighted by their sizes (0 without a matrix)."""
    scored = [(matrix_snr(p), p.numel()) for p in tensors if p.dim() >= 2]
    weight = sum(n for _, n in scored)
    return sum(s * n for s, n in scored) / weight if weight else 0.0


def weight_snr(groups):
    """Each group's value from its matrices' SNR: their parameter-weighted mean times the group's size."""
    return torch.tensor([mean_snr(groups.params(name)) * count for name, count in zip(groups.names, groups.numel)],
                        dtype=torch.float64)


def random_values(count, seed):
    """Uniform random values in (0, 1], one per group: the knapsack then picks a random set that fits."""
    generator = torch.Generator().manual_seed(seed)
    return 1 - torch.rand(count, generator=generator, dtype=torch.float64)


def _device(groups):
    return next(p.device for name in groups.names for p in groups.params(name))


class SignalRecorder:
    """Accumulates |g|^2 and the empirical Fisher at the probe steps of a training run (`observe(batch)` after
    the backward pass), with the seconds and forward/backward passes each cost beyond the training itself."""

    def __init__(self, model, groups, loss_fn, split_examples):
        self.model, self.groups, self.loss_fn, self.split_examples = model, groups, loss_fn, split_examples
        k = len(groups.names)
        self.values = {"squared gradient": torch.zeros(k, dtype=torch.float64),
                       "Fisher": torch.zeros(k, dtype=torch.float64)}
        self.seconds = {"squared gradient": 0.0, "Fisher": 0.0}
        self.passes = {"squared gradient": 0, "Fisher": 0}

    def observe(self, batch):
        start = time.perf_counter()
        self.values["squared gradient"] += squared_gradient(self.groups)
        self.seconds["squared gradient"] += time.perf_counter() - start
        start = time.perf_counter()
        examples = self.split_examples(batch)
        self.values["Fisher"] += empirical_fisher(self.model, self.groups, self.loss_fn, examples)
        self.seconds["Fisher"] += time.perf_counter() - start
        self.passes["Fisher"] += len(examples)
