"""Fake (meta) implementations: output shapes and dtypes without touching data, for FakeTensor,
torch.compile and torch.library.opcheck."""
import torch

from . import layout as L


@torch.library.register_fake("adapeft::pack_group")
def _pack_group(params, directions, states, layout):
    words = L.TABLE_HEADER_WORDS + L.TABLE_TENSOR_WORDS * len(params) + L.count_chunks(params)
    return params[0].new_empty((words,), dtype=torch.int64)


@torch.library.register_fake("adapeft::perturb_")
def _perturb(params, directions, states, layout, table, fingerprint, hyper, steps, from_step, to_step, ledger_in,
             ledger_out, report, report_row):
    return None


@torch.library.register_fake("adapeft::quadratic_fit")
def _quadratic_fit(losses, steps, counts, appi=None, r2_threshold=0.99):
    groups = losses.shape[0]
    real = [losses.new_empty((groups,), dtype=torch.float64) for _ in range(5)]
    accepted = losses.new_empty((groups,), dtype=torch.bool)
    b, A, r2, ppi, eta_star = real
    return b, A, r2, accepted, ppi, eta_star


@torch.library.register_fake("adapeft::knapsack_greedy")
def _knapsack_greedy(values, counts, rank):
    return values.new_empty(values.shape, dtype=torch.int64), values.new_empty(values.shape, dtype=torch.float64)


@torch.library.register_fake("adapeft::knapsack_exact")
def _knapsack_exact(values, counts, rank, capacity, max_states):
    return values.new_empty(values.shape, dtype=torch.bool), values.new_empty((3,), dtype=torch.int64)


@torch.library.register_fake("adapeft::knapsack_pareto")
def _knapsack_pareto(values, counts, rank, max_points):
    size = torch.library.get_ctx().new_dynamic_size()
    return (values.new_empty((size,), dtype=torch.int64), values.new_empty((size,), dtype=torch.float64),
            values.new_empty((size,), dtype=torch.int64))


@torch.library.register_fake("adapeft::knapsack_exhaustive")
def _knapsack_exhaustive(values, counts, rank):
    subsets = 1 << values.shape[0]
    return values.new_empty((subsets,), dtype=torch.int64), values.new_empty((subsets,), dtype=torch.float64)
