"""The adapeft ops as Python functions: same names and arguments as torch.ops.adapeft, served by the
compiled kernels where they exist and by adapeft.ops.reference elsewhere (see adapeft.ops.backend)."""
import torch

from ..fit import FitResult
from . import backend as _backend
from . import layout as L


def pack_group(params, directions, states=(), layout=()):
    """Validate a group and build its table on its device.

    Each tensor's direction is `directions[i]` (same shape; float32 or the parameter's dtype), or, per
    `layout` (STATES_PER_TENSOR + 1 integers per tensor: a direction kind, then indices into `states`, -1
    for none), formed from the gradient in `directions[i]` and an optimizer's state tensors.
    """
    params, directions, states, layout = list(params), list(directions), list(states), [int(v) for v in layout]
    if not params:
        raise ValueError("adapeft.pack_group: the group has no tensors")
    with torch.no_grad():
        return _backend.call("pack_group")(params, directions, states, layout)


def group_fingerprint(params, directions, states=(), layout=()):
    """The fingerprint perturb_ checks, so that a table is never used with tensors it does not describe."""
    args = (list(params), list(directions), list(states), [int(v) for v in layout])
    if _backend._C is not None:
        return _backend._C.group_fingerprint(*args)
    return L.group_fingerprint(*args)


def new_ledger(num_chunks, capacity, device):
    """A zeroed ledger for a group of `num_chunks` chunks with `capacity` words of entries (a saved
    element takes one word, two for float64)."""
    if capacity < 0:
        raise ValueError(f"adapeft.new_ledger: capacity must be >= 0, got {capacity}")
    return torch.zeros(L.ledger_words(num_chunks, capacity), dtype=torch.int64, device=device)


def new_report(rows, device):
    """A report with `rows` rows of the fields in adapeft.REPORT_FIELDS, filled with nan until written."""
    return torch.full((rows, len(L.REPORT_FIELDS)), float("nan"), dtype=torch.float64, device=device)


def perturb_(params, directions, states, layout, table, fingerprint, hyper, steps, from_step, to_step, ledger_in,
             ledger_out, report, report_row=-1):
    """Move a group in place from step `from_step` to step `to_step` (-1: the unperturbed weights).

    Prefer adapeft.GroupPerturbation, which keeps the table, the ledgers and the current step for you.
    """
    with torch.no_grad():
        _backend.call("perturb_")(list(params), list(directions), list(states), list(layout), table, fingerprint,
                                  hyper, steps, from_step, to_step, ledger_in, ledger_out, report, report_row)


def quadratic_fit(losses, steps, counts, appi=None, r2_threshold=0.99):
    """Fit dL(x) = -x*b + x^2/2*A for every group (row) at once; accumulate PPI into `appi` where accepted."""
    with torch.no_grad():
        return FitResult(*_backend.call("quadratic_fit")(losses, steps, counts, appi, r2_threshold))
