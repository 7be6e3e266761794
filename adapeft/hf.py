"""Hugging Face Trainer integration: probe inside `trainer.train()`.

    callback = adapeft.hf.AdaPEFTCallback(budget=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    callback.attach(trainer)          # optional: metrics then go through trainer.log (TensorBoard, ...)
    trainer.train()
    callback.selection                # also written to <output_dir>/adapeft_selection.json

During the probing phase (the first `probe_fraction` of the run) the callback probes every `every` steps,
after the gradients are ready and before the optimizer steps, on the batch of that step; it logs PPI and
APPI per group, and when the phase ends it selects the groups and writes the selection. It calls peft
AdaLoRA's `update_and_allocate` after each optimizer step (the Trainer does not, and forgetting it is a
known pitfall), and warns if it was never able to probe.
"""
import json
import math
import os
import warnings

from .groups import group_parameters
from .probe import Prober, ProbeSchedule
from .probe.distributed import is_sharded

try:
    from transformers import TrainerCallback
except ImportError as error:  # the integration needs transformers; the rest of adapeft does not
    raise ImportError("adapeft.hf needs transformers: pip install transformers") from error


def _model_loss(model, batch):
    return model(**batch).loss


def _is_adalora(model):
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict):
        return False
    return any(type(c).__name__ == "AdaLoraConfig" for c in config.values())


class AdaPEFTCallback(TrainerCallback):
    """Probe and select inside a Hugging Face Trainer (see the module docstring).

    budget, method: the selection made when probing ends; probe_fraction: share of max_steps spent
    probing; every: steps between probes (default: 4 x groups, the paper's lazy schedule, capped so the
    phase holds four probes); eta: the probe step (default: the learning rate); direction: "optimizer"
    (the optimizer's next update, read from its state) or "grad"; granularity / rules: as
    adapeft.group_parameters; loss_fn(model, batch): default `model(**batch).loss`;
    manage_adalora: "auto" calls AdaLoRA's update_and_allocate when the model uses it; reuse_prefix: as
    adapeft.Prober's (the same numbers from fewer blocks computed).
    """

    def __init__(self, budget=0.01, method="exact", probe_fraction=0.1, every=None, eta=None, direction="optimizer",
                 granularity="type", rules=None, loss_fn=None, output_dir=None, manage_adalora="auto",
                 reuse_prefix=False):
        self.budget, self.method, self.probe_fraction, self.every = budget, method, probe_fraction, every
        self.eta, self.direction, self.granularity, self.rules = eta, direction, granularity, rules
        self.loss_fn = loss_fn or _model_loss
        self.output_dir, self.manage_adalora, self.reuse_prefix = output_dir, manage_adalora, reuse_prefix
        self.trainer = None
        self.prober = None
        self.selection = None
        self._done = False
        self._batch = None
        self._capturing = True
        self._hook = None
        self._last_step = 0
        self._pending = None
        self._adalora = False
        self._why_not = []

    def attach(self, trainer):
        """Log through trainer.log (so every logging integration sees the metrics)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # Capture the batch of the training step: the Trainer does not hand it to callbacks.
    def _capture(self, module, args, kwargs):
        if self._capturing and module.training:
            self._batch = dict(kwargs) if kwargs else None
        return None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        groups = group_parameters(model, granularity=self.granularity, rules=self.rules)
        self._groups = groups
        self._model = model
        self._last_step = max(1, math.ceil(self.probe_fraction * max(state.max_steps, 1)))
        every = self.every or max(1, min(4 * len(groups), self._last_step // 4))
        self._schedule = ProbeSchedule(len(groups), interval=every, stop=self._last_step)
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._adalora = self.manage_adalora == "auto" and _is_adalora(model)
        self._output_dir = self.output_dir or args.output_dir

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._schedule(state.global_step):
            return
        if self._batch is None:
            self._why_not.append("no training batch reached the model's forward with keyword arguments")
            return
        if self.prober is None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
            self.prober = Prober(model, self._groups, self.loss_fn, direction=self.direction,
                                 optimizer=inner if self.direction == "optimizer" else None, schedule=self._schedule,
                                 process_group=_data_parallel_group(model), reuse_prefix=self.reuse_prefix)
        eta = self.eta or args.learning_rate
        self._capturing = False
        try:
            result = self.prober.step(self._batch, eta)
        except RuntimeError as error:
            if "no group has a direction" not in str(error):
                raise
            self._why_not.append("no parameter had a gradient at the probe steps")
            return
        finally:
            self._capturing = True
        appi = self.prober.appi.cpu().tolist()
        metrics = {}
        for name, ppi, total in zip(self.prober.names, result.ppi.cpu().tolist(), appi):
            metrics[f"adapeft/ppi/{name}"] = ppi
            metrics[f"adapeft/appi/{name}"] = total
        self._pending = metrics

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._adalora:
            model.base_model.update_and_allocate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            metrics, self._pending = self._pending, None
            if self.trainer is not None:
                self.trainer.log(metrics)
            else:
                state.log_history.append({**metrics, "step": state.global_step})
        if state.global_step >= self._last_step and not self._done:
            self._finish_probing(state.is_world_process_zero)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._done:
            self._finish_probing(state.is_world_process_zero)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _finish_probing(self, writes_reports=True):
        self._done = True
        if self.prober is None or not self.prober.history:
            why = "; ".join(dict.fromkeys(self._why_not)) or "no probe step was reached (is max_steps set?)"
            warnings.warn(f"adapeft.AdaPEFTCallback never probed: {why}. Check that loss.backward() leaves "
                          "gradients in the parameters at the optimizer step, and that the probing phase "
                          f"(probe_fraction={self.probe_fraction}) holds a probe step.", UserWarning, stacklevel=2)
            return
        from .select import select
        self.prober.flush()
        self.selection = select(self.prober, budget=self.budget, method=self.method)
        if self._output_dir and writes_reports:  # every rank holds the same selection; one writes it
            os.makedirs(self._output_dir, exist_ok=True)
            self.selection.save(os.path.join(self._output_dir, "adapeft_selection.json"))
            history = [h.cpu().tolist() for h in self.prober.history]
            with open(os.path.join(self._output_dir, "adapeft_probe.json"), "w") as handle:
                json.dump({"format": "adapeft.probe/1", "groups": self.prober.names,
                           "counts": self.prober.groups.numel, "appi": self.prober.appi.cpu().tolist(),
                           "ppi_history": history}, handle, indent=2)


def _data_parallel_group(model):
    """The Trainer hands callbacks the unwrapped model, also under torchrun/accelerate data parallelism,
    where every rank sees its own batch: probe with the whole world then (FSDP2's sharded parameters name
    their own group)."""
    import torch.distributed as dist
    if any(is_sharded(p) for p in model.parameters()):
        return "auto"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return "auto"


def freeze_to(selection, model, granularity="type", rules=None):
    """Apply a selection to a (larger) model before training it: exactly the chosen groups train."""
    return selection.apply(model, group_parameters(model, granularity=granularity, rules=rules))

