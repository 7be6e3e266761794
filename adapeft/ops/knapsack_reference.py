"""Pure-PyTorch twins of the knapsack ops: the same answers as the compiled ones (csrc/knapsack.h), with every value
compared exactly as a Python Fraction. The ground truth of the selection tests and the fallback where the compiled
CPU kernels are missing."""
import math
from fractions import Fraction

import torch


def _knapsack_items(values, counts, rank, op):
    """(values as exact Fractions, counts, ranks), with the extension's checks."""
    values_tensor = torch.as_tensor(values)
    values = [float(v) for v in values_tensor.reshape(-1).tolist()]
    counts_list = torch.as_tensor(counts).reshape(-1).tolist()
    rank = [int(r) for r in torch.as_tensor(rank).reshape(-1).tolist()]
    k = len(values)
    if k == 0:
        raise ValueError(f"{op}: there are no groups to choose from (K = 0)")
    if len(counts_list) != k:
        raise ValueError(f"{op}: values has {k} groups but counts has {len(counts_list)}")
    if len(rank) != k:
        raise ValueError(f"{op}: rank must have one entry per group ({k}), got {len(rank)}")
    if not values_tensor.is_floating_point() and any(int(v) != x for v, x in
                                                     zip(values, values_tensor.reshape(-1).tolist())):
        raise ValueError(f"{op}: integer values beyond 2^53 are not exact as doubles; pass them as floats")
    weights = []
    for i, (v, w) in enumerate(zip(values, counts_list)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{op}: values[{i}] = {v}; loss reductions must be finite and >= 0")
        if w != int(w) or int(w) <= 0:
            raise ValueError(f"{op}: counts[{i}] = {w}; every group must have at least one parameter")
        weights.append(int(w))
    return [Fraction(v) for v in values], weights, rank


def _efficiency_order(values, weights, rank):
    return sorted(range(len(values)), key=lambda i: (-values[i] / weights[i], weights[i], rank[i], i))


def _rounded(value):
    """An exact Fraction rounded once to a double (inf past the largest double, as the extension)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def knapsack_greedy(values, counts, rank):
    values, weights, rank = _knapsack_items(values, counts, rank, "adapeft.knapsack_greedy")
    order = _efficiency_order(values, weights, rank)
    nested, running = [], Fraction(0)
    for i in order:
        running += values[i]
        nested.append(_rounded(running))
    return torch.tensor(order, dtype=torch.int64), torch.tensor(nested, dtype=torch.float64)


def _pareto_states(values, weights, order, capacity=None):
    """Nemhauser-Ullmann over `order`: non-dominated (weight, value, mask) with weight <= capacity."""
    frontier = [(0, Fraction(0), 0)]
    for i in order:
        if values[i] == 0:
            continue
        shifted = [(w + weights[i], v + values[i], m | (1 << i)) for w, v, m in frontier
                   if capacity is None or w + weights[i] <= capacity]
        merged, a, c = [], 0, 0
        while a < len(frontier) or c < len(shifted):
            if c < len(shifted) and (a >= len(frontier) or shifted[c][0] < frontier[a][0]):
                point, c = shifted[c], c + 1
            else:
                point, a = frontier[a], a + 1
            if merged and point[1] <= merged[-1][1]:
                continue
            if merged and merged[-1][0] == point[0]:
                merged.pop()
            merged.append(point)
        frontier = merged
    return frontier


def knapsack_exact(values, counts, rank, capacity, max_states=10**8):
    """The refined optimum by dynamic programming over all non-dominated states (no reduction)."""
    values, weights, rank = _knapsack_items(values, counts, rank, "adapeft.knapsack_exact")
    if capacity < 0:
        raise ValueError(f"adapeft.knapsack_exact: capacity must be >= 0, got {capacity}")
    states = _pareto_states(values, weights, _efficiency_order(values, weights, rank), capacity)
    best = states[-1][2]
    mask = torch.tensor([bool(best >> i & 1) for i in range(len(values))])
    return mask, torch.tensor([1, len(values), len(states)], dtype=torch.int64)


def knapsack_pareto(values, counts, rank, max_points=10**7):
    values, weights, rank = _knapsack_items(values, counts, rank, "adapeft.knapsack_pareto")
    if len(values) > 64:
        raise ValueError(f"adapeft.knapsack_pareto: the exact frontier takes at most 64 groups (got {len(values)})")
    frontier = _pareto_states(values, weights, _efficiency_order(values, weights, rank))
    if len(frontier) > max_points:
        frontier = []
    as_signed = [m - (1 << 64) if m >= (1 << 63) else m for _, _, m in frontier]
    return (torch.tensor([w for w, _, _ in frontier], dtype=torch.int64),
            torch.tensor([_rounded(v) for _, v, _ in frontier], dtype=torch.float64),
            torch.tensor(as_signed, dtype=torch.int64))


def knapsack_exhaustive(values, counts, rank):
    values, weights, _ = _knapsack_items(values, counts, rank, "adapeft.knapsack_exhaustive")
    if len(values) > 24:
        raise ValueError(f"adapeft.knapsack_exhaustive: enumerates 2^K subsets, so K must be at most 24 "
                         f"(got {len(values)})")
    subset_weights, subset_values = [0], [Fraction(0)]
    for v_i, w_i in zip(values, weights):  # subset s has bit i set for the second half after item i
        subset_weights += [w + w_i for w in subset_weights]
        subset_values += [v + v_i for v in subset_values]
    return (torch.tensor(subset_weights, dtype=torch.int64),
            torch.tensor([_rounded(v) for v in subset_values], dtype=torch.float64))
