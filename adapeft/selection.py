"""A choice of groups to train (`Selection`): what it holds, how it prints, saves, loads and applies to a model."""
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .groups import ParameterGroups


@dataclass
class Selection:
    """Which groups to train. `mask` has one bool per group in input order; `value` is the predicted loss
    reduction (sum of the chosen values), `count` the chosen parameters. For method="pareto", `frontier`
    is a list of (count, value, mask) sorted by count and `labels` says how each point was found. `horizon`: the
    training steps its values were taken at (adapeft.select's horizon=), or None for the paper's values. `signal`:
    "squared gradient" where its values are the training gradient's |g|^2 instead of the probe's (`adapeft select
    --values squared-gradient`), "given" where they were given to adapeft.select as values= rather than read from a
    Prober, or None. `granularity`: that of the groups it names (adapeft.group_parameters'; "layer/factors" for
    ParameterGroups.split_factors of "layer"), where known, so that the same groups can be made on another model."""

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
    horizon: float = None
    signal: str = None
    granularity: str = None

    @property
    def value(self):
        """The chosen values' exact sum, rounded once (inf past the largest double, as the ops give it)."""
        try:
            return math.fsum(v for v, m in zip(self.values, self.mask) if m)
        except OverflowError:
            return math.inf

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
        lines = [f"method {self.method}" + (f", budget {float(self.budget):.3%}" if self.budget is not None else
                                             ", no budget: the set of most value overall") +
                 ("" if self.proven else " (not proven optimal)"),
                 f"chosen: {', '.join(self.chosen) or '(none)'}; {self.count:,} of {self.total:,} parameters "
                 f"({self.share:.3%}), value {self.value:.4g} ({self._what_values_are()}; it ranks sets and is no loss "
                 "in nats)"]
        lines += [f"note: {note}" for note in self.notes]
        if self.frontier is not None:
            points = list(self.frontier)
            digits = _digits_to_tell_apart([value for _, value, _ in points])
            lines.append(f"{'parameters':>14} {'share':>8} {'value':>15}  {'how':14} groups")
            for (count, value, mask), label in zip(points, self.labels):
                groups = ", ".join(n for n, m in zip(self.names, mask) if m) or "(none)"
                lines.append(f"{count:14,d} {count / self.total:8.3%} {value:15.{digits}g}  {label:14} {groups}")
        return "\n".join(lines)

    __str__ = table

    def _what_values_are(self):
        if self.signal == "squared gradient":
            return "the training gradient's |g|^2 summed over the probe steps"
        if self.signal == "given":
            return "the values given to adapeft.select"
        if self.horizon is None:
            return "APPI x parameters: b^2/A summed over the probes"
        return (f"at a horizon of {self.horizon:g} steps: b^2/A times the share u(2 - u) that many steps of each "
                "probe's eta reach, summed over the probes")

    def apply(self, model, groups):
        """Make exactly the chosen groups trainable (requires_grad), freezing every other parameter of the model;
        returns a report. Every chosen group must be in the model and every group of the model in the selection;
        groups the selection leaves frozen may be absent (a merged model has no LoRA groups)."""
        if not isinstance(groups, ParameterGroups):
            raise TypeError("adapeft.Selection.apply: groups must come from adapeft.group_parameters(model)")
        missing = [n for n in self.chosen if n not in groups]
        extra = [n for n in groups.names if n not in self.names]
        if missing or extra:
            raise ValueError(f"adapeft.Selection.apply: the selection's groups do not match the model's: chosen but "
                             f"not in the model {missing}, in the model but not in the selection {extra}. Group the "
                             "model the same way (granularity, rules) as the one the selection was made on")
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for n in groups.names for p in groups.params(n)):
            raise ValueError("adapeft.Selection.apply: groups were made for another model")
        chosen = set(self.chosen)
        trainable = {id(p) for name in chosen for p in groups.params(name)}
        # Parameters in no group (peft's originals behind modules_to_save, inactive adapters) are frozen too.
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        trained = sum(n for name, n in zip(groups.names, groups.numel) if name in chosen)
        return {"trained": [n for n in groups.names if n in chosen],
                "frozen": [n for n in groups.names if n not in chosen],
                "trainable_parameters": trained, "total_parameters": groups.total,
                "share": trained / groups.total if groups.total else 0.0}

    def as_dict(self):
        budget = None if self.budget is None else float(self.budget)
        return {"format": "adapeft.selection/1", "method": self.method, "budget": budget, "proven": self.proven,
                "names": list(self.names), "values": [float(v) for v in self.values],
                "counts": [int(c) for c in self.counts], "chosen": self.chosen, "value": self.value,
                "count": self.count, "notes": list(self.notes), "horizon": self.horizon,
                "signal": self.signal, "granularity": self.granularity, "frontier": None if self.frontier is None else [
                    {"count": c, "value": v, "groups": [n for n, x in zip(self.names, m) if x], "how": label}
                    for (c, v, m), label in zip(self.frontier, self.labels)]}

    def save(self, path, **fields):
        """The selection as JSON; `fields` are written beside its own (`adapeft select` adds the peft LoRA
        configuration it derived) and read by nothing here."""
        with open(path, "w") as handle:
            json.dump({**self.as_dict(), **fields}, handle, indent=2)

    @classmethod
    def given(cls, names, groups):
        """A hand-made selection: the groups `names` of `groups` (a ParameterGroups), e.g. a standard PEFT
        recipe to train with AdaPEFT.train_selected."""
        unknown = [name for name in names if name not in groups.names]
        if unknown:
            raise ValueError(f"adapeft.Selection.given: no groups named {unknown}; groups are {groups.names}")
        return cls(groups.names, [0.0] * len(groups), groups.numel, np.array([n in names for n in groups.names]),
                   "given", granularity=groups.granularity)

    @classmethod
    def load(cls, path):
        """A selection saved by `save` (or by `adapeft select --out`)."""
        with open(path) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"adapeft.Selection.load: {path} is not JSON ({error.msg} at line {error.lineno}, "
                                 f"column {error.colno}); Selection.save and `adapeft select --out` write selections")
        if not isinstance(data, dict) or data.get("format") != "adapeft.selection/1":
            raise ValueError(f"adapeft.Selection.load: {path} is not an adapeft selection (its format is not "
                             "'adapeft.selection/1'); Selection.save and `adapeft select --out` write selections")
        missing = [key for key in ("names", "values", "counts", "chosen", "method", "budget", "proven", "frontier")
                   if key not in data]
        if missing:
            raise ValueError(f"adapeft.Selection.load: {path} lacks the fields {missing} of a selection")
        names = data["names"]
        frontier = labels = None
        if data["frontier"] is not None:
            frontier = [(p["count"], p["value"], np.array([n in p["groups"] for n in names])) for p in data["frontier"]]
            labels = [p["how"] for p in data["frontier"]]
        return cls(names=names, values=data["values"], counts=data["counts"],
                   mask=np.array([n in data["chosen"] for n in names]), method=data["method"], budget=data["budget"],
                   proven=data["proven"], frontier=frontier, labels=labels, notes=data.get("notes", []),
                   horizon=data.get("horizon"), signal=data.get("signal"), granularity=data.get("granularity"))


class Frontier(Sequence):
    """Points (count, value, mask) sorted by count. A mask may be stored as a size j, the first j groups of
    a greedy order, and is then built when read: the K + 1 nested sets of K groups take O(K) memory."""

    def __init__(self, points, nested=None):
        self._points = points
        self._nested = nested

    def __len__(self):
        return len(self._points)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        count, value, mask = self._points[index]
        return count, value, self._nested.mask(mask) if isinstance(mask, (int, np.integer)) else mask


def _digits_to_tell_apart(values, fewest=4):
    """Significant digits (fewest to 17) that print neighbouring values differently where they differ."""
    for digits in range(fewest, 17):
        if all(f"{a:.{digits}g}" != f"{b:.{digits}g}" for a, b in zip(values, values[1:]) if a != b):
            return digits
    return 17
