"""AdaPEFT, the paper's Algorithm 2, in four phases that can also be used on their own:

1. `equip`: give a (proxy) model PEFT components (LoRA through peft), so that lora_A/lora_B groups exist;
2. `probe_train`: train it in full for a fraction of the horizon, probing every few steps (APPI);
3. `select`: choose the groups under a budget (or the whole Pareto frontier);
4. `train_selected`: train the target model with only the chosen groups, matched by group name, with
   optional per-group Hessian-informed learning rates from the probe.

The loops are plain PyTorch over batches: a list or DataLoader is gone through again as often as the
steps need (epochs), an iterator or generator is read once; the Hugging Face Trainer route is
`adapeft.hf.AdaPEFTCallback`.
"""
import math
import time
from dataclasses import dataclass, field

import torch

from .groups import group_parameters, groups_like
from .probe import Prober, ProbeSchedule, param_groups
from .select import check_settings, select
from .selection import Selection


def equip_lora(model, target_modules, r=8, alpha=16, dropout=0.0, train_all=True):
    """Wrap `model` with peft LoRA adapters on `target_modules`. train_all=True leaves every parameter
    trainable (the full fine-tuning of phase 2); peft alone would freeze the base model."""
    import warnings

    from peft import LoraConfig, get_peft_model
    check_lora_targets(model, target_modules)
    with warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing through a name transformers now deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=list(target_modules)))
    if train_all:
        for p in peft_model.parameters():
            p.requires_grad_(True)
    return peft_model


def check_lora_targets(model, target_modules, owner="adapeft.equip_lora"):
    """ValueError naming every name of target_modules that no module of `model` has (peft matches a name to the
    end of a module's path, and raises only where none of the names matches)."""
    if isinstance(target_modules, str) or not all(isinstance(name, str) and name for name in target_modules):
        raise TypeError(f"{owner}: target_modules must be a list of module names, got {target_modules!r}")
    paths = [path for path, _ in model.named_modules()]
    missing = [name for name in target_modules if not any(path == name or path.endswith("." + name) for path in paths)]
    if missing:
        layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)
        known = dict.fromkeys(path.rsplit(".", 1)[-1] for path, module in model.named_modules()
                              if isinstance(module, layers) or type(module).__name__ == "Conv1D")
        raise ValueError(f"{owner}: no module of the model is named {', '.join(missing)} (a name matches the end "
                         f"of a module's path; its layers end in {', '.join(known) or 'none'})")


@dataclass
class ProbeRun:
    """What phase 2 leaves: the prober (APPI, history), the losses of the steps, and the time spent; `compared`:
    {label: the Prober of other settings run beside it}, `compared_seconds`: {label: their probes' seconds}."""

    prober: Prober
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    probe_seconds: float = 0.0
    compared: dict = field(default_factory=dict)
    compared_seconds: dict = field(default_factory=dict)


@dataclass
class TrainRun:
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    trainable: int = 0


class AdaPEFT:
    """Algorithm 2 with its settings: budget (share of parameters), method ("greedy", "exact", "pareto"),
    probe_fraction (of the horizon spent on the probing run), probe_every (training steps between probes),
    eta (probe step, in learning-rate units along the optimizer's update), granularity of the groups,
    cuda_graph (replay the probe's forward passes from a CUDA graph), slope ("fit" or "autograd": b from
    the five points or from one backward pass), compute ("model" or "float32": the probe's forward passes of a
    16-bit model in float32), step_policy ("adaptive": each group's own step; "fixed": every group at eta, as
    in the paper), points (5, or 3 with slope="autograd": 2K+1 forward passes a probe), reuse_prefix (start each
    group's perturbed passes at its first block: the same numbers, fewer blocks computed); see adapeft.Prober."""

    def __init__(self, budget=0.01, method="exact", probe_fraction=0.1, probe_every=None, eta=None,
                 granularity="type", direction="optimizer", cuda_graph=False, slope="fit", compute="model",
                 step_policy="adaptive", points=5, reuse_prefix=False):
        if not 0 < probe_fraction <= 1:
            raise ValueError(f"adapeft.AdaPEFT: probe_fraction must be in (0, 1], got {probe_fraction}")
        check_settings("adapeft.AdaPEFT", budget, method, granularity, eta, budget_given_later=True)
        self.budget, self.method, self.probe_fraction = budget, method, probe_fraction
        self.probe_every, self.eta, self.granularity, self.direction = probe_every, eta, granularity, direction
        self.cuda_graph, self.slope, self.compute, self.step_policy = cuda_graph, slope, compute, step_policy
        self.points, self.reuse_prefix = points, reuse_prefix

    def probe_steps(self, horizon):
        return max(1, math.ceil(self.probe_fraction * horizon))

    def probe_train(self, model, batches, loss_fn, steps, lr, optimizer_cls=torch.optim.AdamW, on_step=None,
                    on_probe=None, groups=None, compare=None):
        """Phase 2: full fine-tuning of `model` for `steps` steps, probing on schedule; on_probe(batch) runs
        after each probe, with the training gradients still in p.grad. groups: the ParameterGroups of `model` to
        train and probe (default: group_parameters(model, granularity) of these settings). compare: {label:
        Prober options} of other probes run at every probe on the same batch, step and direction, to compare
        settings on one training run (ProbeRun.compared)."""
        if groups is None:
            groups = group_parameters(model, granularity=self.granularity)
        optimizer = optimizer_cls(param_groups(groups, lr=lr))
        interval = self.probe_every or max(1, min(4 * len(groups), steps // 4))
        settings = dict(direction=self.direction, optimizer=optimizer, cuda_graph=self.cuda_graph, slope=self.slope,
                        compute=self.compute, step_policy=self.step_policy, points=self.points,
                        reuse_prefix=self.reuse_prefix)
        prober = Prober(model, groups, loss_fn, schedule=ProbeSchedule(len(groups), interval=interval), **settings)
        run = ProbeRun(prober)
        for label, options in (compare or {}).items():
            run.compared[label] = Prober(model, groups, loss_fn, **{**settings, **options})
            run.compared_seconds[label] = 0.0
        eta = self.eta or lr

        def probe(step, batch):
            if prober.schedule(step) or step == steps - 1 and not prober.history:
                probe_start = time.perf_counter()
                prober.step(batch, eta)
                run.probe_seconds += time.perf_counter() - probe_start
                for label, other in run.compared.items():
                    probe_start = time.perf_counter()
                    other.step(batch, eta)
                    run.compared_seconds[label] += time.perf_counter() - probe_start
                if on_probe is not None:
                    on_probe(batch)

        # Gradients kept in place when probing from a CUDA graph: the graph reads them at fixed addresses.
        _train(model, optimizer, batches, loss_fn, steps, run, on_step, "probe_train", after_backward=probe,
               keep_gradients=self.cuda_graph)
        return run

    def select(self, run_or_prober, budget=None, method=None, **options):
        """Phase 3: the knapsack over the probe's APPI."""
        prober = run_or_prober.prober if isinstance(run_or_prober, ProbeRun) else run_or_prober
        return select(prober, budget=self.budget if budget is None else budget, method=method or self.method,
                      **options)

    @staticmethod
    def train_selected(model, selection, batches, loss_fn, steps, lr, optimizer_cls=torch.optim.AdamW,
                       learning_rates=None, granularity=None, on_step=None, groups=None):
        """Phase 4: train `model` with only the selected groups (matched by name). learning_rates: an
        optional {group name: lr} (e.g. from the probe's eta*) overriding `lr` per group. groups: the
        ParameterGroups of `model` (default: group_parameters(model, granularity), granularity by default the
        selection's, else "type")."""
        if not isinstance(selection, Selection):
            raise TypeError("adapeft.AdaPEFT.train_selected: selection must be an adapeft.Selection")
        if groups is None:
            groups = groups_like(model, granularity or selection.granularity or "type")
        report = selection.apply(model, groups)
        chosen = [name for name in groups.names if name in report["trained"]]
        if not chosen:
            raise ValueError("adapeft.AdaPEFT.train_selected: the selection trains no group")
        rates = learning_rates or {}
        optimizer = optimizer_cls([{"params": groups.params(name), "lr": rates.get(name, lr)} for name in chosen])
        run = TrainRun(trainable=report["trainable_parameters"])
        _train(model, optimizer, batches, loss_fn, steps, run, on_step, "train_selected")
        return run


def _batch_stream(batches, steps, caller):
    """`batches` for `steps` steps: a re-iterable (list, DataLoader) epoch after epoch, an iterator once;
    running out is an error that says so, rather than a bare StopIteration."""
    try:
        one_shot = iter(batches) is batches
    except TypeError:
        raise TypeError(f"adapeft.AdaPEFT.{caller}: batches must be an iterable of batches (a list, a DataLoader "
                        f"or an iterator), got {type(batches).__name__}") from None
    served = 0
    while True:
        before = served
        for batch in batches:
            yield batch
            served += 1
        if one_shot or served == before:
            what = "an iterator" if one_shot else "an empty iterable"
            raise ValueError(f"adapeft.AdaPEFT.{caller}: batches ran out after {served} of {steps} steps ({what}); "
                             "pass a list or DataLoader, which is gone through again as often as needed, or an "
                             f"iterator of at least {steps} batches")


def _train(model, optimizer, batches, loss_fn, steps, run, on_step, caller, after_backward=None,
           keep_gradients=False):
    """The training loop of both phases: run.losses and run.seconds filled in; after_backward(step, batch)
    runs between the backward pass and the optimizer step. The losses stay on the device (one float64 a
    step) until the loop ends, so that the host can queue the next step while the device runs this one:
    the loop itself waits for the device only at its end, and at every step only when on_step asks for the
    loss as a number."""
    start = time.perf_counter()
    model.train()
    losses = None  # float64 holds every loss dtype's values exactly, as .item() would give them
    for step, batch in zip(range(steps), _batch_stream(batches, steps, caller)):
        optimizer.zero_grad(set_to_none=not keep_gradients)
        loss = loss_fn(model, batch)
        loss.backward()
        if after_backward is not None:
            after_backward(step, batch)
        optimizer.step()
        if losses is None:
            losses = torch.empty(steps, dtype=torch.float64, device=loss.device)
        losses[step] = loss.detach()
        if on_step is not None:
            on_step(step, losses[step].item())
    run.losses = losses.tolist() if losses is not None else []
    run.seconds = time.perf_counter() - start


def hessian_informed_rates(prober, base_lr, clip=(0.5, 2.0)):
    """Per-group learning rates from the last accepted eta* of each group, clipped to [lr/2, 2 lr] as GeN
    does; groups never accepted keep `base_lr`."""
    rates = {}
    low, high = clip
    for name in prober.names:
        rates[name] = base_lr
    for name, star in zip(prober.names, prober.last_eta_star.tolist()):
        if math.isfinite(star):
            rates[name] = min(max(star, low * base_lr), high * base_lr)
    return rates
