"""The probe's forward passes: each group's losses at its points and what its moves realized, measured with the
compiled moves (eagerly, or as what a CUDA graph captures: adapeft.probe.graph) or with the plain baseline; and
the exact slopes g.d from one backward pass."""
import contextlib
import math
import warnings

import torch

from ..ops import layout as L
from ..ops import reference
from ..upcast import float32_compute
from .distributed import reshard
from .points import COLUMNS, OUTER


class ProbeLoss:
    """loss_fn(model, batch) as the probe calls it: FSDP2's shards gathered afresh, the forward passes in float32
    where compute="float32", a failure named with the group that was moved, the result checked to be one
    floating element; `eps`: the eps of its dtype (0 until a loss was measured). `prefix`: an
    adapeft.probe.prefix.PrefixReuse, or None. `forward_passes` and `backward_passes`: how many losses it computed
    without autograd and with it (a CUDA graph's capture counts as passes, though it runs none)."""

    def __init__(self, model, loss_fn, compute, fsdp_modules, prefix=None):
        self.model, self.loss_fn, self.compute, self.fsdp_modules = model, loss_fn, compute, fsdp_modules
        self.prefix = prefix
        self.forward_passes = self.backward_passes = 0
        self.eps = 0.0
        self._said_coarse = False

    def __call__(self, batch, group):
        with self.prefix.around(group) if self.prefix is not None else contextlib.nullcontext():
            return self._value(batch, "on the unperturbed model" if group is None else
                               f"with group {group!r} perturbed")

    def prepare_prefix(self, batch):
        """Where the prefix reuse starts each group (once; adapeft.probe.prefix)."""
        if self.prefix is not None:
            self.prefix.prepare(lambda: self._value(batch, "on the unperturbed model"))

    def _value(self, batch, where):
        if torch.is_grad_enabled():
            self.backward_passes += 1
        else:
            self.forward_passes += 1
        reshard(self.fsdp_modules)
        try:
            with float32_compute(self.compute == "float32"):
                loss = self.loss_fn(self.model, batch)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            raise RuntimeError(f"adapeft.Prober.step: loss_fn(model, batch) failed {where}: {error!r}; the model "
                               "was left unchanged") from error
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            got = (type(loss).__name__ if not isinstance(loss, torch.Tensor) else
                   f"a {loss.dtype} tensor of shape {tuple(loss.shape)}")
            raise TypeError(f"adapeft.Prober.step: loss_fn must return a one-element floating tensor, got {got}")
        self.eps = torch.finfo(loss.dtype).eps
        if loss.dtype.itemsize < 4 and not self._said_coarse:
            # The fit runs in float64, but differences the loss's own rounding erased are not there to fit.
            self._said_coarse = True
            warnings.warn(f"adapeft.Prober: loss_fn returns a {loss.dtype} loss, which rounds away changes below "
                          f"{self.eps:.1g} of its value: more than a local probe step changes it, so b and A "
                          "are mostly rounding (at a fixed step b comes out 0). Return the loss in float32 "
                          "(cross_entropy(logits.float(), labels)); the model can stay in 16 bits.", UserWarning,
                          stacklevel=5)
        return loss.reshape(())


class Measurement:
    """The K x 5 losses of a probe (column 2 the unperturbed loss) and its K * 5 report rows (adapeft.REPORT_FIELDS),
    filled by measuring the inner points of every group, then, where `place_outer` is given (a callable run while
    every group is at its unperturbed values), placing the outer points from them, then the outer points (`rounds`:
    the points of each round, adapeft.probe.points.StepTable.rounds; a three-point probe has no outer ones)."""

    def __init__(self, names, loss, steps, device, rounds):
        self.names, self.loss, self.steps, self.rounds = names, loss, steps, rounds
        self.losses = torch.empty(len(names), 5, dtype=torch.float64, device=device)
        self.report = torch.zeros(len(names) * 5, len(L.REPORT_FIELDS), dtype=torch.float64, device=device)

    def _start(self, batch):
        self.losses.fill_(math.nan)
        self.report.zero_()
        self.losses[:, 2] = self.loss(batch, None)

    def _rounds(self, batch, place_outer):
        """The unperturbed loss, then the inner points to measure, then (placed) the outer ones."""
        self._start(batch)
        for points in self.rounds:
            if place_outer is not None and points is OUTER:
                place_outer()
            yield points

    def with_moves(self, batch, perturbations, place_outer=None):
        """With the compiled moves: each group's GroupPerturbation in `perturbations`, restored bit for bit."""
        for points in self._rounds(batch, place_outer):
            for k, name in enumerate(self.names):
                if name not in perturbations:
                    continue
                group = perturbations[name]
                with group:
                    for j in points:
                        group.move(j, self.report, 5 * k + COLUMNS[j])
                        self.losses[k, COLUMNS[j]] = self.loss(batch, name)

    def with_copies(self, batch, plans, place_outer=None):
        """The plain baseline: a saved copy per group, per-tensor loops, .item() per forward pass."""
        for points in self._rounds(batch, place_outer):
            for k, name in enumerate(self.names):
                if name in plans:
                    self._copies_of_group(batch, name, k, plans[name], points)

    def _copies_of_group(self, batch, name, k, plan, points):
        """Group k's losses and reports at `points` (indices into POINTS), from a saved copy it returns to."""
        rules = plan.direction_rules()
        saved = [p.detach().clone() for p in plan.params]
        try:
            for j in points:
                column = COLUMNS[j]
                moved, dot_step, dot_dir, changed = self._point(k, j, saved, rules)
                for p, w in zip(plan.params, moved):
                    p.copy_(w)
                self.losses[k, column] = self.loss(batch, name).item()
                row = self.report[5 * k + column]
                row[L.REPORT_STEP] = -dot_step.item() / dot_dir.item() if dot_dir.item() else math.nan
                row[L.REPORT_CHANGED] = changed.item()
        finally:
            for p, w0 in zip(plan.params, saved):
                p.copy_(w0)

    def _point(self, k, j, saved, rules):
        """Group k's weights at its point j (from its unperturbed ones, `saved`, in the arithmetic of the compiled
        moves), with d.(w - w0), d.d and the elements that changed, as float64 device tensors."""
        moved, dot_step, dot_dir, changed = [], 0, 0, 0
        for w0, rule in zip(saved, rules):
            eta = self.steps[k, j].to(rule.a.dtype)
            w = reference.step_away(w0.reshape(-1), eta * rule.a, rule.scale(eta)).view_as(w0)
            d64 = rule.full(w0.reshape(-1)).double().view_as(w0)
            dot_step = dot_step + (d64 * (w.double() - w0.double())).sum()
            dot_dir = dot_dir + (d64 * d64).sum()
            changed = changed + (reference.bits(w) != reference.bits(w0)).sum().double()
            moved.append(w)
        return moved, dot_step, dot_dir, changed

    def with_batched_points(self, batch, plans, place_outer=None):
        """Each group's points of a round in one forward pass: torch.func.vmap over the group's weights at those
        points, put in place of its parameters for the pass (the model itself is never moved). The weights are
        the compiled moves' bit for bit; the losses agree with sequential passes to rounding (a batched pass
        reduces in another order)."""
        names = {}
        for name, p in self.loss.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for points in self._rounds(batch, place_outer):
            for k, name in enumerate(self.names):
                if name in plans:
                    self._batched_group(batch, name, k, plans[name], points, names)

    def _batched_group(self, batch, name, k, plan, points, names):
        rules = plan.direction_rules()
        saved = [p.detach() for p in plan.params]
        at_points = [self._point(k, j, saved, rules) for j in points]
        stacked = [torch.stack(weights) for weights in zip(*(moved for moved, *_ in at_points))]
        keys = [(names[id(p)], i) for i, p in enumerate(plan.params)]

        def loss_at(*weights):
            substitutes = {key: weights[i] for keys_of_p, i in keys for key in keys_of_p}
            with torch.nn.utils.stateless._reparametrize_module(self.loss.model, substitutes):
                return self.loss(batch, name)

        losses = torch.func.vmap(loss_at, randomness="same")(*stacked)
        for j, loss, (_, dot_step, dot_dir, changed) in zip(points, losses, at_points):
            column = COLUMNS[j]
            self.losses[k, column] = loss
            row = self.report[5 * k + column]
            row[L.REPORT_STEP] = torch.where(dot_dir > 0, -dot_step / dot_dir, math.nan)
            row[L.REPORT_CHANGED] = changed


def exact_slopes(loss, batch, plans, names, out):
    """b_k = g.d_k for the groups in `plans` into `out` (nan for the others): g from one backward pass of the
    loss on the batch in the probe's mode, through torch.autograd.grad, so that no p.grad changes."""
    tensors = [p for plan in plans.values() for p in plan.params]
    frozen = [p for p in tensors if not p.requires_grad]  # a given direction may move a frozen tensor
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            value = loss(batch, None)
            if not value.requires_grad:
                raise RuntimeError("adapeft.Prober.step: slope='autograd' needs a loss_fn whose loss depends on "
                                   "the parameters through autograd (it returned a loss without a graph)")
            gradients = iter(torch.autograd.grad(value, tensors, allow_unused=True))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    out.fill_(math.nan)
    for k, name in enumerate(names):
        if name not in plans:
            continue
        plan = plans[name]
        # the optimizer's update, formed as the kernels form it
        rules = plan.direction_rules() if plan.hyper is not None else None
        total = torch.zeros((), dtype=torch.float64, device=out.device)
        for i, (p, d) in enumerate(zip(plan.params, plan.directions)):
            g = next(gradients)
            if g is None:
                continue  # the loss does not depend on p
            full = d if rules is None else rules[i].full(p.detach().view(-1))
            total += torch.dot(g.reshape(-1).double(), full.reshape(-1).double())
        out[k] = total
