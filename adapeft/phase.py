"""The probing phase a training-framework callback runs: probe every few optimizer steps on that step's batch,
select when the phase ends, write the reports. adapeft.hf (the Hugging Face Trainer) and adapeft.lightning
(PyTorch Lightning) hand it their framework's model, batch, optimizer and step; it owns what they share.
"""
import json
import math
import os
import warnings

import torch

from .groups import group_parameters
from .llm import lora_rank
from .probe import Prober, ProbeSchedule
from .record import probe_record
from .signals import squared_gradient
from .select import NOTHING_OF_VALUE, check_horizon, check_settings, nothing_fits_note, select
from .probe.distributed import is_sharded


class ProbingPhase:
    """See adapeft.hf.AdaPEFTCallback for the options. `owner`: the callback's name for messages."""

    def __init__(self, owner, budget, method, probe_fraction, every, eta, direction, granularity, rules,
                 reuse_prefix, horizon=None, trainable_only=False):
        check_settings(owner, budget, method, granularity, eta, rules=rules, trainable_only=trainable_only)
        if not 0 < probe_fraction <= 1:
            raise ValueError(f"{owner}: probe_fraction must be in (0, 1], got {probe_fraction!r}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"{owner}: every must be a whole number of steps >= 1 or None, got {every!r}")
        if direction not in ("optimizer", "grad"):
            raise ValueError(f"{owner}: direction must be 'optimizer' or 'grad', got {direction!r}")
        self.owner, self.budget, self.method, self.probe_fraction, self.every = owner, budget, method, probe_fraction, every
        self.eta, self.direction, self.granularity, self.rules = eta, direction, granularity, rules
        if horizon is not None:
            check_horizon(horizon, owner)
        self.reuse_prefix, self.horizon, self.trainable_only = reuse_prefix, horizon, trainable_only
        self.prober = self.selection = self.groups = self.parts = self.schedule = self.squared_gradient = None
        self.last_step = 0
        self.done = False
        self.why_not = []

    def begin(self, model, max_steps):
        """At the start of training: the groups and the schedule (the phase is the first probe_fraction of
        max_steps optimizer steps)."""
        self.groups = group_parameters(model, granularity=self.granularity, rules=self.rules,
                                       trainable_only=self.trainable_only)
        # LoRA's factors probed apart (together, their product's cross term bends the curvature negative) and chosen
        # together, as `adapeft probe` does: a no-op where the groups already keep them apart.
        self.parts = self.groups.split_factors()
        self.last_step = max(1, math.ceil(self.probe_fraction * max(max_steps, 1)))
        every = self.every or max(1, min(4 * len(self.parts), self.last_step // 4))
        self.schedule = ProbeSchedule(len(self.parts), interval=every, stop=self.last_step)
        # The free signal the records of `adapeft probe` keep beside the probe's: |g|^2 a group at the probe steps.
        self.squared_gradient = torch.zeros(len(self.groups), dtype=torch.float64)

    def due(self, step):
        return self.schedule is not None and not self.done and self.schedule(step)

    def probe(self, model, loss_fn, batch, optimizer, eta):
        """One probe at this optimizer step (gradients ready, the optimizer not yet stepped): the metrics to log,
        {"adapeft/ppi/<group>": ..., "adapeft/appi/<group>": ...}, or None where it could not probe."""
        if batch is None:
            self.why_not.append("no training batch was seen before the optimizer step")
            return None
        if self.prober is None:
            self.prober = Prober(model, self.parts, loss_fn, direction=self.direction,
                                 optimizer=optimizer if self.direction == "optimizer" else None,
                                 schedule=self.schedule, process_group=data_parallel_group(model),
                                 reuse_prefix=self.reuse_prefix)
        try:
            result = self.prober.step(batch, self.eta or eta)
        except RuntimeError as error:
            if "no group has a direction" not in str(error):
                raise
            self.why_not.append("no parameter had a gradient at the probe steps")
            return None
        # The probe leaves p.grad as the training's backward pass left it, for the optimizer step to come.
        self.squared_gradient += squared_gradient(self.groups)
        metrics = {}
        for name, ppi, total in zip(self.prober.names, result.ppi.cpu().tolist(), self.prober.appi.cpu().tolist()):
            metrics[f"adapeft/ppi/{name}"] = ppi
            metrics[f"adapeft/appi/{name}"] = total
        return metrics

    def finish(self, output_dir, writes_reports=True):
        """End the phase: select (self.selection) and, where writes_reports, write adapeft_selection.json and
        adapeft_probe.json into output_dir; warn instead where no probe ran."""
        self.done = True
        if self.prober is None or not self.prober.history:
            why = "; ".join(dict.fromkeys(self.why_not)) or "no probe step was reached (is the number of steps set?)"
            warnings.warn(f"{self.owner} never probed: {why}. Check that loss.backward() leaves gradients in the "
                          "parameters at the optimizer step, and that the probing phase "
                          f"(probe_fraction={self.probe_fraction}) holds a probe step.", UserWarning, stacklevel=3)
            return None
        self.prober.flush()
        self.selection = select(self.prober, budget=self.budget, method=self.method, horizon=self.horizon,
                                units=self.groups)
        if not self.selection.chosen and writes_reports:
            why = None if self.budget is None else nothing_fits_note(self.selection.values, self.selection.counts,
                                                                     self.selection.names, self.budget)
            frozen = why is not None and not self.trainable_only and not all(p.requires_grad for p in
                                                                             self.prober.model.parameters())
            warnings.warn(f"{self.owner}: the selection trains no group: {why or NOTHING_OF_VALUE}"
                          + (" (the budget is a share of every parameter, frozen ones too: trainable_only=True "
                             "makes it a share of those that train)" if frozen else ""), UserWarning, stacklevel=3)
        if output_dir and writes_reports:  # every rank holds the same selection; one writes it
            os.makedirs(output_dir, exist_ok=True)
            self.selection.save(os.path.join(output_dir, "adapeft_selection.json"))
            record = {"format": "adapeft.probe/1", "granularity": self.granularity, "direction": self.direction,
                      **probe_record(self.prober, self.groups, self.squared_gradient)}
            adapted = {name: self.groups.adapted_modules(name) for name in self.groups.names}
            if any(adapted.values()):  # what `adapeft select` turns into a LoraConfig, at the adapters' rank
                record["adapted_modules"] = adapted
                record["lora_rank"] = lora_rank(self.prober.model)
            with open(os.path.join(output_dir, "adapeft_probe.json"), "w") as handle:
                json.dump(record, handle, indent=2)
        return self.selection


class WithProbingPhase:
    """What a callback built on a ProbingPhase (`self.phase`) exposes: its prober and, once the phase ended, its
    selection (None before)."""

    @property
    def prober(self):
        return self.phase.prober

    @property
    def selection(self):
        return self.phase.selection


def data_parallel_group(model):
    """Frameworks hand callbacks the unwrapped model, also under data parallelism, where every rank sees its own
    batch: probe with the whole world then (FSDP2's sharded parameters name their own group)."""
    import torch.distributed as dist
    if any(is_sharded(p) for p in model.parameters()):
        return "auto"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return "auto"
