"""The Hessian-informed probe (the paper's Algorithm 1): per group, the loss reduction and learning rate.

Call `Prober.step(batch, eta)` after `backward()` and before `optimizer.step()`. For every group k alone
the model is moved in place to w - x * d_k for x in {-s_k,-1,1,s_k}*t_k, the loss is measured, and the group
is restored bit for bit (t_k: each group's own step, from eta, chosen to resolve its curvature; s_k: 2, or
further out where the inner points show the curvature too small to resolve at 2 t_k; see adapeft.steps, or
step_policy="fixed" for the paper's {-2,-1,1,2}*eta); one fused fit turns the K x 5 losses into b ~ G.d, A ~ d.H.d, R^2,
PPI = b^2/(A n) and eta* = b/A, accumulating PPI into APPI. On CUDA nothing in `step()` waits for the
device (the user's loss_fn aside), and the model, its gradients, buffers, training modes, the optimizer
and the RNG are left exactly as they were, also when loss_fn raises or the user presses Ctrl-C.
"""
import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import _layout as L
from . import ops, reference
from . import steps as step_rules
from .groups import ParameterGroups, group_parameters
from .optim import optimizer_direction
from .perturb import GroupPerturbation
from .upcast import float32_compute

POINTS = (-2.0, -1.0, 1.0, 2.0)
COLUMNS = (0, 1, 3, 4)  # where the four perturbed points sit in a row of five; column 2 is the base loss
# The points in the order they are measured: the inner ones first, from which the outer ones may be placed
# (adapeft.steps.outer_ratio).
INNER, OUTER = (1, 2), (0, 3)
BACKENDS = ("compiled", "torch")
SLOPES = ("fit", "autograd")
COMPUTES = ("model", "float32")
# Ledger room the prober starts with, as a share of the largest group; it grows when a probe needs more.
CAPACITY_FRACTION = 1 / 64
MIN_CAPACITY = 4096
RELIABLE_CHANGED_SHARE = 0.5
# ... or the realized step along the direction (weighted by d^2, so elements whose direction is zero, such as
# an embedding's unused rows, count for nothing) within this share of the nominal one at every point.
RELIABLE_STEP_TOLERANCE = 0.1
# Why a group's fit was kept or not, the first that applies (ProbeResult.verdict holds the index). Up to
# "unresolved" the probe could not measure the group this time, which is no evidence against it; from "b <= 0"
# on, it measured a reason.
VERDICTS = ("accepted", "not probed", "zero direction", "non-finite", "ledger full", "did not move", "unresolved",
            "b <= 0", "A <= 0", "R^2")
VERDICT = {name: code for code, name in enumerate(VERDICTS)}
# What the warnings say of the groups a probe could not measure, once a group and cause.
UNMEASURED = {
    "zero direction": "the direction is exactly zero (a gradient that is zero this step, as lora_A's while "
                      "lora_B is 0); such a probe is no evidence against the group, and its next one may measure it",
    "non-finite": "a loss, a direction element or the fit is not finite; the fit is not used",
    "did not move": "most of their elements did not change at some probe point: the step is below the "
                    "resolution of the group's dtype",
    "ledger full": "some chunks stayed unmoved because the ledger was full; it grows for the next probe",
}
FIELD = {name: i for i, name in enumerate(L.REPORT_FIELDS)}


@dataclass
class ProbeResult:
    """One probe step, per group in `names` order (device tensors; reading them is the caller's sync).

    b, A, r2, ppi, eta_star: float64; accepted: the fit passed b > 0, A > 0, R^2 > threshold and was
    reliable (and resolved, with Prober(require_resolved=True)); reliable: at every point most elements
    really moved or the realized step along the direction is within 10% of the nominal one (a direction
    that is zero on most elements, as an embedding's gradient is, moves few), and no chunk was left unmoved;
    resolved: the loss's noise moves A by at most adapeft.steps.RESOLVED_SHARE (10%) of |A|, whatever the sign
    of A (a resolved A < 0 is a measured non-convexity): at symmetric steps, a curvature term |A| t^2 / 2 at the
    widest point t of about 4 times the loss's `resolution`;
    noise: the standard deviation of one loss's error, measured from the groups' fourth differences where
    they started at eta (nan until measured; a forward pass in bfloat16 makes it far larger than the loss
    dtype's rounding); resolution: the larger of the loss dtype's eps times |L0| and sqrt(12) noise (the
    rounding step that gives that noise) less the noise of a forward pass in the loss's own dtype (4 eps |L0|;
    adapeft.steps.resolution), the unit the steps are chosen in; b_error, A_error: what each b and
    A may be off by from g.d and d.H.d (about one standard deviation): the noise through the fit plus the
    loss's cubic and quartic terms as the polynomial through the five losses shows them, at least one
    deviation of theirs (adapeft.steps.fit_errors); with slope="autograd", b_error is 0;
    probed: the group had a direction (frozen groups are skipped); losses and steps: K x 5 (column 2 the
    unperturbed loss, steps the realized ones); changed: K x 5 elements whose bits changed; scale: each
    group's step t_k at this probe (its points are {-s_k,-1,1,s_k} t_k, s_k = 2 unless the outer points went
    further out: adapeft.steps.outer_ratio); verdict: why each fit was kept or not,
    an index into VERDICTS (`reasons()` names them); eta: the step the probe was called with;
    b_fit: the five points' own least-squares slope (b itself unless Prober(slope="autograd"), where b is
    g.d from autograd and A and R^2 are fitted through it); slope_error: (b_fit - b) / |b|, how far the five
    points' slope is from the exact one (nan without slope="autograd"): near 0 where they lie on a parabola,
    a sharper test than R^2, which the rounding of a nearly flat loss can leave high.
    """

    names: list
    b: torch.Tensor
    A: torch.Tensor
    r2: torch.Tensor
    accepted: torch.Tensor
    ppi: torch.Tensor
    eta_star: torch.Tensor
    reliable: torch.Tensor
    resolved: torch.Tensor
    probed: torch.Tensor
    losses: torch.Tensor
    steps: torch.Tensor
    changed: torch.Tensor
    scale: torch.Tensor
    verdict: torch.Tensor
    eta: float
    b_fit: torch.Tensor
    slope_error: torch.Tensor
    noise: torch.Tensor
    resolution: torch.Tensor
    b_error: torch.Tensor
    A_error: torch.Tensor

    def reasons(self):
        """Each group's verdict by name (see VERDICTS; synchronises with the device)."""
        return [VERDICTS[code] for code in self.verdict.tolist()]

    def as_dict(self):
        """Per group (lists in `names` order): the step t, b, A, R^2, PPI, resolved and the verdict, with
        None where a number is not finite (JSON has no nan). Synchronises with the device."""
        def numbers(tensor):
            return [value if math.isfinite(value) else None for value in tensor.tolist()]
        noise, resolution = (numbers(value.reshape(1))[0] for value in (self.noise, self.resolution))
        return {"t": numbers(self.scale), "b": numbers(self.b), "A": numbers(self.A), "r2": numbers(self.r2),
                "ppi": numbers(self.ppi), "resolved": self.resolved.tolist(), "verdict": self.reasons(),
                "slope_error": numbers(self.slope_error), "b_error": numbers(self.b_error),
                "A_error": numbers(self.A_error), "noise": noise,
                "resolution": resolution}

    def table(self):
        """A printable table (synchronises with the device). "A err": A_error over |A|."""
        host = {k: getattr(self, k).cpu().tolist()
                for k in ("scale", "b", "A", "A_error", "r2", "ppi", "eta_star", "probed", "slope_error")}
        exact = any(math.isfinite(v) for v in host["slope_error"])  # slope="autograd"
        rows = [f"{'group':12} {'t':>9} {'b':>11} {'A':>11} {'A err':>7} {'R^2':>8} {'PPI':>10} {'eta*':>9}"
                f"{' slope err' if exact else ''}  verdict"]
        for k, (name, verdict) in enumerate(zip(self.names, self.reasons())):
            if not host["probed"][k]:
                rows.append(f"{name:12} {'':>{82 if exact else 72}}  {verdict} (no direction)")
                continue
            error = f" {host['slope_error'][k]:9.2e}" if exact else ""
            relative = host["A_error"][k] / abs(host["A"][k]) if host["A"][k] else math.inf
            rows.append(f"{name:12} {host['scale'][k]:9.3g} {host['b'][k]:11.4e} {host['A'][k]:11.4e} "
                        f"{relative:7.1%} {host['r2'][k]:8.5f} {host['ppi'][k]:10.3e} {host['eta_star'][k]:9.3g}"
                        f"{error}  {verdict}")
        return "\n".join(rows)


@dataclass
class _Assessment:
    """What a measurement tells of each group: the report rows, realized steps, the fit, and verdicts."""

    report: torch.Tensor
    steps: torch.Tensor
    at_points: torch.Tensor
    fit: object
    b_fit: torch.Tensor  # the five points' own slope
    counts: torch.Tensor
    probed: torch.Tensor
    moved: torch.Tensor
    unmoved: torch.Tensor
    reliable: torch.Tensor
    rounding: torch.Tensor  # the loss's resolution (adapeft.steps.resolution)
    resolved: torch.Tensor
    errors: step_rules.FitErrors  # what the noise and the loss's higher terms move b and A by
    loss_change: torch.Tensor  # the largest change of the loss at the four points, as a share of the loss


def _check_eta(eta):
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1 or eta.device.type != "cpu":
            raise TypeError("adapeft.Prober.step: eta must be a positive number (a Python float, or a one-element CPU "
                            "tensor); a device tensor would need a host synchronisation to check")
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"adapeft.Prober.step: eta must be a positive number, got {type(eta).__name__}")
    eta = float(eta)
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"adapeft.Prober.step: eta must be positive and finite, got {eta}")
    return eta


@contextlib.contextmanager
def _model_untouched(model, modules, device):
    """Eval mode and a forked RNG for the probe; every module's own training flag and the RNG state seen by
    the next training step come back exactly, whatever happens inside. `modules`: list(model.modules())."""
    modes = [(module, module.training) for module in modules]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            # Each flag set costs a Module.__setattr__; on a model already in eval mode (and on the way
            # back, for flags that did not change) none is needed: a graphed probe waits for this.
            if any(training for _, training in modes):
                model.eval()
            yield
    finally:
        for module, training in modes:
            if module.training != training:
                _set_training(module, training)


def _set_training(module, flag):
    """`module.training = flag`, bypassing nn.Module.__setattr__ where the class keeps it: its checks for
    parameters, modules and buffers never apply to a bool, and cost 1.2 ms a probe step on GPT-2-large's
    838 modules (a CPU core of the development machine). A class's own __setattr__ is kept."""
    if type(module).__setattr__ is torch.nn.Module.__setattr__:
        object.__setattr__(module, "training", flag)
    else:
        module.training = flag


# The per-backend float32 precision settings of torch >= 2.9; older versions have only the global ones.
_FP32_PRECISION_SETTINGS = [("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"),
                            ("mkldnn", "conv"), ("mkldnn", "rnn")]


@contextlib.contextmanager
def _full_float32_precision():
    """float32 matrix products and convolutions at full precision (no TF32, no bfloat16 emulation) while the
    probe measures, whatever the process set for training: TF32 rounds every product's inputs to 10
    mantissa bits, below which a step of one learning rate vanishes (GPT-2-small with LoRA on an H100: the
    LoRA groups' APPI came out 10^4 times smaller, the norms' 100 times). Every setting comes back exactly.
    torch >= 2.9 has per-backend settings besides the global ones, and refuses reads of the global ones
    once the per-backend ones were set: where the process uses the global ones they are set (so that both
    kinds of read work inside), and the per-backend ones only where it uses those."""
    backends = [getattr(getattr(torch.backends, backend), op) for backend, op in _FP32_PRECISION_SETTINGS
                if hasattr(getattr(torch.backends, backend, None), op)]
    per_backend = [backend.fp32_precision for backend in backends]
    try:
        legacy = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # refused: the per-backend settings are in use
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    else:
        for backend in backends:
            backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        for backend, precision in zip(backends, per_backend):
            backend.fp32_precision = precision


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
    numpy fit; the baseline the ops are measured against). r2_threshold: the fit filter.
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
    """

    def __init__(self, model, groups=None, loss_fn=None, *, direction="grad", optimizer=None, backend="compiled",
                 r2_threshold=0.99, apply_lr=False, lr_ema=0.9, lr_clip=(0.5, 2.0), schedule=None, history=True,
                 cuda_graph=False, process_group="auto", require_resolved=False, step_policy="adaptive",
                 step_range=step_rules.DEFAULT_RANGE, slope="fit", compute="model"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"adapeft.Prober: model must be a torch.nn.Module, got {type(model).__name__}")
        if groups is None:
            groups = group_parameters(model)
        if not isinstance(groups, ParameterGroups):
            raise TypeError("adapeft.Prober: groups must come from adapeft.group_parameters(model), got "
                            f"{type(groups).__name__}")
        if not callable(loss_fn):
            raise TypeError("adapeft.Prober: loss_fn must be a callable loss_fn(model, batch) -> 0-dim tensor")
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
        if direction == "optimizer" and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("adapeft.Prober: direction='optimizer' needs the optimizer (optimizer=...)")
        own = {id(p) for p in model.parameters()}
        foreign = [name for name in groups.names if any(id(p) not in own for p in groups.params(name))]
        if foreign:
            raise ValueError(f"adapeft.Prober: groups {foreign} hold parameters that are not this model's; build "
                             "them with adapeft.group_parameters(model)")
        devices = {p.device for name in groups.names for p in groups.params(name)}
        if len(devices) != 1:
            raise ValueError(f"adapeft.Prober: the model's parameters are on several devices {sorted(map(str, devices))}"
                             "; the probe needs them on one")
        self.process_group, self._sharded = _process_group(model, groups, process_group, direction)
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
        self.lr_ema, self.lr_clip = lr_ema, lr_clip
        self._lr_groups = self._learning_rate_groups(optimizer, direction) if apply_lr else None
        k = len(self.names)
        self.appi = torch.zeros(k, dtype=torch.float64, device=self.device)
        # eta* of each group at the last probe that accepted it (nan until one does)
        self.last_eta_star = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)
        self.history = [] if history else None  # PPI of every probe
        self.results = [] if history else None  # the ProbeResult of every probe
        self.require_resolved = bool(require_resolved)
        self._loss_eps = 0.0  # eps of the loss dtype, from the first loss measured
        # The loss's noise (a standard deviation), from the groups' fourth differences where they start at eta
        # (adapeft.steps.pooled_noise); nan until measured.
        self._noise_pool = torch.empty(0, dtype=torch.float64, device=self.device)
        self.noise = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        self._eta = math.nan  # the eta of the probe under way
        self._points = torch.tensor(POINTS, dtype=torch.float32, device=self.device)
        # A device index (a Python list used as an index would be copied to the device and wait for it).
        self._point_columns = torch.tensor(COLUMNS, device=self.device)
        self.step_policy, self.step_range = step_policy, (float(step_range[0]), float(step_range[1]))
        self._places_outer = step_policy == "adaptive"  # the paper's fixed steps keep their points at +-2 eta
        self.slope, self.compute = slope, compute
        self._exact_slope = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)  # g.d per group
        # t_k of each group (nan until its first probe) and the K x 4 table of steps the moves read
        self._scale = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)
        self._steps = torch.empty(k, len(POINTS), dtype=torch.float32, device=self.device)
        self._started = set()  # groups probed before
        self._losses = torch.empty(k, 5, dtype=torch.float64, device=self.device)
        self._report = torch.zeros(k * 5, len(L.REPORT_FIELDS), dtype=torch.float64, device=self.device)
        self._perturbations = {}
        self._ledgers = None
        self._ledger_fingerprints = None
        self._entry_words = {}  # ledger words an entry of each probed group takes
        self._capacity_words = 0
        self._counts_key = None
        self._counts = self._probed = None
        self._pending = None
        # Said once per prober, gathered into one warning per cause: a peft model freezes most groups at once.
        self._notes = set()
        self._unsaid = {}  # cause: [what it is for each group] not warned about yet
        self._said_unmeasured = set()  # (cause, group) pairs warned about
        self._said_coarse_loss = False
        self._global_numel = {}  # parameters a group moves, over all ranks
        self._fsdp_modules = _fsdp_modules(model) if self._sharded else []
        self._graph = _GraphedMeasurement(self) if cuda_graph and self.device.type == "cuda" else None
        if cuda_graph and self._graph is None:
            warnings.warn(f"adapeft.Prober: cuda_graph=True has no effect on {self.device}; probing eagerly",
                          UserWarning, stacklevel=2)

    # Learning rates -------------------------------------------------------------------------------
    def _learning_rate_groups(self, optimizer, direction):
        if direction != "optimizer":
            raise ValueError("adapeft.Prober: apply_lr=True needs direction='optimizer', so that eta* is a learning "
                             "rate of that optimizer")
        by_name = {group.get("adapeft_group"): group for group in optimizer.param_groups}
        missing = [name for name in self.names if name not in by_name]
        if missing:
            raise ValueError(f"adapeft.Prober: apply_lr=True needs one optimizer param group per adapeft group; "
                             f"none is named for {missing}. Build them with adapeft.param_groups(groups, lr=...)")
        for name in self.names:
            if {id(p) for p in by_name[name]["params"]} != {id(p) for p in self.groups.params(name)}:
                raise ValueError(f"adapeft.Prober: the optimizer param group named {name!r} does not hold exactly "
                                 "that group's parameters")
        return [by_name[name] for name in self.names]

    def _apply_learning_rates(self, result):
        """GeN's safeguards: each accepted group's lr moves toward eta*, clipped to [lr/2, 2 lr], by an EMA.
        Tensor learning rates on the device are updated there; float ones cost one host synchronisation."""
        low, high = self.lr_clip
        floats = [k for k, group in enumerate(self._lr_groups) if not isinstance(group["lr"], torch.Tensor)]
        if floats:
            accepted, eta_star = result.accepted.tolist(), result.eta_star.tolist()
        for k, group in enumerate(self._lr_groups):
            lr = group["lr"]
            if k in floats:
                if accepted[k]:
                    target = min(max(eta_star[k], low * lr), high * lr)
                    group["lr"] = self.lr_ema * lr + (1 - self.lr_ema) * target
                continue
            star = result.eta_star[k].to(lr.device, lr.dtype)
            target = torch.minimum(torch.maximum(star, low * lr), high * lr)
            moved = self.lr_ema * lr + (1 - self.lr_ema) * target
            lr.copy_(torch.where(result.accepted[k].to(lr.device), moved, lr))

    def maybe_step(self, training_step, batch, eta):
        """`step(batch, eta)` when the schedule says this training step is due, else None."""
        return self.step(batch, eta) if self.schedule(training_step) else None

    # Directions -----------------------------------------------------------------------------------
    def _directions(self, name, params):
        """The plan (params, directions, states, layout, hyper) of the tensors of group `name` that can
        move, or None to skip the group."""
        if self.direction in ("grad", "optimizer"):
            pairs = [(p, p.grad) for p in params if p.requires_grad and p.grad is not None]
            if len(pairs) < len(params):
                self._note("tensors without a gradient (frozen or unused) are not probed", name,
                           f"{len(params) - len(pairs)} of its {len(params)} tensors have no gradient")
            if not pairs:
                return None
            moving = [p for p, _ in pairs]
            self._global_numel[name] = sum(p.numel() for p in moving)
            if self.direction == "optimizer":
                found = optimizer_direction(self.optimizer, moving)
                return moving, found.directions, found.states, found.layout, found.hyper
            if not self._sharded:
                return moving, [d for _, d in pairs], [], [], None
            return [_local(p) for p in moving], [_local(d) for _, d in pairs], [], [], None
        given = self.direction.get(name) if isinstance(self.direction, dict) else self.direction(name, params)
        if given is None:
            self._note("groups without a direction are not probed", name, "no direction was given for it")
            return None
        given = list(given)
        if len(given) != len(params):
            raise ValueError(f"adapeft.Prober: direction for group {name!r} has {len(given)} tensors but the group "
                             f"has {len(params)}")
        self._global_numel[name] = sum(p.numel() for p in params)
        return [_local(p) for p in params], [_local(d) for d in given], [], [], None

    def _note(self, cause, name, detail):
        if (name, detail) not in self._notes:
            self._notes.add((name, detail))
            self._unsaid.setdefault(cause, []).append(f"group {name!r}: {detail}")

    def _say_notes(self):
        for cause, details in self._unsaid.items():
            warnings.warn(f"adapeft.Prober: {cause}: {'; '.join(details)}", UserWarning, stacklevel=3)
        self._unsaid.clear()

    # Ledgers --------------------------------------------------------------------------------------
    def _ensure_ledgers(self, plans):
        self._entry_words = {name: max(L.entry_words(p.dtype) for p in plan[0]) for name, plan in plans.items()}
        chunks = max(L.count_chunks(plan[0]) for plan in plans.values())
        words = max(max(MIN_CAPACITY, int(sum(p.numel() for p in plan[0]) * CAPACITY_FRACTION))
                    * self._entry_words[name] for name, plan in plans.items())
        self._capacity_words = max(self._capacity_words, words)
        size = L.LEDGER_HEADER_WORDS + chunks + self._capacity_words
        if self._ledgers is None or self._ledgers[0].numel() < size:
            self._ledgers = [ops.new_ledger(chunks, size - L.LEDGER_HEADER_WORDS - chunks, self.device)
                             for _ in range(2)]

    def _learn_from_last_step(self):
        """Grow the ledgers and warn about unreliable groups once the last probe's report is on the host,
        without waiting for it."""
        if self._pending is None:
            return
        event, host, names, words = self._pending
        if event is not None and not event.query():
            return
        self._pending = None
        saved, unmoved, verdict = host[0], host[1], host[2].long().tolist()
        needed = max((int(s) * w for s, w in zip(saved.tolist(), words)), default=0)
        if needed > self._capacity_words or unmoved.any():
            self._capacity_words = max(needed, self._capacity_words) * 5 // 4
            self._ledgers = None
        for cause, why in UNMEASURED.items():
            named = [name for name, code in zip(names, verdict)
                     if code == VERDICT[cause] and (cause, name) not in self._said_unmeasured]
            if named:
                self._said_unmeasured.update((cause, name) for name in named)
                if cause == "did not move":
                    why += ("; their steps grow for the next probe" if self.step_policy == "adaptive" else
                            "; use a larger eta, step_policy='adaptive', or float32 master weights")
                warnings.warn(f"adapeft.Prober: {cause}: groups {named}: {why}", UserWarning, stacklevel=3)

    # The probe ------------------------------------------------------------------------------------
    def step(self, batch, eta):
        """Probe every group at {-s_k,-1,1,s_k}*t_k around the current weights (t_k from eta, s_k from the inner
        points: see step_policy);
        returns a ProbeResult."""
        eta = _check_eta(eta)
        self._eta = eta
        self._learn_from_last_step()
        plans = {}
        for name in self.names:
            found = self._directions(name, self.groups.params(name))
            if found is not None:
                plans[name] = found
        self._say_notes()
        if not plans:
            raise RuntimeError("adapeft.Prober.step: no group has a direction; call loss.backward() before step() "
                               "or give directions")
        # One walk over the modules a step: a graphed probe's replay waits for this host work.
        modules = list(self.model.modules())
        low, high = eta * self.step_range[0], eta * self.step_range[1]
        if self.step_policy == "fixed":
            self._scale.fill_(eta)
        else:
            self._scale.copy_(torch.where(torch.isnan(self._scale), eta, self._scale).clamp(low, high))
        new = [name for name in plans if name not in self._started] if self.step_policy == "adaptive" else []
        with torch.no_grad(), _model_untouched(self.model, modules, self.device), _full_float32_precision():
            try:
                if self.slope == "autograd":
                    self._measure_slopes(batch, plans)
                perturbations = self._perturbations_for(plans) if self.backend == "compiled" else None
                bracketed = {name: plans[name] for name in new}
                for round_ in range(step_rules.BRACKET_ROUNDS if new else 0):
                    # Groups never probed: rounds from eta bracket their curvature, and the probe proper runs at
                    # the steps they choose. The first round, at eta, also samples the loss's noise.
                    self._write_steps()
                    self._measure_round(batch, bracketed, perturbations)
                    self._adapt(self._assess(bracketed, sample_noise=round_ == 0), eta, low, high,
                                step_rules.BRACKET_MOST_CHANGE)
                self._write_steps()  # outside any captured graph: a replay reads the steps from this table
                if self._graph is None or not self._graph.run(batch, perturbations, modules):
                    self._measure_round(batch, plans, perturbations, reduce=False, place_outer=self._places_outer)
            finally:
                self._reshard()  # the next forward pass gathers the restored shards, also after a failure
        if self.process_group is not None:
            self._reduce_across_ranks(plans)
        self._started.update(plans)
        return self._finish(plans, eta, low, high)

    def _measure_slopes(self, batch, plans):
        """b_k = g.d_k for the groups in `plans` into self._exact_slope: g from one backward pass of loss_fn on
        the batch in the probe's mode, through torch.autograd.grad, so that no p.grad changes."""
        tensors = [p for plan in plans.values() for p in plan[0]]
        frozen = [p for p in tensors if not p.requires_grad]  # a given direction may move a frozen tensor
        try:
            for p in frozen:
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = self._loss(batch, None)
                if not loss.requires_grad:
                    raise RuntimeError("adapeft.Prober.step: slope='autograd' needs a loss_fn whose loss depends on "
                                       "the parameters through autograd (it returned a loss without a graph)")
                gradients = iter(torch.autograd.grad(loss, tensors, allow_unused=True))
        finally:
            for p in frozen:
                p.requires_grad_(False)
        self._exact_slope.fill_(math.nan)
        for k, name in enumerate(self.names):
            if name not in plans:
                continue
            params, directions, states, layout, hyper = plans[name]
            hyper_rows = hyper.reshape(-1, L.HYPER_WORDS).tolist() if hyper is not None else None
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for i, (p, d) in enumerate(zip(params, directions)):
                g = next(gradients)
                if g is None:
                    continue  # the loss does not depend on p
                if hyper_rows is None:
                    full = d
                else:  # the optimizer's update, formed as the kernels form it
                    kind, named = reference._tensor_layout(layout, i)
                    full = reference._Direction(d, [states[j] if j >= 0 else None for j in named], kind,
                                                hyper_rows[i], p.dtype).full(p.detach().view(-1))
                total += torch.dot(g.reshape(-1).double(), full.reshape(-1).double())
            self._exact_slope[k] = total

    def _write_steps(self):
        torch.mul(self._scale.float()[:, None], self._points, out=self._steps)

    def _measure_round(self, batch, plans, perturbations, reduce=True, place_outer=False):
        """Measure the groups in `plans` (every loss and report of the others nan and zero), then, with
        reduce=True, agree across ranks. place_outer: place the outer points from the inner ones' losses."""
        if self.backend == "torch":
            self._measure_torch(batch, plans, place_outer)
        else:
            self._measure(batch, {name: perturbations[name] for name in plans}, place_outer)
        if reduce and self.process_group is not None:
            self._reduce_across_ranks(plans)

    def _reduce_across_ranks(self, plans):
        """One collective: the mean over the ranks of every loss (each rank measured its own batch; a nan on
        any rank rejects that group on all), and with sharded parameters the moves' measurements summed:
        the realized step is -sum(d.dw)/sum(d.d) over all shards, so each rank's step is weighted by its
        shards' sum(d.d). On CUDA (NCCL) the wait is the stream's, not the host's."""
        import torch.distributed as dist
        k = len(self.names)
        report = self._report.view(k, 5, len(L.REPORT_FIELDS))
        parts = [self._losses]
        if self._sharded:
            # sum(d.d) of each group's shards: one multi-tensor norm pass, no copy of the directions
            norms = torch.stack([torch.stack(torch._foreach_norm(plans[name][1])).double().square().sum()
                                 if name in plans else torch.zeros((), dtype=torch.float64, device=self.device)
                                 for name in self.names])
            summed = report[:, :, [FIELD["changed"], FIELD["unmoved"]]]
            parts += [report[:, :, FIELD["step"]] * norms[:, None], norms[:, None], summed]
        packed = torch.cat([part.reshape(k, -1) for part in parts], dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
        self._losses.copy_(packed[:, :5] / dist.get_world_size(self.process_group))
        if self._sharded:
            norms = packed[:, 10:11]
            report[:, :, FIELD["step"]] = torch.where(norms > 0, packed[:, 5:10] / norms, 0.0)
            report[:, :, FIELD["changed"]] = packed[:, 11:21].reshape(k, 5, 2)[:, :, 0]
            report[:, :, FIELD["unmoved"]] = packed[:, 11:21].reshape(k, 5, 2)[:, :, 1]

    def _start_measurement(self, batch):
        self._losses.fill_(math.nan)
        self._report.zero_()
        self._losses[:, 2] = self._loss(batch, None)

    def _reshard(self):
        """FSDP2 keeps some modules' gathered parameters after a forward pass (the root's, by default): drop
        them, so that the next forward gathers the shards as they are now."""
        for module in self._fsdp_modules:
            module.reshard()

    def _loss(self, batch, group):
        where = "on the unperturbed model" if group is None else f"with group {group!r} perturbed"
        self._reshard()
        try:
            with float32_compute(self.compute == "float32"):
                loss = self.loss_fn(self.model, batch)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            raise RuntimeError(f"adapeft.Prober.step: loss_fn(model, batch) failed {where}: {error!r}; the model "
                               "was left unchanged") from error
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise TypeError(f"adapeft.Prober.step: loss_fn must return a one-element floating tensor, got "
                            f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        self._loss_eps = torch.finfo(loss.dtype).eps
        if loss.dtype.itemsize < 4 and not self._said_coarse_loss:
            # The fit runs in float64, but differences the loss's own rounding erased are not there to fit.
            self._said_coarse_loss = True
            warnings.warn(f"adapeft.Prober: loss_fn returns a {loss.dtype} loss, which rounds away changes below "
                          f"{self._loss_eps:.1g} of its value: more than a local probe step changes it, so b and A "
                          "are mostly rounding (at a fixed step b comes out 0). Return the loss in float32 "
                          "(cross_entropy(logits.float(), labels)); the model can stay in 16 bits.", UserWarning,
                          stacklevel=3)
        return loss.reshape(())

    def _perturbations_for(self, plans):
        """{group name: GroupPerturbation} for the groups in `plans`, kept from step to step while their
        tensors and the ledgers stay the same (so tables are built once and addresses stay fixed)."""
        fingerprints = {name: ops.group_fingerprint(*plan[:4]) for name, plan in plans.items()}
        # The ledgers' size depends on what the fingerprints hold (sizes and dtypes) and on the capacity
        # the last probes needed (a growth drops the ledgers).
        if self._ledgers is None or fingerprints != self._ledger_fingerprints:
            self._ensure_ledgers(plans)
            self._ledger_fingerprints = fingerprints
        perturbations = {}
        for name in self.names:
            if name not in plans:
                continue
            params, directions, states, layout, hyper = plans[name]
            fingerprint = fingerprints[name]
            cached = self._perturbations.get(name)
            if cached is None or cached.fingerprint != fingerprint or \
                    any(mine is not ours for mine, ours in zip(cached._ledgers, self._ledgers)) or \
                    (hyper is not None and cached.hyper.shape != hyper.shape):
                cached = GroupPerturbation(params, directions, self._steps[self.names.index(name)], states=states,
                                           layout=layout, hyper=hyper, ledgers=self._ledgers)
                self._perturbations[name] = cached
            elif hyper is not None:
                cached.hyper.copy_(hyper)  # the bias corrections move with the optimizer's step count
            perturbations[name] = cached
        return perturbations

    def _place_outer_points(self):
        """The outer points' steps from the inner points' losses (adapeft.steps.outer_ratio), written while
        every group is at its unperturbed values; from the losses' mean over the ranks, so that every rank
        moves the same way."""
        inner = self._losses
        if self.process_group is not None:
            import torch.distributed as dist
            inner = inner.clone()
            dist.all_reduce(inner, op=dist.ReduceOp.SUM, group=self.process_group)
            inner /= dist.get_world_size(self.process_group)
        rounding = step_rules.resolution(inner[:, 2], self._loss_eps, self.noise)
        ratio = step_rules.outer_ratio(inner, rounding, self.noise).float()
        self._steps[:, OUTER[0]] = self._steps[:, INNER[0]] * ratio
        self._steps[:, OUTER[1]] = self._steps[:, INNER[1]] * ratio

    def _measure(self, batch, perturbations, place_outer=False):
        """The losses of a probe step into self._losses, the moves' reports into self._report."""
        self._start_measurement(batch)
        for points in (INNER, OUTER):
            if place_outer and points is OUTER:
                self._place_outer_points()
            for k, name in enumerate(self.names):
                if name not in perturbations:
                    continue
                group = perturbations[name]
                with group:
                    for j in points:
                        group.move(j, self._report, 5 * k + COLUMNS[j])
                        self._losses[k, COLUMNS[j]] = self._loss(batch, name)

    def _measure_torch(self, batch, plans, place_outer=False):
        """The plain implementation: a saved copy per group, per-tensor loops, .item() per forward."""
        self._start_measurement(batch)
        for points in (INNER, OUTER):
            if place_outer and points is OUTER:
                self._place_outer_points()
            for k, name in enumerate(self.names):
                if name in plans:
                    self._measure_torch_group(batch, name, k, plans[name], points)

    def _measure_torch_group(self, batch, name, k, plan, points):
        """Group k's losses and reports at `points` (indices into POINTS), from a saved copy it returns to."""
        params, directions, states, layout, hyper = plan
        hyper_rows = hyper.reshape(-1, L.HYPER_WORDS).tolist() if hyper is not None else None
        rules = []
        for i, (p, d) in enumerate(zip(params, directions)):
            kind, named = reference._tensor_layout(layout, i)
            rules.append(reference._Direction(d, [states[j] if j >= 0 else None for j in named], kind,
                                              hyper_rows[i] if hyper_rows else None, p.dtype))
        saved = [p.detach().clone() for p in params]
        try:
            for j in points:
                column = COLUMNS[j]
                dot_step = dot_dir = changed = 0.0
                for p, w0, rule in zip(params, saved, rules):
                    eta = self._steps[k, j].to(rule.a.dtype)
                    p.view(-1).copy_(reference._step_away(w0.view(-1), eta * rule.a, rule.scale(eta)))
                    d64 = rule.full(w0.view(-1)).double().view_as(p)
                    dot_step += (d64 * (p.double() - w0.double())).sum().item()
                    dot_dir += (d64 * d64).sum().item()
                    changed += (reference._bits(p) != reference._bits(w0)).sum().item()
                self._losses[k, column] = self._loss(batch, name).item()
                row = self._report[5 * k + column]
                row[FIELD["step"]] = -dot_step / dot_dir if dot_dir else math.nan
                row[FIELD["changed"]] = changed
        finally:
            for p, w0 in zip(params, saved):
                p.copy_(w0)

    def _assess(self, plans, sample_noise=False):
        """The fit of the last measurement of the groups in `plans`, and what is known of each (device tensors).
        sample_noise: the groups were measured at eta, where their fourth differences sample the loss's noise."""
        k = len(self.names)
        counts_key = tuple(self._global_numel[n] if n in plans else None for n in self.names)
        if counts_key != self._counts_key:
            # Pinned and non-blocking: they reach the device without a host synchronisation.
            on_host = [torch.tensor([count or 0 for count in counts_key], dtype=torch.float64),
                       torch.tensor([count is not None for count in counts_key])]
            self._counts, self._probed = [tensor.pin_memory().to(self.device, non_blocking=True)
                                          if self.device.type == "cuda" else tensor for tensor in on_host]
            self._counts_key = counts_key
        counts, probed = self._counts, self._probed
        report = self._report.view(k, 5, len(L.REPORT_FIELDS))
        steps = report[:, :, FIELD["step"]]
        if self.backend == "compiled":
            fit = ops.quadratic_fit(self._losses, steps, counts, None, self.r2_threshold)
        else:
            fit = _numpy_fit(self._losses, steps, counts, self.r2_threshold)
        b_fit = fit.b
        if self.slope == "autograd":
            fit = _fit_through_slope(self._losses, steps, counts, self._exact_slope, self.r2_threshold)
        at_points = report.index_select(1, self._point_columns)
        moved_share = at_points[:, :, FIELD["changed"]] / counts.clamp(min=1)[:, None]
        on_course = (at_points[:, :, FIELD["step"]] / self._steps.double() - 1).abs() <= RELIABLE_STEP_TOLERANCE
        moved = ((moved_share >= RELIABLE_CHANGED_SHARE) | on_course).all(1)
        unmoved = at_points[:, :, FIELD["unmoved"]].sum(1)
        reliable = moved & (unmoved == 0) & probed
        samples = step_rules.noise_samples(self._losses, steps)
        largest_change = (self._losses - self._losses[:, 2:3]).abs().amax(1)
        # A loss that did not change at all (lora_A's while lora_B is 0) is no sample of its noise.
        usable = reliable & (largest_change > 0) & torch.isfinite(samples) & torch.isfinite(self._losses).all(1)
        if sample_noise:
            self._noise_pool, noise = step_rules.pooled_noise(self._noise_pool, samples, usable)
            self.noise.copy_(noise)
        else:
            # Where the rounds at eta gave no usable sample (a bfloat16 step the ledger could not hold, say), the
            # first measurement near eta that gives some stands in until they do.
            near = self._scale <= step_rules.NEAR_ETA * self._eta
            _, here = step_rules.pooled_noise(self._noise_pool[:0], samples, usable & near)
            self.noise.copy_(torch.where(torch.isnan(self.noise), here, self.noise))
        rounding = step_rules.resolution(self._losses[:, 2], self._loss_eps, self.noise)
        # The noise as large as the loss's rounding where it was not measured (or measured below it).
        noise = rounding / step_rules.ROUNDINGS_PER_NOISE
        errors = step_rules.fit_errors(self._losses, steps, noise, slope_known=self.slope == "autograd")
        return _Assessment(report=report, steps=steps, at_points=at_points, fit=fit, b_fit=b_fit, counts=counts,
                           probed=probed, moved=moved, unmoved=unmoved, reliable=reliable, rounding=rounding,
                           resolved=errors.A_noise <= step_rules.RESOLVED_SHARE * fit.A.abs(), errors=errors,
                           loss_change=largest_change / self._losses[:, 2].abs())

    def _adapt(self, assessment, eta, low, high, most_change=None):
        """Choose the next steps of the groups this assessment measured (adapeft.steps)."""
        fit = assessment.fit
        change = {} if most_change is None else {"most_up": most_change, "most_down": most_change}
        has_direction = torch.isfinite(assessment.at_points[:, :, FIELD["step"]]).any(1)  # d.d = 0 gives 0/0
        self._scale.copy_(step_rules.next_scale(self._scale, fit.b, fit.A, fit.r2, assessment.moved,
                                                 assessment.resolved, assessment.rounding, self.r2_threshold,
                                                 assessment.probed & has_direction, eta, low, high,
                                                 errors=assessment.errors, loss_change=assessment.loss_change,
                                                 ledger_full=assessment.unmoved > 0, **change))

    def _verdict(self, found, accepted):
        """VERDICTS' index of each group: accepted, or the first reason that applies."""
        fit, at_points = found.fit, found.at_points
        realized = at_points[:, :, FIELD["step"]]
        nonfinite_direction = at_points[:, :, FIELD["nonfinite"]].sum(1) > 0
        inputs_finite = torch.isfinite(self._losses).all(1) & ~nonfinite_direction
        reasons = [(~found.probed, "not probed"),
                   (torch.isnan(realized).all(1) & ~nonfinite_direction, "zero direction"),  # d.d = 0: 0/0
                   (~inputs_finite, "non-finite"), (found.unmoved > 0, "ledger full"), (~found.moved, "did not move"),
                   (~torch.isfinite(fit.b + fit.A + fit.ppi), "non-finite"), (~found.resolved, "unresolved"),
                   (~(fit.b > 0), "b <= 0"), (~(fit.A > 0), "A <= 0"), (~(fit.r2 > self.r2_threshold), "R^2")]
        # A rejection none of these explains can only be a fit the op found not finite.
        verdict = torch.full_like(found.unmoved, VERDICT["non-finite"], dtype=torch.int64)
        for applies, name in reversed(reasons):  # the first reason that applies wins
            verdict = torch.where(applies, VERDICT[name], verdict)
        # Accepted fits are accepted whatever they are (unresolved ones too, with the paper's filter).
        return torch.where(accepted, VERDICT["accepted"], verdict)

    def _finish(self, plans, eta, low, high):
        found = self._assess(plans, sample_noise=self.step_policy == "fixed")
        fit, reliable, resolved, probed = found.fit, found.reliable, found.resolved, found.probed
        scale = self._scale.clone()
        accepted = fit.accepted & reliable & (resolved if self.require_resolved else True)
        verdict = self._verdict(found, accepted)
        ppi = torch.where(accepted, fit.ppi, torch.zeros_like(fit.ppi))
        eta_star = torch.where(accepted, fit.eta_star, torch.full_like(fit.eta_star, math.nan))
        self.appi += ppi
        self.last_eta_star = torch.where(accepted, eta_star, self.last_eta_star)
        if self.history is not None:
            self.history.append(ppi.clone())
        if self.step_policy == "adaptive":
            self._adapt(found, eta, low, high)
        saved = found.at_points[:, :, FIELD["saved"]].amax(1)
        words = [self._entry_words.get(n, 1) for n in self.names]  # the torch backend saves no entries
        self._remember(torch.stack([saved, found.unmoved, verdict.double()]), words)
        slope_error = (found.b_fit - fit.b) / fit.b.abs() if self.slope == "autograd" else \
            torch.full_like(fit.b, math.nan)
        result = ProbeResult(names=list(self.names), b=fit.b, A=fit.A, r2=fit.r2, accepted=accepted, ppi=ppi,
                             eta_star=eta_star, reliable=reliable, resolved=resolved, probed=probed.clone(),
                             losses=self._losses.clone(), steps=found.steps.clone(),
                             changed=found.report[:, :, FIELD["changed"]].clone(), scale=scale, verdict=verdict,
                             eta=eta, b_fit=found.b_fit, slope_error=slope_error, noise=self.noise.clone(),
                             resolution=found.rounding[0].clone(), b_error=found.errors.b_bound,
                             A_error=found.errors.A_bound)
        if self._lr_groups is not None:
            self._apply_learning_rates(result)
        if self.results is not None:
            self.results.append(result)
        return result

    def _remember(self, summary, words):
        if self.device.type == "cuda":
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = summary, None
        self._pending = (event, host, list(self.names), words)
        if event is None:
            self._learn_from_last_step()

    def flush(self):
        """Wait for the last probe and emit its warnings now (a host synchronisation on CUDA)."""
        if self._pending is not None and self._pending[0] is not None:
            self._pending[0].synchronize()
        self._learn_from_last_step()


def _is_sharded(tensor):
    return type(tensor).__name__ == "DTensor"


def _local(tensor):
    """The part of a tensor this rank holds (a DTensor's local shard; any other tensor itself)."""
    return tensor.to_local() if _is_sharded(tensor) else tensor


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def _process_group(model, groups, requested, direction):
    """(process group whose ranks probe together, whether the parameters are sharded across it), checked."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    params = [p for name in groups.names for p in groups.params(name)]
    sharded = [p for p in params if _is_sharded(p)]
    if sharded:
        meshes = {id(p.device_mesh) for p in sharded}
        mesh = sharded[0].device_mesh
        if len(meshes) != 1 or mesh.ndim != 1 or len(sharded) != len(params):
            raise NotImplementedError("adapeft.Prober: parameters sharded over one 1-D device mesh (FSDP2's "
                                      "fully_shard) are supported; this model mixes meshes, dimensions or plain "
                                      "tensors")
        if direction == "optimizer":
            raise NotImplementedError("adapeft.Prober: direction='optimizer' is not supported on sharded (FSDP2) "
                                      "parameters yet; use direction='grad'")
        return (mesh.get_group() if requested == "auto" else requested), True
    if requested == "auto":
        return (model.process_group if isinstance(model, DistributedDataParallel) else None), False
    if requested is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("adapeft.Prober: process_group was given but torch.distributed is not initialised")
    return requested, False


class _GraphedMeasurement:
    """A prober's measurement captured as one CUDA graph, replayed while nothing it depends on moved.

    The first step with a new key runs eagerly on the capture stream (the warm-up PyTorch needs before a
    capture, and that step's result), then captures. Capture runs no kernel, so a failed capture leaves
    the model as it was; the groups' bookkeeping is put back either way.
    """

    def __init__(self, prober):
        self.prober = prober
        self.stream = torch.cuda.Stream(prober.device)
        self.key = self.graph = self.static = None
        self.disabled = None
        self.captures = 0

    def _key(self, batch, perturbations, modules):
        leaves, spec = torch.utils._pytree.tree_flatten(batch)
        batch_key = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.prober.device:
                    return None, f"the batch holds a tensor on {leaf.device}, not on {self.prober.device}"
                batch_key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return None, f"the batch holds an unhashable {type(leaf).__name__}"
                batch_key.append(("value", leaf))
        # Where every parameter and buffer lives, read from each module's own tables (model.parameters()
        # would walk the modules again).
        tensors = tuple(t.data_ptr() for module in modules for table in (module._parameters, module._buffers)
                        for t in table.values() if t is not None)
        groups = tuple((name, group.fingerprint, group.table.data_ptr(), group.hyper.data_ptr(),
                        tuple(ledger.data_ptr() for ledger in group._ledgers))
                       for name, group in perturbations.items())
        return (str(spec), tuple(batch_key), tensors, groups), None

    def run(self, batch, perturbations, modules):
        """Measure with the graph (capturing it first when needed); False: measure eagerly instead."""
        if self.disabled:
            return False
        key, why = self._key(batch, perturbations, modules)
        if key is None:
            self._disable(why)
            return False
        if key == self.key:
            leaves = torch.utils._pytree.tree_leaves(batch)
            for static, leaf in zip(self.static, leaves):
                if isinstance(leaf, torch.Tensor):
                    static.copy_(leaf)
            self.graph.replay()
            return True
        self.key = self.graph = self.static = None  # free the old graph's memory before the new capture
        static_batch = torch.utils._pytree.tree_map(
            lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, batch)
        current = torch.cuda.current_stream(self.prober.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                self.prober._measure(static_batch, perturbations, self.prober._places_outer)
        finally:
            current.wait_stream(self.stream)  # also the restore that follows a failed loss_fn
        positions = {name: group._state for name, group in perturbations.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.prober._measure(static_batch, perturbations, self.prober._places_outer)
        except Exception as error:  # noqa: BLE001 - whatever stops the capture, the probe goes on eagerly
            self._repair_generator()
            self._disable(f"capturing the forward passes failed ({type(error).__name__}: {error})")
            return True  # this step was measured by the warm-up
        finally:
            for name, group in perturbations.items():
                group._state = positions[name]
        self.key, self.graph = key, graph
        self.captures += 1
        self.static = [leaf for leaf in torch.utils._pytree.tree_leaves(static_batch)]
        return True

    def _repair_generator(self):
        """A capture that fails leaves the device's default generator marked as capturing (PyTorch ends that
        mark only at a successful capture's end), and every later random op on the device would fail; one
        small successful capture clears it."""
        scratch = torch.zeros(1, device=self.prober.device)
        repair = torch.cuda.CUDAGraph()
        with torch.cuda.graph(repair, stream=self.stream):
            scratch.add_(1)
        del repair

    def _disable(self, why):
        self.disabled = why
        self.key = self.graph = self.static = None
        warnings.warn(f"adapeft.Prober: cuda_graph=True: {why}; probing eagerly from now on", UserWarning,
                      stacklevel=4)


def _numpy_fit(losses, steps, counts, threshold):
    """The fit in numpy float64 (least squares and R^2 row by row), for the torch backend."""
    L_host, x_host = losses.cpu().numpy(), steps.cpu().numpy()
    out = {name: np.full(len(L_host), np.nan) for name in ("b", "A", "r2")}
    for k, (row, x) in enumerate(zip(L_host, x_host)):
        y = row - row[2]
        if not (np.isfinite(y).all() and np.isfinite(x).all()):
            continue
        design = np.stack([-x, 0.5 * x * x], axis=1)
        (b, A), *_ = np.linalg.lstsq(design, y, rcond=None)
        ss_res = float(((y - design @ np.array([b, A])) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 if ss_res == 0 else (0.0 if ss_tot == 0 else 1 - ss_res / ss_tot)
        out["b"][k], out["A"][k], out["r2"][k] = b, A, r2
    b, A, r2 = (torch.tensor(out[name], dtype=torch.float64, device=losses.device) for name in ("b", "A", "r2"))
    return _filtered_fit(b, A, r2, counts, threshold)


def _fit_through_slope(losses, steps, counts, slope, threshold):
    """The fit with b known (slope="autograd"): A by least squares of dL(x) + x b = x^2/2 A, and the R^2 of
    that parabola, on the device."""
    x = steps.double()
    y = losses.double() - losses.double()[:, 2:3]
    A = 2 * (x.square() * (y + x * slope[:, None])).sum(1) / x.pow(4).sum(1)
    ss_res = (y - (-x * slope[:, None] + 0.5 * x.square() * A[:, None])).square().sum(1)
    ss_tot = (y - y.mean(1, keepdim=True)).square().sum(1)
    r2 = torch.where(ss_res == 0, 1.0, torch.where(ss_tot == 0, 0.0, 1 - ss_res / ss_tot))
    return _filtered_fit(slope.clone(), A, r2, counts, threshold)


def _filtered_fit(b, A, r2, counts, threshold):
    """A FitResult from b, A and R^2 with the paper's filter (b > 0, A > 0, R^2 > threshold, all finite), as
    adapeft.quadratic_fit applies it."""
    n = counts.to(torch.float64)
    ppi = b * b / (A * n)
    accepted = (b > 0) & (A > 0) & (r2 > threshold) & (n > 0) & torch.isfinite(b) & torch.isfinite(A) & \
        torch.isfinite(r2) & torch.isfinite(ppi)
    ppi = torch.where(accepted, ppi, torch.zeros_like(b))
    eta_star = torch.where(accepted, b / A, torch.full_like(b, math.nan))
    return ops.FitResult(b, A, r2, accepted, ppi, eta_star)


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
