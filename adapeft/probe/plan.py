"""What the probe moves in each group at a step: the tensors that can move, their directions and how the moves
form the direction from them."""
import warnings
from dataclasses import dataclass

import torch

from .. import ops
from ..ops import reference
from ..optim import optimizer_direction
from .distributed import local


@dataclass
class GroupPlan:
    """One group as the probe moves it. params: the tensors that can move (this rank's shards under FSDP2);
    directions: one per tensor; states, layout, hyper: where the moves form the direction from an optimizer's
    state (direction="optimizer", see adapeft.optimizer_direction), else empty and None; numel: the elements
    the group moves over all ranks."""

    params: list
    directions: list
    states: list
    layout: list
    hyper: torch.Tensor
    numel: int

    def fingerprint(self):
        return ops.group_fingerprint(self.params, self.directions, self.states, self.layout)

    def direction_rules(self):
        """Each tensor's direction as the moves form it (adapeft.ops.reference.DirectionRule)."""
        return reference.direction_rules(self.params, self.directions, self.states, self.layout, self.hyper)


class Notes:
    """Warnings said once per prober and group, gathered into one warning per cause (a peft model freezes most
    groups at once)."""

    def __init__(self):
        self._said = set()
        self._unsaid = {}  # cause: [what it is for each group]

    def add(self, cause, name, detail):
        if (name, detail) not in self._said:
            self._said.add((name, detail))
            self._unsaid.setdefault(cause, []).append(f"group {name!r}: {detail}")

    def say(self, stacklevel):
        for cause, details in self._unsaid.items():
            warnings.warn(f"adapeft.Prober: {cause}: {'; '.join(details)}", UserWarning, stacklevel=stacklevel + 1)
        self._unsaid.clear()


def plan_group(name, params, direction, optimizer, sharded, notes):
    """The GroupPlan of group `name` (its tensors `params`) for the prober's `direction`, or None to skip it."""
    if direction in ("grad", "optimizer"):
        pairs = [(p, p.grad) for p in params if p.requires_grad and p.grad is not None]
        if len(pairs) < len(params):
            notes.add("tensors without a gradient (frozen or unused) are not probed", name,
                      f"{len(params) - len(pairs)} of its {len(params)} tensors have no gradient")
        if not pairs:
            return None
        moving = [p for p, _ in pairs]
        numel = sum(p.numel() for p in moving)
        if direction == "optimizer":
            found = optimizer_direction(optimizer, moving)
            return GroupPlan(moving, found.directions, found.states, found.layout, found.hyper, numel)
        if not sharded:
            return GroupPlan(moving, [d for _, d in pairs], [], [], None, numel)
        return GroupPlan([local(p) for p in moving], [local(d) for _, d in pairs], [], [], None, numel)
    given = direction.get(name) if isinstance(direction, dict) else direction(name, params)
    if given is None:
        notes.add("groups without a direction are not probed", name, "no direction was given for it")
        return None
    given = list(given)
    if len(given) != len(params):
        raise ValueError(f"adapeft.Prober: direction for group {name!r} has {len(given)} tensors but the group "
                         f"has {len(params)}")
    return GroupPlan([local(p) for p in params], [local(d) for d in given], [], [], None,
                     sum(p.numel() for p in params))
