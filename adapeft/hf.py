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
from .groups import group_parameters
from .phase import ProbingPhase, WithProbingPhase

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


class AdaPEFTCallback(WithProbingPhase, TrainerCallback):
    """Probe and select inside a Hugging Face Trainer (see the module docstring).

    budget, method: the selection made when probing ends; probe_fraction: share of max_steps spent
    probing; every: steps between probes (default: 4 x groups, the paper's lazy schedule, capped so the
    phase holds four probes); eta: the probe step (default: the learning rate); direction: "optimizer"
    (the optimizer's next update, read from its state) or "grad"; granularity / rules: as
    adapeft.group_parameters; loss_fn(model, batch): default `model(**batch).loss`;
    manage_adalora: "auto" calls AdaLoRA's update_and_allocate when the model uses it; reuse_prefix: as
    adapeft.Prober's (the same numbers from fewer blocks computed); horizon: the steps the selection will train
    for, to value each probe by what that many steps at its eta reach (adapeft.select's horizon=; None: the
    paper's values); trainable_only: group only the parameters that train (as group_parameters'), so that on a
    peft model the budget is a share of the adapters rather than of the whole model (freeze_to then takes
    trainable_only=True too). A bad budget, method, granularity, rules, trainable_only, eta, probe_fraction, every,
    direction or horizon is refused here, not when the phase ends; a selection of nothing is warned of, with why.
    """

    def __init__(self, budget=0.01, method="exact", probe_fraction=0.1, every=None, eta=None, direction="optimizer",
                 granularity="type", rules=None, loss_fn=None, output_dir=None, manage_adalora="auto",
                 reuse_prefix=False, horizon=None, trainable_only=False):
        self.phase = ProbingPhase("adapeft.AdaPEFTCallback", budget, method, probe_fraction, every, eta, direction,
                                  granularity, rules, reuse_prefix, horizon, trainable_only)
        self.loss_fn = loss_fn or _model_loss
        self.output_dir, self.manage_adalora = output_dir, manage_adalora
        self.trainer = None
        self._batch = None
        self._capturing = True
        self._hook = None
        self._pending = None
        self._adalora = False

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
        self.phase.begin(model, state.max_steps)
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._adalora = self.manage_adalora == "auto" and _is_adalora(model)
        self._output_dir = self.output_dir or args.output_dir

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.phase.due(state.global_step):
            return
        if self._batch is None:
            self.phase.why_not.append("no training batch reached the model's forward with keyword arguments")
            return
        self._capturing = False
        try:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
            self._pending = self.phase.probe(model, self.loss_fn, self._batch, inner, args.learning_rate)
        finally:
            self._capturing = True

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
        if state.global_step >= self.phase.last_step and not self.phase.done:
            self.phase.finish(self._output_dir, state.is_world_process_zero)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.phase.done:
            self.phase.finish(self._output_dir, state.is_world_process_zero)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def freeze_to(selection, model, granularity="type", rules=None, trainable_only=False):
    """Apply a selection to a (larger) model before training it: exactly the chosen groups train. Group it as
    the selection's model was (granularity, rules, trainable_only: that of a callback with trainable_only=True)."""
    return selection.apply(model, group_parameters(model, granularity=granularity, rules=rules,
                                                   trainable_only=trainable_only))

