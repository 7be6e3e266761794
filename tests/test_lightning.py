"""The PyTorch Lightning callback: probes inside trainer.fit() on the step's batch, logs, selects, writes the
reports, and leaves training exactly as it would have been without it."""
import json
import warnings

import pytest
import torch

import adapeft
from adapeft.apps import inputs
from adapeft.ops import backend as _backend

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
L = pytest.importorskip("lightning.pytorch")
from adapeft.lightning import AdaPEFTCallback  # noqa: E402


class Regressor(L.LightningModule):
    """A small LoRA-like regressor: a frozen base, adapter factors, a norm and a head."""

    def __init__(self, logs=None):
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(8, 16)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(8, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, 16, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.1)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 1)
        self.logs = logs

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.base(x) + self.lora_B(self.lora_A(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def log(self, name, value, *args, **kwargs):
        if self.logs is not None and name == "train_loss":
            self.logs.append(value.item())
        super().log(name, value, *args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x.sum(-1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(module, folder, callbacks=(), steps=8):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(folder),
                        callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|log_every_n_steps).*")
        trainer.fit(module, loader())
    return trainer


class SquaredGradients(L.Callback):
    """Each group's |g|^2 summed over the optimizer steps `steps`, from the gradients the optimizer is given."""

    def __init__(self, granularity, steps):
        self.granularity, self.steps, self.totals = granularity, steps, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            groups = adapeft.group_parameters(pl_module, self.granularity)
            values = [sum(float(p.grad.double().square().sum()) for p in groups.params(name) if p.grad is not None)
                      for name in groups.names]
            self.totals = values if self.totals is None else [a + b for a, b in zip(self.totals, values)]


def test_callback_probes_selects_and_leaves_training_unchanged(tmp_path):
    plain = Regressor()
    fit(plain, tmp_path / "plain")
    logs = []
    module = Regressor(logs)
    callback = AdaPEFTCallback(budget=0.5, probe_fraction=0.5, every=2, granularity="module")
    gradients = SquaredGradients("module", steps=(0, 2))
    trainer = fit(module, tmp_path / "probed", [callback, gradients])
    assert callback.prober is not None and len(callback.prober.history) == 2  # steps 0 and 2 of the first 4
    assert callback.prober.names == adapeft.group_parameters(module, "module").names
    # the probe's own training_step calls are not logged: one train_loss a training step
    assert len(logs) == 8 and callback.prober.forward_passes > 2 * 21
    # training is bit for bit what it is without the callback
    for (name, a), b in zip(plain.named_parameters(), module.parameters()):
        assert torch.equal(a, b), name
    logged = trainer.callback_metrics
    assert all(f"adapeft/appi/{name}" in logged for name in callback.prober.names)
    assert torch.equal(logged["adapeft/appi/head"].double(), callback.prober.appi[callback.prober.names.index("head")]
                       .double().to(logged["adapeft/appi/head"].dtype).double())
    assert callback.selection is not None and callback.selection.count <= 0.5 * callback.selection.total
    saved = adapeft.Selection.load(tmp_path / "probed" / "adapeft_selection.json")
    assert saved.chosen == callback.selection.chosen
    probe = json.loads((tmp_path / "probed" / "adapeft_probe.json").read_text())
    assert probe["groups"] == callback.prober.names and len(probe["ppi_history"]) == 2
    # what adapeft select --horizon and --values squared-gradient read: each probe's eta (the optimizer's rate) and
    # the groups' |g|^2 at the probe steps
    assert [entry["eta"] for entry in probe["probe_history"]] == [1e-2, 1e-2]
    assert probe["squared_gradient"] == pytest.approx(gradients.totals, rel=1e-12, abs=0)
    assert sum(value > 0 for value in probe["squared_gradient"]) >= 4  # the frozen base has none
    assert inputs.horizon_values(probe, 20, "p.json") == pytest.approx(
        adapeft.select(callback.prober, budget=0.5, horizon=20).values, rel=1e-12, abs=0)


def test_callback_with_a_loss_fn_and_the_errors_it_gives(tmp_path):
    seen = []

    def loss_fn(module, batch):
        seen.append(len(batch[0]))
        x, y = batch
        return torch.nn.functional.mse_loss(module(x).squeeze(-1), y)

    callback = AdaPEFTCallback(budget=0.5, probe_fraction=1.0, every=4, loss_fn=loss_fn, direction="grad",
                               output_dir=str(tmp_path / "reports"))
    fit(Regressor(), tmp_path, [callback])
    assert len(callback.prober.history) == 2 and seen and set(seen) == {8}
    assert (tmp_path / "reports" / "adapeft_selection.json").exists()

    class NoLoss(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)["loss"]
            if torch.is_grad_enabled():
                return loss
            return {"log": loss}  # what the probe sees: no loss

    with pytest.raises(RuntimeError, match="training_step returned no loss to probe"):
        fit(NoLoss(), tmp_path / "none", [AdaPEFTCallback(every=1, probe_fraction=1.0)])
    # every setting refused when the callback is made, not when its phase ends
    for options, argument in (({"probe_fraction": 0}, "probe_fraction"), ({"every": 0}, "every"),
                              ({"direction": "adam"}, "direction"), ({"budget": 5}, "budget"),
                              ({"method": "best"}, "method"), ({"budget": None}, "method='exact' needs a budget"),
                              ({"granularity": "row"}, "granularity"), ({"eta": 0.0}, "eta")):
        with pytest.raises(ValueError, match=f"adapeft.lightning.AdaPEFTCallback: {argument}"):
            AdaPEFTCallback(**options)
    for options, argument in (({"rules": "bias"}, "rules"), ({"rules": {"head": "head"}}, "rules"),
                              ({"trainable_only": "yes"}, "trainable_only")):
        with pytest.raises(TypeError, match=f"adapeft.lightning.AdaPEFTCallback: {argument} must be"):
            AdaPEFTCallback(**options)


def test_callback_warns_when_it_never_probes(tmp_path):
    class NoGradients(Regressor):
        def on_after_backward(self):
            for p in self.parameters():
                p.grad = None

    callback = AdaPEFTCallback(budget=0.5, probe_fraction=0.5, every=1, granularity="module")
    with pytest.warns(UserWarning, match="never probed: no parameter had a gradient at the probe steps"):
        fit(NoGradients(), tmp_path, [callback], steps=4)
    assert callback.selection is None


class RankReports(AdaPEFTCallback):
    """Saves what each rank ended with (ddp_spawn runs the fit in processes of its own)."""

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save({"world": trainer.world_size, "appi": self.prober.appi.clone(), "chosen": self.selection.chosen,
                    "probes": len(self.prober.history), "batch": self._batch[0].clone()},
                   f"{trainer.default_root_dir}/rank{trainer.global_rank}.pt")


def test_callback_under_ddp_agrees_across_ranks(tmp_path):
    callback = RankReports(budget=0.5, probe_fraction=0.5, every=2, granularity="module")
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regressor(), loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(out["world"] == 2 and out["probes"] == 2 for out in ranks)
    assert not torch.equal(ranks[0]["batch"], ranks[1]["batch"])  # each rank probes on its own batch
    # every rank fits the global batch's losses: the same APPI, bit for bit, and the same choice
    assert torch.equal(ranks[0]["appi"], ranks[1]["appi"]) and ranks[0]["chosen"] == ranks[1]["chosen"]
    assert (tmp_path / "adapeft_selection.json").exists()  # written once, by rank 0
