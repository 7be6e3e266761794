"""Choose the trainable groups: the paper's 0-1 knapsack (value = loss reduction, weight = parameters).

`select(values=..., counts=..., budget=..., method=...)`, or `select(prober, budget=...)` straight from a
probe (values = APPI x parameters), returns a `Selection`:
- "greedy" (the paper's 3.2): groups by value per parameter (APPI), the K nested sets; with a budget, the
  nested set of most value that fits (the largest, unless the last groups add nothing).
- "exact": the refined optimum of Theorem 2.2 for the budget: the most loss reduction, and among all sets
  that reach it, the one with the fewest parameters (proven optimal; see `Selection.proven`).
- "pareto": every non-dominated (parameters, value) set, exactly for up to `max_exact_groups` groups;
  beyond that the greedy frontier plus exact optima at `budgets`, each point labelled.

Values are compared on a fixed-point grid below double precision (csrc/knapsack.h), so ties are exact;
among equally efficient groups the greedy order takes fewer parameters first, then the name. Values
that are all zero select nothing (the empty set is the refined optimum at every budget).
"""
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from . import _backend
from .groups import ParameterGroups

METHODS = ("greedy", "exact", "pareto")
DEFAULT_BUDGETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# The exact frontier is kept for up to 64 groups (its masks are 64-bit) and 5 million points. Measured by
# benchmarks/bench_select.py: realistic, uniform and strongly correlated instances of 64 groups have
# frontiers of 10^3-10^4 points, found in milliseconds; values exactly proportional to counts (every
# efficiency tied) reach the point limit within a second, and the greedy frontier is used instead.
MAX_EXACT_GROUPS = 64
MAX_FRONTIER_POINTS = 5_000_000
MAX_EXACT_STATES = 20_000_000  # about 0.5 GB of search states at most


@dataclass
class Selection:
    """Which groups to train. `mask` has one bool per group in input order; `value` is the predicted loss
    reduction (sum of the chosen values), `count` the chosen parameters. For method="pareto", `frontier`
    is a list of (count, value, mask) sorted by count and `labels` says how each point was found."""

    names: list
    values: list
    counts: list
    mask: np.ndarray
    method: str
    budget: float = None
    proven: bool = True
    frontier: list = None
    labels: list = None
    notes: list = field(default_factory=list)

    @property
    def value(self):
        return float(sum(v for v, m in zip(self.values, self.mask) if m))

    @property
    def count(self):
        return int(sum(c for c, m in zip(self.counts, self.mask) if m))

    @property
    def total(self):
        return int(sum(self.counts))

    @property
    def share(self):
        return self.count / self.total

    @property
    def chosen(self):
        return [n for n, m in zip(self.names, self.mask) if m]

    def table(self):
        lines = [f"method {self.method}" + (f", budget {self.budget:.3%}" if self.budget is not None else "") +
                 ("" if self.proven else " (not proven optimal)"),
                 f"chosen: {', '.join(self.chosen) or '(none)'}; {self.count:,} of {self.total:,} parameters "
                 f"({self.share:.3%}), predicted loss reduction {self.value:.4g}"]
        if self.frontier is not None:
            lines.append(f"{'parameters':>14} {'share':>8} {'loss reduction':>15}  {'how':14} groups")
            for (count, value, mask), label in zip(self.frontier, self.labels):
                groups = ", ".join(n for n, m in zip(self.names, mask) if m) or "(none)"
                lines.append(f"{count:14,d} {count / self.total:8.3%} {value:15.4g}  {label:14} {groups}")
        return "\n".join(lines)

    __str__ = table

    def apply(self, model, groups):
        """Make exactly the chosen groups trainable (requires_grad), freezing the others; returns a report."""
        if not isinstance(groups, ParameterGroups):
            raise TypeError("adapeft.Selection.apply: groups must come from adapeft.group_parameters(model)")
        missing = [n for n in self.names if n not in groups]
        extra = [n for n in groups.names if n not in self.names]
        if missing or extra:
            raise ValueError(f"adapeft.Selection.apply: the selection's groups do not match the model's: missing in "
                             f"the model {missing}, not in the selection {extra}. Group the model the same way "
                             "(granularity, rules) as the one the selection was made on")
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for n in groups.names for p in groups.params(n)):
            raise ValueError("adapeft.Selection.apply: groups were made for another model")
        chosen = set(self.chosen)
        for name in groups.names:
            for p in groups.params(name):
                p.requires_grad_(name in chosen)
        trained = sum(n for name, n in zip(groups.names, groups.numel) if name in chosen)
        return {"trained": [n for n in groups.names if n in chosen],
                "frozen": [n for n in groups.names if n not in chosen],
                "trainable_parameters": trained, "total_parameters": groups.total,
                "share": trained / groups.total if groups.total else 0.0}

    def as_dict(self):
        return {"format": "adapeft.selection/1", "method": self.method, "budget": self.budget, "proven": self.proven,
                "names": list(self.names), "values": [float(v) for v in self.values],
                "counts": [int(c) for c in self.counts], "chosen": self.chosen, "value": self.value,
                "count": self.count, "notes": list(self.notes),
                "frontier": None if self.frontier is None else [
                    {"count": c, "value": v, "groups": [n for n, x in zip(self.names, m) if x], "how": label}
                    for (c, v, m), label in zip(self.frontier, self.labels)]}

    def save(self, path):
        with open(path, "w") as handle:
            json.dump(self.as_dict(), handle, indent=2)

    @classmethod
    def given(cls, names, groups):
        """A hand-made selection: the groups `names` of `groups` (a ParameterGroups), e.g. a standard PEFT
        recipe to train with AdaPEFT.train_selected."""
        unknown = [name for name in names if name not in groups.names]
        if unknown:
            raise ValueError(f"adapeft.Selection.given: no groups named {unknown}; groups are {groups.names}")
        return cls(groups.names, [0.0] * len(groups), groups.numel, np.array([n in names for n in groups.names]),
                   "given")

    @classmethod
    def load(cls, path):
        with open(path) as handle:
            data = json.load(handle)
        if data.get("format") != "adapeft.selection/1":
            raise ValueError(f"adapeft.Selection.load: {path} is not an adapeft selection")
        names = data["names"]
        frontier = labels = None
        if data["frontier"] is not None:
            frontier = [(p["count"], p["value"], np.array([n in p["groups"] for n in names])) for p in data["frontier"]]
            labels = [p["how"] for p in data["frontier"]]
        return cls(names=names, values=data["values"], counts=data["counts"],
                   mask=np.array([n in data["chosen"] for n in names]), method=data["method"], budget=data["budget"],
                   proven=data["proven"], frontier=frontier, labels=labels, notes=data.get("notes", []))


def _as_list(x, what):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    try:
        return list(np.asarray(x).reshape(-1).tolist())
    except (TypeError, ValueError) as error:
        raise TypeError(f"adapeft.select: {what} must be a sequence of numbers") from error


def capacity_of(budget, total):
    """floor(budget * total), exactly."""
    return int(math.floor(Fraction(budget) * total))


def select(prober_or_values=None, counts=None, *, values=None, budget=None, method="greedy", names=None,
           budgets=DEFAULT_BUDGETS, max_exact_groups=MAX_EXACT_GROUPS):
    """Choose groups to train (see the module docstring)."""
    from .probe import Prober
    if isinstance(prober_or_values, Prober):
        prober = prober_or_values
        counts = prober.groups.numel if counts is None else counts
        values = (prober.appi.cpu() * torch.tensor(counts, dtype=torch.float64)).tolist()
        names = prober.names if names is None else names
    elif prober_or_values is not None:
        if values is not None:
            raise TypeError("adapeft.select: give values either positionally or as values=, not both")
        values = prober_or_values
    if values is None or counts is None:
        raise TypeError("adapeft.select: give a Prober, or values= and counts=")
    values, counts = _as_list(values, "values"), _as_list(counts, "counts")
    k = len(values)
    if k == 0:
        raise ValueError("adapeft.select: there are no groups to choose from (K = 0)")
    if len(counts) != k:
        raise ValueError(f"adapeft.select: values has {k} groups but counts has {len(counts)}")
    names = [f"group{i}" for i in range(k)] if names is None else [str(n) for n in names]
    if len(names) != k or len(set(names)) != k:
        raise ValueError(f"adapeft.select: names must be {k} distinct strings")
    if method not in METHODS:
        raise ValueError(f"adapeft.select: method must be one of {METHODS}, got {method!r}")
    if budget is not None and (not isinstance(budget, (int, float)) or not 0 <= budget <= 1 or math.isnan(budget)):
        raise ValueError(f"adapeft.select: budget must be a share of the parameters in [0, 1], got {budget!r}")
    if method == "exact" and budget is None:
        raise ValueError("adapeft.select: method='exact' needs a budget")
    v = torch.tensor(values, dtype=torch.float64)
    c = torch.tensor(counts)
    if c.is_floating_point() and torch.isfinite(c).all() and torch.equal(c, c.round()):
        c = c.to(torch.int64)
    rank = torch.tensor(np.argsort(np.argsort(names, kind="stable"), kind="stable"), dtype=torch.int64)
    ops = _backend.call
    total = int(c.sum())

    if method == "greedy":
        order = ops("knapsack_greedy")(v, c, rank).tolist()
        frontier = _nested(order, values, counts, k)
        labels = ["greedy"] * len(frontier)
        return Selection(names, values, counts, _best_within(frontier, budget, total), method, budget,
                         frontier=frontier, labels=labels)

    if method == "exact":
        return _exact(ops, v, c, rank, capacity_of(budget, total), names, values, counts, budget)

    notes = []
    frontier = None
    if k <= min(max_exact_groups, 64):
        weights, _, masks = ops("knapsack_pareto")(v, c, rank, MAX_FRONTIER_POINTS)
        if weights.numel():
            frontier = [(int(w), _value_of(m, values), _bits_to_mask(int(m), k))
                        for w, m in zip(weights.tolist(), masks.tolist())]
            labels = ["exact"] * len(frontier)
        else:
            notes.append(f"the exact frontier has more than {MAX_FRONTIER_POINTS:,} points")
    else:
        notes.append(f"{k} groups is more than the {max_exact_groups} the exact frontier is computed for")
    if frontier is None:
        order = ops("knapsack_greedy")(v, c, rank).tolist()
        points = [(p, "greedy") for p in _nested(order, values, counts, k)]
        for share in budgets:
            found = _exact(ops, v, c, rank, capacity_of(share, total), names, values, counts, share)
            points.append(((found.count, found.value, found.mask),
                           f"exact@{share:g}" if found.proven else f"best@{share:g}"))
        points.sort(key=lambda item: (item[0][0], -item[0][1]))
        frontier, labels = [p for p, _ in points], [label for _, label in points]
        notes.append("frontier = the greedy nested sets (convex-hull guarantee) plus exact optima at the budgets")
    return Selection(names, values, counts, _best_within(frontier, budget, total), method, budget,
                     frontier=frontier, labels=labels, notes=notes,
                     proven=not any(label.startswith("best@") for label in labels))


def all_subsets(values, counts):
    """(parameters, loss reduction) of every subset of at most 24 groups, subset s at index s (bit i: group
    i): the cloud the paper's Figure 5 draws the frontier against."""
    v = torch.as_tensor(values, dtype=torch.float64)
    c = torch.as_tensor(counts).to(torch.int64)
    subset_counts, _ = _backend.call("knapsack_exhaustive")(v, c, torch.arange(v.numel()))
    bits = (torch.arange(1 << v.numel())[:, None] >> torch.arange(v.numel())) & 1
    return subset_counts.numpy(), (bits.double() @ v).numpy()


def _best_within(frontier, budget, total):
    """The frontier point with the most value within the budget, the fewest parameters among ties (no
    budget: the most value overall)."""
    capacity = total if budget is None else capacity_of(budget, total)
    return max((p for p in frontier if p[0] <= capacity), key=lambda p: (p[1], -p[0]))[2]


def _exact(ops, v, c, rank, capacity, names, values, counts, budget):
    mask, info = ops("knapsack_exact")(v, c, rank, capacity, MAX_EXACT_STATES)
    proven = bool(info[0])
    notes = [] if proven else ["the exact search stopped at its state limit; this is the greedy solution"]
    return Selection(names, values, counts, mask.numpy().astype(bool), "exact", budget, proven=proven, notes=notes)


def _nested(order, values, counts, k):
    """The K + 1 nested greedy sets, (count, value, mask), from the empty one."""
    mask = np.zeros(k, dtype=bool)
    points, count, value = [(0, 0.0, mask.copy())], 0, 0.0
    for i in order:
        mask[i] = True
        count += int(counts[i])
        value += float(values[i])
        points.append((count, value, mask.copy()))
    return points


def _bits_to_mask(bits, k):
    bits &= (1 << 64) - 1
    return np.array([bool(bits >> i & 1) for i in range(k)])


def _value_of(bits, values):
    return float(sum(v for i, v in enumerate(values) if (bits & ((1 << 64) - 1)) >> i & 1))
