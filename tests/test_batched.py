"""backend="batched": each group's points of a round in one vmapped forward pass, against the compiled probe (the
same weights at every point, the losses to rounding), with the passes it saves, a failing loss, dropout, and the
options it refuses."""
import warnings

import pytest
import torch

import adapeft
from adapeft import causal_lm_loss
from adapeft.ops import backend as _backend
from test_prefix import interrupted_at, probed_model, same_bits

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")


@pytest.mark.parametrize("architecture, granularity", [("llama", "module"), ("qwen2", "layer"), ("gpt2", "type")])
@pytest.mark.parametrize("points", [5, 3])
def test_batched_points_measure_what_sequential_passes_measure(architecture, granularity, points):
    model, groups, batch = probed_model(architecture, granularity, seed=len(architecture))
    before = [p.detach().clone() for p in model.parameters()]
    options = {"points": 3, "slope": "autograd"} if points == 3 else {}
    sequential = adapeft.Prober(model, groups, causal_lm_loss, step_policy="fixed", **options)
    batched = adapeft.Prober(model, groups, causal_lm_loss, step_policy="fixed", backend="batched", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            want, got = sequential.step(batch, 1e-3), batched.step(batch, 1e-3)
            # float64 model: the batched reduction order moves the losses by a few ulps at most
            torch.testing.assert_close(got.losses, want.losses, rtol=1e-13, atol=0, equal_nan=True)
            torch.testing.assert_close(got.steps, want.steps, rtol=1e-13, atol=0, equal_nan=True)
            assert torch.equal(got.changed, want.changed) and torch.equal(got.verdict, want.verdict)
            torch.testing.assert_close(got.b, want.b, rtol=1e-6, atol=1e-12, equal_nan=True)
            torch.testing.assert_close(got.A, want.A, rtol=1e-4, atol=1e-9, equal_nan=True)
    assert all(same_bits(a, b.detach()) for a, b in zip(before, model.parameters()))  # never moved
    k = len(groups.names)
    per_group = 1 if points == 3 else 2  # the inner points, then the outer ones, one pass each
    assert sequential.forward_passes == 2 * (1 + (points - 1) * k)
    assert batched.forward_passes == 2 * (1 + per_group * k)
    assert batched.backward_passes == sequential.backward_passes


def test_a_failing_loss_and_dropout_under_batched_points():
    model, groups, batch = probed_model("llama", "module")
    before = [p.detach().clone() for p in model.parameters()]
    failing, calls = interrupted_at(5)
    with pytest.raises(KeyboardInterrupt):
        adapeft.Prober(model, groups, failing, backend="batched").step(batch, 1e-3)
    assert calls["n"] == 5 and all(same_bits(a, b.detach()) for a, b in zip(before, model.parameters()))
    # In train mode with dropout every point of a pass sees the same mask (randomness="same").
    model.config.attention_dropout = 0.5
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = adapeft.Prober(model, groups, causal_lm_loss, backend="batched").step(batch, 1e-3)
    assert torch.isfinite(result.losses[:, 1:4]).all()


def test_batched_points_refuse_what_they_cannot_do():
    model, groups, _ = probed_model("llama", "module")
    with pytest.raises(ValueError, match="backend='batched' runs alone: not with reuse_prefix=True"):
        adapeft.Prober(model, groups, causal_lm_loss, backend="batched", reuse_prefix=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs backend='compiled'"):
        adapeft.Prober(model, groups, causal_lm_loss, backend="batched", cuda_graph=True)
    with pytest.raises(ValueError, match="backend must be one of .*'batched'"):
        adapeft.Prober(model, groups, causal_lm_loss, backend="vmap")
