"""Prefix reuse: a group whose parameters are all used from block l of the model's block stack onwards leaves the
blocks before l seeing what the unperturbed pass saw, so its perturbed passes start at block l from the output of
block l-1 that the unperturbed pass kept.

Which block each group is first used in is read once, from the order in which the modules owning its parameters
run in one forward pass (a tied embedding and head is used before block 0: such a group reuses nothing; a group
used only after the stack, a final norm or an untied head, recomputes no block). Before reusing anything the
probe checks, once, that the loss computed from a kept block output equals the full pass's bit for bit; where it
does not (a loss that reads every block's output, a residual added outside the blocks: anything that makes a
block's input more than the previous block's output) the probe warns and runs full passes. A skipped block's
`forward` is replaced for the pass (its module hooks still run, so FSDP2 gathers and frees its shards on every rank
alike).
"""
import contextlib
import math
import warnings

import torch

def block_stack(model):
    """The model's stack of blocks: the nn.ModuleList of at least two modules of one class that holds the most
    parameters, or None."""
    best, most = None, 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > most:
            best, most = list(module), size
    return best


def _nbytes(output):
    return sum(leaf.nbytes for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def kept_boundaries(starts, most):
    """The block boundaries whose outputs to keep, at most `most` of them, that skip the most blocks in all:
    group k skips up to the largest kept boundary at or below its start (its first block). Exact (dynamic
    programming over the distinct starts); of equal choices, one with the fewest boundaries."""
    candidates = sorted({s for s in starts if s > 0})
    if most >= len(candidates):
        return tuple(candidates)
    if most <= 0:
        return ()
    # at[i]: how many groups start at or past candidate i (they can all use boundary i)
    at = [sum(1 for s in starts if s >= c) for c in candidates]
    m = len(candidates)
    # best[j][i]: the most blocks skipped by j boundaries, the last at candidate i; boundary i serves the groups
    # from candidate i up to the next kept one, counted as candidates[i] * (at[i] - at[next]).
    # Counting it as candidates[i] * at[i] and subtracting candidates[prev] * at[i] gives the same sums.
    best = [[-math.inf] * m for _ in range(most + 1)]
    previous = [[None] * m for _ in range(most + 1)]
    for i in range(m):
        best[1][i] = candidates[i] * at[i]
    for j in range(2, most + 1):
        for i in range(m):
            for p in range(i):
                value = best[j - 1][p] + (candidates[i] - candidates[p]) * at[i]
                if value > best[j][i]:
                    best[j][i], previous[j][i] = value, p
    j, i = max(((j, i) for j in range(1, most + 1) for i in range(m)), key=lambda ji: (best[ji[0]][ji[1]], -ji[0]))
    chosen = []
    while i is not None:
        chosen.append(candidates[i])
        i, j = previous[j][i], j - 1
    return tuple(sorted(chosen))


class PrefixReuse:
    """The probe's prefix reuse for one model and its groups; `memory`: the most bytes of kept block outputs (None:
    no cap). After the first probe: `starts` (each group's first block), `kept` (the boundaries whose outputs are
    kept), `output_bytes` (one kept output), `nbytes` (all of them), `blocks` (the stack), `disabled` (why nothing is reused, or None)."""

    def __init__(self, model, groups, names, memory=None):
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory < 0):
            raise ValueError(f"adapeft.Prober: prefix_memory must be a number of bytes >= 0 or None, got {memory!r}")
        self.model, self.names, self.memory = model, list(names), memory
        self.blocks = block_stack(model)
        self.starts, self.kept, self.output_bytes, self.disabled = None, (), 0, None
        self._owners = {name: [] for name in self.names}
        params = {id(p): name for name in self.names for p in groups.params(name)}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and id(p) in params:
                    self._owners[params[id(p)]].append(module)
        self._outputs = {}
        if self.blocks is None:
            self._disable("the model has no stack of blocks (an nn.ModuleList of modules of one class)")

    @property
    def nbytes(self):
        """Bytes the kept block outputs take while a probe measures."""
        return len(self.kept) * self.output_bytes

    def block_share(self, plans=None):
        """The share of the blocks' work a probe's perturbed passes run, over that of full passes (1.0 without
        reuse): the mean over the probed groups of (blocks - skipped) / blocks."""
        names = [name for name in self.names if plans is None or name in plans]
        if self.disabled or not names:
            return 1.0
        total = len(self.blocks)
        return sum(total - self.boundary(name) for name in names) / (total * len(names))

    def boundary(self, name):
        """The block group `name`'s perturbed passes start at: the largest kept boundary at or below its first
        block (0: the whole pass, also where nothing is reused)."""
        if self.disabled or self.starts is None:
            return 0
        return max((b for b in self.kept if b <= self.starts[name]), default=0)

    def _disable(self, why):
        self.disabled = why
        self._outputs = {}
        warnings.warn(f"adapeft.Prober: reuse_prefix=True: {why}; probing with full forward passes",
                      UserWarning, stacklevel=5)

    def prepare(self, full_loss):
        """Once: where each group is first used and which outputs to keep, from a traced pass, and the check that a
        kept output reproduces the loss bit for bit. full_loss(): the loss on the probe's batch, unperturbed."""
        if self.starts is not None or self.disabled:
            return
        positions, order = self._traced(full_loss)
        total = len(self.blocks)
        if order != list(range(total)):
            self._disable(f"the blocks did not run once each in order (ran {order[:8]}{'...' if len(order) > 8 else ''})")
            return
        starts = {}
        for name in self.names:
            used = [positions.get(id(module)) for module in self._owners[name]]
            # A module that did not run may still be read elsewhere: its group reuses nothing.
            starts[name] = 0 if not used or None in used else min(used)
        deepest = max(starts.values(), default=0)
        if deepest == 0:
            self.starts, self.kept = starts, ()
            return
        reference = full_loss()
        self.starts, self.kept = starts, (deepest,)
        with self.recording():
            recorded = full_loss()
        self.output_bytes = _nbytes(self._outputs[deepest - 1])
        with self.skipping(deepest):
            reused = full_loss()
        self._outputs = {}
        same = [torch.equal(a, b) for a, b in ((recorded, reference), (reused, reference))]
        if not all(same):
            self._disable(f"the loss computed from block {deepest - 1}'s kept output ({reused.item()!r}) is not the "
                          f"full pass's ({reference.item()!r}){'' if same[0] else ' (nor are two full passes equal)'}"
                          ": the next block's input is more than this block's output (a residual added outside the "
                          "blocks, a loss that reads every block's output) or the forward is not deterministic")
            return
        most = len(starts) if self.memory is None else self.memory // max(self.output_bytes, 1)
        self.kept = kept_boundaries(list(starts.values()), most)

    def _traced(self, full_loss):
        """{id(module): the first block it ran in or before (outside the blocks: the number of blocks run so far)}
        for every module owning a group's parameters, and the order the blocks ran in."""
        state = {"block": None, "finished": 0}
        positions, order, handles = {}, [], []

        def enter(i):
            def hook(module, args):
                state["block"] = i
                order.append(i)
            return hook

        def leave(i):
            def hook(module, args, output):
                state["block"], state["finished"] = None, i + 1
            return hook

        def owner_ran(module, args):
            where = state["block"] if state["block"] is not None else state["finished"]
            positions[id(module)] = min(positions.get(id(module), where), where)

        try:
            for i, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(enter(i)))
                handles.append(block.register_forward_hook(leave(i)))
            for module in {id(m): m for owners in self._owners.values() for m in owners}.values():
                handles.append(module.register_forward_pre_hook(owner_ran))
            full_loss()
        finally:
            for handle in handles:
                handle.remove()
        return positions, order

    @contextlib.contextmanager
    def around(self, group):
        """Around one loss computation: the unperturbed pass (group None, no autograd) keeps the boundaries'
        outputs; group `group`'s pass starts from its boundary's kept output."""
        if self.disabled or self.starts is None or not self.kept:
            yield
        elif group is None:
            if torch.is_grad_enabled():
                yield
            else:
                with self.recording():
                    yield
        else:
            boundary = self.boundary(group)
            if boundary == 0 or boundary - 1 not in self._outputs:
                yield
            else:
                with self.skipping(boundary):
                    yield

    def release(self):
        """Drop the kept outputs (at the end of a probe)."""
        self._outputs = {}

    @contextlib.contextmanager
    def recording(self):
        """While inside, the forward passes keep the outputs of the blocks before the kept boundaries."""
        self._outputs = {}

        def keeper(i):
            def hook(module, args, output):
                self._outputs[i] = output
            return hook

        handles = [self.blocks[b - 1].register_forward_hook(keeper(b - 1)) for b in self.kept]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def skipping(self, boundary):
        """While inside, blocks 0 .. boundary-1 return block boundary-1's output kept by `recording` without
        computing (the boundary one of `kept`)."""
        kept = self._outputs[boundary - 1]
        skipped = self.blocks[:boundary]
        own = [block.__dict__.get("forward") for block in skipped]  # a wrapper's instance forward (accelerate)
        try:
            for block in skipped:
                block.forward = lambda *args, **kwargs: kept
            yield
        finally:
            for block, forward in zip(skipped, own):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
