"""PyTorch Lightning integration: probe inside `trainer.fit()`.

    callback = adapeft.lightning.AdaPEFTCallback(budget=0.01)
    trainer = lightning.Trainer(max_steps=1000, callbacks=[callback])
    trainer.fit(module, data)
    callback.selection                # also written to <default_root_dir>/adapeft_selection.json

During the probing phase (the first `probe_fraction` of the run's optimizer steps) the callback probes every
`every` steps, after the gradients are ready and before the optimizer steps (`on_before_optimizer_step`), on the
last batch of that step; it logs PPI and APPI per group through `LightningModule.log_dict`, and when the phase ends
it selects the groups and writes the selection (rank 0). The probe measures the loss as
`loss_fn(module, batch)`; by default that is the module's own `training_step(batch, batch_idx)` (its loss, or
the "loss" of the dict it returns) under the trainer's precision, with the module's logging muted, so
`training_step` must not change state other than through `self.log`.
"""
import contextlib

from .phase import ProbingPhase, WithProbingPhase

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as error:  # the integration needs Lightning; the rest of adapeft does not
        raise ImportError("adapeft.lightning needs PyTorch Lightning: pip install lightning") from error


class AdaPEFTCallback(WithProbingPhase, Callback):
    """Probe and select inside a Lightning Trainer (see the module docstring). The options are those of
    adapeft.hf.AdaPEFTCallback; eta defaults to the optimizer's learning rate (its first parameter group's);
    output_dir defaults to the trainer's default_root_dir. loss_fn(module, batch): see the module docstring."""

    def __init__(self, budget=0.01, method="exact", probe_fraction=0.1, every=None, eta=None, direction="optimizer",
                 granularity="type", rules=None, loss_fn=None, output_dir=None, reuse_prefix=False, horizon=None,
                 trainable_only=False):
        self.phase = ProbingPhase("adapeft.lightning.AdaPEFTCallback", budget, method, probe_fraction, every, eta,
                                  direction, granularity, rules, reuse_prefix, horizon, trainable_only)
        self.loss_fn, self.output_dir = loss_fn, output_dir
        self._batch = self._batch_idx = self._trainer = None
        self._pending = None

    def _training_step_loss(self, module, batch):
        """The module's training_step loss under the trainer's precision, its self.log calls muted."""
        precision = self._trainer.strategy.precision_plugin
        muted = {"log": lambda *args, **kwargs: None, "log_dict": lambda *args, **kwargs: None}
        own = {name: module.__dict__[name] for name in muted if name in module.__dict__}
        module.__dict__.update(muted)
        try:
            with precision.forward_context() if hasattr(precision, "forward_context") else contextlib.nullcontext():
                out = module.training_step(batch, self._batch_idx)
        finally:
            for name in muted:
                del module.__dict__[name]
            module.__dict__.update(own)
        loss = out.get("loss") if isinstance(out, dict) else out
        if loss is None:
            raise ValueError("adapeft.lightning.AdaPEFTCallback: training_step returned no loss to probe (None or a "
                             "dict without 'loss'); pass loss_fn=(module, batch) -> loss")
        return loss

    def on_fit_start(self, trainer, pl_module):
        self._trainer = trainer
        self.phase.begin(pl_module, trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch, self._batch_idx = batch, batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.phase.due(trainer.global_step):
            return
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the optimizer
        eta = inner.param_groups[0]["lr"]
        self._pending = self.phase.probe(pl_module, self.loss_fn or self._training_step_loss, self._batch, inner, eta)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._pending is not None:
            metrics, self._pending = self._pending, None
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if trainer.global_step >= self.phase.last_step and not self.phase.done:
            self.phase.finish(self.output_dir or trainer.default_root_dir, trainer.is_global_zero)

    def on_train_end(self, trainer, pl_module):
        if not self.phase.done:
            self.phase.finish(self.output_dir or trainer.default_root_dir, trainer.is_global_zero)
