"""The Hessian-informed probe (the paper's Algorithm 1), step by step: plan each group's move, measure its losses
at its points, fit, and keep what the fit says.

The pieces: plan (what moves, along which direction), points (each group's steps), ledgers (the moves' shared
ledgers), measure and graph (the forward passes), assess (fit, noise, verdicts), distributed (rank agreement),
guards (everything comes back as it was), rates (eta* applied as learning rates), result (ProbeResult).
"""
import math
import numbers
import warnings

import torch

from ..ops import layout as L
from .. import steps as step_rules
from ..groups import ParameterGroups, group_parameters
from ..optim import check_supported
from . import distributed
from .assess import Assessor, verdicts
from .feedback import LastProbe
from .graph import GraphedMeasurement
from .guards import check_eta, full_float32_precision, model_untouched
from .ledgers import SharedLedgers
from .measure import Measurement, ProbeLoss, exact_slopes
from .plan import Notes, plan_group
from .points import POINT_COUNTS, StepTable
from .prefix import PrefixReuse
from .rates import LearningRates
from .result import ProbeResult

BACKENDS = ("compiled", "torch", "batched")
R2_THRESHOLD = 0.99  # the paper's fit filter
SLOPES = ("fit", "autograd")
COMPUTES = ("model", "float32")


class Prober:
    """Per-group probe of a model: `step(batch, eta)` measures every group's loss reduction and learning rate.

    model: the torch.nn.Module; groups: a ParameterGroups (default `group_parameters(model)`);
    loss_fn(model, batch) -> 0-dim tensor, run under torch.no_grad() in eval mode, with float32 matrix products
    and convolutions at full precision (no TF32) whatever the process set for training.
    direction: "grad" (the gradients in p.grad, the paper's choice), "optimizer" (the update `optimizer`
    would apply next, per unit of learning rate, read from its state without stepping it: eta* is then a
    learning rate for that optimizer), a dict {group name: list of tensors} or a callable
    (group name, params) -> list of tensors or None. backend: "compiled" (the adapeft ops)
    or "torch" (a plain implementation: per-tensor loops, a saved copy per group, .item() per forward, a
    numpy fit; the baseline the ops are measured against) or "batched" (each group's points of a round in one
    forward pass through torch.func.vmap, the group's weights at those points put in place of its parameters
    for the pass and the model never moved: on 2 CPU cores 0.49-0.72 of the sequential passes' time,
    benchmarks/bench_batching.py; the weights are the compiled moves' bit for bit, the losses agree with
    sequential passes to rounding, not bit for bit; a batched pass counts as one forward pass; eager only, one
    process, no prefix reuse). r2_threshold: the fit filter.
    require_resolved: accept a fit only where it is `resolved` (see ProbeResult): the loss's noise leaves A
    known to within adapeft.steps.RESOLVED_SHARE (10%) of itself. Off by default, the paper's filter.
    step_policy: "adaptive" (default) probes each group at a step of its own, t_k, chosen on the device from
    its last fit so that its curvature is resolved while the step stays local (adapeft.steps): `eta` is then
    where every group starts and the least step it is probed at (unless the parabola fails to fit), and a
    group's first probe starts with two rounds of 4 forward passes that only choose its step. "fixed": every
    group at eta, as in the paper (in float32 at learning-rate-sized steps small groups are then often not
    resolved: b is, A is rounding noise, and so is APPI ~ b^2 / A). step_range: (low, high), the bounds of
    every step in units of eta.
    slope: "fit" (default): b is the slope of the five points' least squares; "autograd": b = g.d exactly,
    with g the gradient of loss_fn on the probe batch in the probe's own mode (eval: no dropout), from one
    extra forward and backward pass per probe (p.grad is left alone), and A and R^2 are fitted through that
    slope; ProbeResult.slope_error then says how far the five points' own slope is from it. The training
    gradient, taken in train mode with dropout, can differ from the probe's several times (the demo's
    lora_B at its first probe: 0.03 against 0.21), so with direction="grad" b is not |p.grad|^2. With
    direction="optimizer" the update is formed once more for the product, which waits for the device.
    compute: "model" (default): loss_fn runs as the model computes; "float32": the forward passes of a bfloat16
    or float16 model compute in float32, op by op, each weight converted as it is used (adapeft.upcast; no
    float32 copy of the model): the same losses as the model stored in float32 would give, bit for bit, so
    that the loss's noise is float32's rounding rather than the 16-bit forward's (ProbeResult.noise says
    which). The weights stay 16-bit, and so do the probe's moves.
    cuda_graph: on CUDA, capture the measurement (the 4K+1 forward passes with every move and restore) as
    one CUDA graph and replay it at later steps; in-place moves keep every address fixed, which is what
    makes this possible. The batch is copied into static buffers, so its tensors must be on the model's
    device with the same shapes from step to step (a new shape, new directions or a ledger that had to
    grow mean a new capture); loss_fn must be capturable (no host synchronisation, no Python-side
    state that changes between steps). When capture fails the probe warns once and stays eager.
    process_group: under torch.distributed each rank measures the losses on its own batch and one
    all-reduce averages the K x 5 losses, so that every rank fits the global batch's numbers and ends with
    the same b, A, APPI and selection. With FSDP2 (fully_shard: DTensor parameters) each rank moves only
    its own shards, and the same collective sums what the moves measured (realized steps, changed
    elements), so group sizes and fits are global. "auto": the model's group under
    DistributedDataParallel or FSDP2; None: no collective; or a ProcessGroup.
    points: 5 (default), the paper's five points; 3: with slope="autograd" (b exact), A from the inner points
    +-t_k alone, 2K+1 forward passes and one backward pass a probe instead of 4K+1 forward passes (and the
    outer points are not placed: ProbeResult's losses and steps in columns 0 and 4 are nan). R^2 then has one
    degree of freedom: how far the two points' own slope is from the exact one (a cubic term); the noise is
    sampled from that residual, and a quartic term, which five points see, goes unseen.
    reuse_prefix: start each group's perturbed passes at the first block of the model's block stack that uses
    its parameters, from that block's input as the unperturbed pass computed it (adapeft.probe.prefix): the
    same losses bit for bit, checked once at the first probe (where they are not, the probe warns and runs full
    passes); with cuda_graph=True the unperturbed pass that keeps them is replayed too. prefix_memory: the most bytes the kept block outputs may take (None: one per distinct first block);
    `prober.prefix` reports what was kept and the share of the blocks' work the probe still runs.

    (Longer than the project's other classes: it is the loop of Algorithm 1 with every option checked and the
    state kept between probes; each step of the loop lives in a module of adapeft.probe.)
    """

    def __init__(self, model, groups=None, loss_fn=None, *, direction="grad", optimizer=None, backend="compiled",
                 r2_threshold=R2_THRESHOLD, apply_lr=False, lr_ema=0.9, lr_clip=(0.5, 2.0), schedule=None, history=True,
                 cuda_graph=False, process_group="auto", require_resolved=False, step_policy="adaptive",
                 step_range=step_rules.DEFAULT_RANGE, slope="fit", compute="model", points=5, reuse_prefix=False,
                 prefix_memory=None):
        groups = _checked_groups(model, groups, loss_fn)
        _check_options(backend, direction, optimizer, step_policy, step_range, slope, compute, cuda_graph, points)
        if direction == "optimizer":
            _check_optimizer_holds(optimizer, groups)
        if schedule is not None and not callable(schedule):  # an interval failed at the first schedule(step)
            raise TypeError("adapeft.Prober: schedule must be a callable training step -> bool such as "
                            f"adapeft.ProbeSchedule(len(groups), interval=...), got {type(schedule).__name__} "
                            f"{schedule!r}")
        devices = {p.device for name in groups.names for p in groups.params(name)}
        if len(devices) != 1:
            raise ValueError(f"adapeft.Prober: the model's parameters are on several devices {sorted(map(str, devices))}"
                             "; the probe needs them on one")
        self.process_group, self._sharded = distributed.process_group_for(model, groups, process_group, direction)
        if cuda_graph and self.process_group is not None:
            raise ValueError("adapeft.Prober: cuda_graph=True is not supported with a process group yet (the "
                             "model's own collectives would be captured)")
        if slope == "autograd" and self.process_group is not None:
            raise ValueError("adapeft.Prober: slope='autograd' is not supported with a process group yet (the probe's "
                             "backward pass would run outside DDP's and FSDP's gradient reduction)")
        self.model, self.groups, self.loss_fn = model, groups, loss_fn
        self.direction, self.optimizer, self.backend, self.r2_threshold = direction, optimizer, backend, r2_threshold
        self.device = devices.pop()
        self.names = list(groups.names)
        self.schedule = schedule if schedule is not None else ProbeSchedule(len(self.names))
        self._rates = LearningRates(optimizer, direction, self.names, groups, lr_ema, lr_clip) if apply_lr else None
        k = len(self.names)
        self.appi = torch.zeros(k, dtype=torch.float64, device=self.device)
        # eta* of each group at the last probe that accepted it (nan until one does)
        self.last_eta_star = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)
        # eta* over the eta of that probe: how many steps of the probes' size reach it
        self.last_eta_star_steps = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)
        self.history = [] if history else None  # PPI of every probe
        self.results = [] if history else None  # the ProbeResult of every probe
        self.require_resolved = bool(require_resolved)
        self.step_policy, self.slope, self.compute = step_policy, slope, compute
        self.points = points
        self._points = StepTable(k, step_policy, step_range, self.device, points)
        self.step_range = self._points.range
        self._exact_slope = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)  # g.d per group
        self._fsdp_modules = distributed.fsdp_modules(model) if self._sharded else []
        if backend == "batched" and (reuse_prefix or self.process_group is not None):
            raise ValueError("adapeft.Prober: backend='batched' runs alone: not with reuse_prefix=True nor with a "
                             "process group (DDP, FSDP2)")
        if prefix_memory is not None and not reuse_prefix:
            raise ValueError("adapeft.Prober: prefix_memory caps what reuse_prefix=True keeps; it needs reuse_prefix=True")
        self.prefix = PrefixReuse(model, groups, self.names, prefix_memory) if reuse_prefix else None
        self._loss = ProbeLoss(model, loss_fn, compute, self._fsdp_modules, self.prefix)
        self._measurement = Measurement(self.names, self._loss, self._points.table, self.device, self._points.rounds)
        self._assess = Assessor(self.names, backend, slope, r2_threshold, self.device)
        self._ledgers = SharedLedgers(self.device)
        self._last_probe = LastProbe(self._ledgers, step_policy)
        self._notes = Notes()
        self._graph = GraphedMeasurement(self.device, lambda: self._loss.forward_passes) \
            if cuda_graph and self.device.type == "cuda" else None
        if cuda_graph and self._graph is None:
            warnings.warn(f"adapeft.Prober: cuda_graph=True has no effect on {self.device}; probing eagerly",
                          UserWarning, stacklevel=2)

    @property
    def noise(self):
        """The loss's noise, a standard deviation (a 0-dim device tensor; nan until measured)."""
        return self._assess.noise.value

    @property
    def graph_captures(self):
        """How many times the measurement was captured as a CUDA graph (0 without cuda_graph=True or on CPU)."""
        return self._graph.captures if self._graph is not None else 0

    @property
    def graph_disabled(self):
        """Why cuda_graph=True fell back to eager probing, or None."""
        return self._graph.disabled if self._graph is not None else None

    @property
    def forward_passes(self):
        """The forward passes (without autograd) this prober's probes ran, replays of a CUDA graph included."""
        return self._loss.forward_passes + (self._graph.uncounted_passes if self._graph is not None else 0)

    @property
    def backward_passes(self):
        """The forward and backward passes of exact slopes (slope="autograd") its probes ran."""
        return self._loss.backward_passes

    @property
    def ledger_bytes(self):
        """Device memory the moves' shared ledgers take."""
        return self._ledgers.nbytes

    def perturbation(self, name):
        """Group `name`'s GroupPerturbation, kept from probe to probe (None before its first compiled probe)."""
        return self._ledgers.perturbations.get(name)

    def maybe_step(self, training_step, batch, eta):
        """`step(batch, eta)` when the schedule says this training step is due, else None."""
        return self.step(batch, eta) if self.schedule(training_step) else None

    def step(self, batch, eta):
        """Probe every group at {-s_k,-1,1,s_k}*t_k around the current weights (t_k from eta, s_k from the inner
        points: see step_policy); returns a ProbeResult."""
        eta = check_eta(eta)
        self._last_probe.learn(stacklevel=2)
        plans = {}
        for name in self.names:
            plan = plan_group(name, self.groups.params(name), self.direction, self.optimizer, self._sharded,
                              self._notes)
            if plan is not None:
                plans[name] = plan
        self._notes.say(stacklevel=2)
        if not plans:
            raise RuntimeError("adapeft.Prober.step: no group has a direction; call loss.backward() before step() "
                               "or give directions")
        # One walk over the modules a step: a graphed probe's replay waits for this host work.
        modules = list(self.model.modules())
        low, high, new = self._points.begin(eta, plans)
        with torch.no_grad(), model_untouched(self.model, modules, self.device), full_float32_precision():
            try:
                self._loss.prepare_prefix(batch)
                if self.slope == "autograd":
                    exact_slopes(self._loss, batch, plans, self.names, self._exact_slope)
                perturbations = self._ledgers.perturbations_for(plans, self.names, self._points.table) \
                    if self.backend == "compiled" else None
                bracketed = {name: plans[name] for name in new}
                for round_ in range(step_rules.BRACKET_ROUNDS if new else 0):
                    # Groups never probed: rounds from eta bracket their curvature, and the probe proper runs at
                    # the steps they choose. The first round, at eta, also samples the loss's noise.
                    self._points.write()
                    self._measure(batch, bracketed, perturbations, place_outer=False)
                    self._agree(bracketed)
                    found = self._assess(self._measurement, bracketed, self._points, eta, self._loss.eps,
                                         self._exact_slope, sample_noise=round_ == 0)
                    self._points.adapt(found, eta, low, high, self.r2_threshold, step_rules.BRACKET_MOST_CHANGE)
                self._points.write()  # outside any captured graph: a replay reads the steps from this table
                measure = lambda on: self._measure(on, plans, perturbations, self._points.places_outer)  # noqa: E731
                if self._graph is None or not self._graph.run(batch, perturbations, modules, measure):
                    measure(batch)
            finally:
                distributed.reshard(self._fsdp_modules)  # the next forward gathers the restored shards
                if self.prefix is not None:
                    self.prefix.release()
        self._agree(plans)
        self._points.started.update(plans)
        return self._finish(plans, eta, low, high)

    def _measure(self, batch, plans, perturbations, place_outer):
        place = self._place_outer_points if place_outer else None
        if self.backend == "torch":
            self._measurement.with_copies(batch, plans, place)
        elif self.backend == "batched":
            self._measurement.with_batched_points(batch, plans, place)
        else:
            self._measurement.with_moves(batch, {name: perturbations[name] for name in plans}, place)

    def _place_outer_points(self):
        """The outer points from the inner ones, from the losses' mean over the ranks (every rank moves alike)."""
        inner = self._measurement.losses
        if self.process_group is not None:
            inner = distributed.mean_over_ranks(inner, self.process_group)
        self._points.place_outer(inner, self._loss.eps, self.noise)

    def _agree(self, plans):
        if self.process_group is not None:
            distributed.agree(self._measurement.losses, self._measurement.report, plans, self.names,
                              self.process_group, self._sharded)

    def _finish(self, plans, eta, low, high):
        found = self._assess(self._measurement, plans, self._points, eta, self._loss.eps, self._exact_slope,
                             sample_noise=self.step_policy == "fixed")
        fit, reliable, resolved, probed = found.fit, found.reliable, found.resolved, found.probed
        scale = self._points.scale.clone()
        accepted = fit.accepted & reliable & (resolved if self.require_resolved else True)
        verdict = verdicts(found, accepted, self.r2_threshold)
        ppi = torch.where(accepted, fit.ppi, torch.zeros_like(fit.ppi))
        eta_star = torch.where(accepted, fit.eta_star, torch.full_like(fit.eta_star, math.nan))
        self.appi += ppi
        self.last_eta_star = torch.where(accepted, eta_star, self.last_eta_star)
        self.last_eta_star_steps = torch.where(accepted, eta_star / eta, self.last_eta_star_steps)
        if self.history is not None:
            self.history.append(ppi.clone())
        if self.step_policy == "adaptive":
            self._points.adapt(found, eta, low, high, self.r2_threshold)
        growth = (self._points.scale / scale).clamp(min=1.0)  # the steps the next probe starts from, over these
        self._last_probe.remember(found.at_points[:, :, L.REPORT_SAVED].amax(1), found.unmoved, verdict, growth,
                                  self.names)
        slope_error = (found.b_fit - fit.b) / fit.b.abs() if self.slope == "autograd" else \
            torch.full_like(fit.b, math.nan)
        result = ProbeResult(names=list(self.names), b=fit.b, A=fit.A, r2=fit.r2, accepted=accepted, ppi=ppi,
                             eta_star=eta_star, reliable=reliable, resolved=resolved, probed=probed.clone(),
                             losses=self._measurement.losses.clone(), steps=self._reported_steps(found),
                             changed=found.report[:, :, L.REPORT_CHANGED].clone(), scale=scale, verdict=verdict,
                             eta=eta, b_fit=found.b_fit, slope_error=slope_error, noise=self.noise.clone(),
                             resolution=found.rounding[0].clone(), b_error=found.errors.b_bound,
                             A_error=found.errors.A_bound)
        if self._rates is not None:
            self._rates.apply(result)
        if self.results is not None:
            self.results.append(result)
        if self.device.type != "cuda":
            self._last_probe.learn(stacklevel=3)
        return result

    def _reported_steps(self, found):
        """The realized steps, K x 5 (nan where a three-point probe measured nothing)."""
        steps = found.report[:, :, L.REPORT_STEP].clone()
        if self.points == 3:
            steps[:, 0], steps[:, 4] = math.nan, math.nan
        return steps

    def flush(self):
        """Wait for the last probe and emit its warnings now (a host synchronisation on CUDA)."""
        self._last_probe.wait()
        self._last_probe.learn(stacklevel=2)


def _checked_groups(model, groups, loss_fn):
    """The groups to probe (by default group_parameters(model)), checked with the model and loss_fn."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"adapeft.Prober: model must be a torch.nn.Module, got {type(model).__name__}")
    if groups is None:
        groups = group_parameters(model)
    if not isinstance(groups, ParameterGroups):
        raise TypeError("adapeft.Prober: groups must come from adapeft.group_parameters(model), got "
                        f"{type(groups).__name__}")
    if not callable(loss_fn):
        raise TypeError("adapeft.Prober: loss_fn must be a callable loss_fn(model, batch) -> 0-dim tensor")
    own = {id(p) for p in model.parameters()}
    foreign = [name for name in groups.names if any(id(p) not in own for p in groups.params(name))]
    if foreign:
        raise ValueError(f"adapeft.Prober: groups {foreign} hold parameters that are not this model's; build "
                         "them with adapeft.group_parameters(model)")
    return groups


def _check_options(backend, direction, optimizer, step_policy, step_range, slope, compute, cuda_graph, points):
    if backend not in BACKENDS:
        raise ValueError(f"adapeft.Prober: backend must be one of {BACKENDS}, got {backend!r}")
    if not (direction in ("grad", "optimizer") or isinstance(direction, dict) or callable(direction)):
        raise ValueError("adapeft.Prober: direction must be 'grad', 'optimizer', a dict {group: tensors} or a "
                         f"callable (group, params) -> tensors, got {direction!r}")
    if step_policy not in step_rules.POLICIES:
        raise ValueError(f"adapeft.Prober: step_policy must be one of {step_rules.POLICIES}, got {step_policy!r}")
    if not (isinstance(step_range, (tuple, list)) and len(step_range) == 2 and
            all(isinstance(v, numbers.Real) and math.isfinite(v) for v in step_range) and
            0 < step_range[0] <= 1 <= step_range[1]):
        raise ValueError(f"adapeft.Prober: step_range must be (low, high) with 0 < low <= 1 <= high, got "
                         f"{step_range!r}")
    if slope not in SLOPES:
        raise ValueError(f"adapeft.Prober: slope must be one of {SLOPES}, got {slope!r}")
    if compute not in COMPUTES:
        raise ValueError(f"adapeft.Prober: compute must be one of {COMPUTES}, got {compute!r}")
    if cuda_graph and backend != "compiled":
        raise ValueError("adapeft.Prober: cuda_graph=True needs backend='compiled'")
    if isinstance(points, bool) or points not in POINT_COUNTS:
        raise ValueError(f"adapeft.Prober: points must be one of {POINT_COUNTS}, got {points!r}")
    if points == 3 and slope != "autograd":
        raise ValueError("adapeft.Prober: points=3 needs slope='autograd': three points fit A only through the exact "
                         "slope")
    if direction == "optimizer" and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("adapeft.Prober: direction='optimizer' needs the optimizer (optimizer=...)")


def _check_optimizer_holds(optimizer, groups):
    """Along an optimizer's update every tensor the probe moves must be one the optimizer steps: one it does not
    hold (a model trained in part, with the rest still requiring gradients) has no update to probe."""
    check_supported(optimizer, "adapeft.Prober")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [tensor for name in groups.names for tensor, p in zip(groups.tensor_names(name), groups.params(name))
               if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(f"adapeft.Prober: optimizer does not update {len(missing)} parameters that the groups hold "
                         f"and that require gradients ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
                         "; give them to the optimizer, or freeze them (requires_grad_(False)): the probe skips frozen "
                         "tensors")


class ProbeSchedule:
    """When to probe (lazy updating): every `interval` training steps from `start` until `stop`.

    A probe costs 4K+1 forward passes for K groups; the paper probes every 4K steps (the default), which
    adds about one forward pass per training step on average.
    """

    def __init__(self, num_groups, interval=None, start=0, stop=None):
        self.interval = int(interval) if interval is not None else 4 * num_groups
        if self.interval < 1:
            raise ValueError(f"adapeft.ProbeSchedule: interval must be at least 1, got {interval}")
        self.num_groups, self.start, self.stop = num_groups, start, stop

    def __call__(self, training_step):
        if training_step < self.start or (self.stop is not None and training_step >= self.stop):
            return False
        return (training_step - self.start) % self.interval == 0

    @property
    def forward_passes_per_step(self):
        return (4 * self.num_groups + 1) / self.interval


def param_groups(groups, names=None, **options):
    """Optimizer parameter groups, one per adapeft group (named under "adapeft_group"), so that the probe
    can set per-group learning rates: `torch.optim.AdamW(adapeft.param_groups(groups, lr=1e-4))`."""
    return [{"params": groups.params(name), "adapeft_group": name, **options} for name in (names or groups.names)]


def probe(model, batch, loss_fn, eta, groups=None, **options):
    """One probe step without keeping a Prober: the same result as `Prober(model, groups, loss_fn,
    **options).step(batch, eta)`."""
    return Prober(model, groups, loss_fn, **options).step(batch, eta)
