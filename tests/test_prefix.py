"""Prefix reuse (Prober(reuse_prefix=True)): the same probe, bit for bit, on tiny Llama, Qwen2 and GPT-2 models at
module, layer and type granularity; where each group starts; the boundaries kept under a memory cap against brute
force; the blocks it really skips; and the cases it must refuse (no block stack, a loss that reads every block's
output) with full passes and a warning."""
import contextlib
import itertools
import random
import warnings

import pytest
import torch

import adapeft
from adapeft import causal_lm_loss, group_parameters
from adapeft.ops import backend as _backend
from adapeft.probe.prefix import kept_boundaries
from test_llm import tiny, with_lora_everywhere
from test_probe import assert_same_probe

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FIELDS = ("b", "A", "r2", "accepted", "ppi", "eta_star", "reliable", "resolved", "losses", "steps", "changed", "scale",
          "verdict", "b_fit", "noise", "resolution", "b_error", "A_error")


def probed_model(architecture, granularity, dtype=torch.float64, device="cpu", seed=0):
    model = tiny(architecture, seed)
    if granularity == "module":
        model = with_lora_everywhere(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # else lora_A's direction is zero
        model = model.to(device, dtype)
        groups = group_parameters(model, "module", trainable_only=True)
    else:
        model = model.to(device, dtype)
        groups = group_parameters(model, granularity)
    batch = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    causal_lm_loss(model, batch).backward()
    return model, groups, batch


def same_bits(x, y):
    if x.dtype.is_floating_point:
        return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    return torch.equal(x, y)


def probes(model, groups, batch, steps=2, **options):
    prober = adapeft.Prober(model, groups, causal_lm_loss, **options)
    return prober, [prober.step(batch, 1e-3) for _ in range(steps)]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("granularity", ["module", "layer", "type"])
def test_reused_prefixes_give_the_full_probe_bit_for_bit(architecture, granularity):
    model, groups, batch = probed_model(architecture, granularity, seed=len(architecture))
    before = [p.detach().clone() for p in model.parameters()]
    _, full = probes(model, groups, batch)
    prober, reused = probes(model, groups, batch, reuse_prefix=True)
    for got, want in zip(reused, full):
        for field in FIELDS:
            assert same_bits(getattr(got, field), getattr(want, field)), field
    assert same_bits(prober.appi, torch.zeros_like(prober.appi) + full[0].ppi + full[1].ppi)
    assert all(same_bits(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert all("forward" not in block.__dict__ for block in prober.prefix.blocks)
    assert prober.prefix.disabled is None and prober.prefix.blocks is not None
    tied = architecture == "gpt2"  # GPT-2 ties its head to the embedding: used before block 0
    if granularity == "module":
        assert {name: prober.prefix.starts[name] for name in groups.names} == \
            {name: int(name.rsplit("@", 1)[1]) for name in groups.names}
        assert prober.prefix.kept == (1, 2, 3) and prober.prefix.block_share() == pytest.approx(0.625)
    elif granularity == "layer":
        assert prober.prefix.starts["embed"] == 0 and prober.prefix.starts["norm"] == 4  # the final norm
        assert all(prober.prefix.starts[name] == int(name.rsplit("@", 1)[1]) for name in groups.names if "@" in name)
        assert prober.prefix.kept == (1, 2, 3, 4)
    else:
        assert prober.prefix.kept == (() if tied else (4,))  # only an untied head skips anything
        assert ("head" in groups.names) != tied and prober.prefix.starts.get("head", 4) == 4
    assert prober.prefix.nbytes == len(prober.prefix.kept) * 3 * 11 * 16 * 8


def test_three_points_reuse_prefixes_bit_for_bit():
    model, groups, batch = probed_model("qwen2", "module")
    _, full = probes(model, groups, batch, points=3, slope="autograd")
    _, reused = probes(model, groups, batch, points=3, slope="autograd", reuse_prefix=True)
    for got, want in zip(reused, full):
        assert all(same_bits(getattr(got, field), getattr(want, field)) for field in FIELDS)


def test_blocks_are_really_skipped_and_the_slope_pass_is_whole():
    """Each block computes once per unperturbed pass and once per perturbed pass of a group that starts at or
    before it (counted by its attention's calls); slope='autograd''s backward pass runs every block."""
    model, groups, batch = probed_model("llama", "module")
    calls = [0] * 4
    for i, block in enumerate(model.base_model.model.model.layers):
        block.self_attn.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    prober = adapeft.Prober(model, groups, causal_lm_loss, reuse_prefix=True, step_policy="fixed",
                            slope="autograd")
    prober.step(batch, 1e-3)  # the first step also runs the traced pass and the check (3 passes)
    calls[:] = [0] * 4
    prober.step(batch, 1e-3)
    per_block = 7 * 4  # groups that start at each block, 4 perturbed passes each
    assert calls == [1 + 1 + per_block * (i + 1) for i in range(4)]  # slope pass + unperturbed + groups up to i


def test_memory_cap_keeps_the_boundaries_that_skip_most_and_changes_no_number():
    model, groups, batch = probed_model("llama", "layer")
    _, full = probes(model, groups, batch, steps=1)
    one_output = 3 * 11 * 16 * 8
    # two groups start at each of blocks 1-4 (a block's norms, its other tensors; the final norm and the head)
    for cap, count, most_skipped in ((0, 0, 0), (one_output, 1, 12), (2 * one_output + 5, 2, 16), (None, 4, 20)):
        prober, (got,) = probes(model, groups, batch, steps=1, reuse_prefix=True, prefix_memory=cap)
        kept = prober.prefix.kept
        assert len(kept) == count and prober.prefix.nbytes == count * one_output
        assert skipped(prober.prefix.starts.values(), kept) == most_skipped
        assert all(same_bits(getattr(got, field), getattr(full[0], field)) for field in FIELDS)
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="prefix_memory"):
            adapeft.Prober(model, groups, causal_lm_loss, reuse_prefix=True, prefix_memory=bad)
    with pytest.raises(ValueError, match="prefix_memory .* needs reuse_prefix=True"):
        adapeft.Prober(model, groups, causal_lm_loss, prefix_memory=10)


def skipped(starts, kept):
    return sum(max((b for b in kept if b <= s), default=0) for s in starts)


def test_kept_boundaries_against_brute_force_with_ties():
    rng = random.Random(7)
    for _ in range(300):
        starts = [rng.choice([0, 1, 2, 3, 3, 5, 8, 8, 9]) for _ in range(rng.randint(0, 9))]
        candidates = sorted({s for s in starts if s > 0})
        for most in range(0, len(candidates) + 2):
            got = kept_boundaries(starts, most)
            assert len(got) <= most and set(got) <= set(candidates) and list(got) == sorted(got)
            best = max((skipped(starts, subset), -len(subset)) for size in range(min(most, len(candidates)) + 1)
                       for subset in itertools.combinations(candidates, size))
            assert (skipped(starts, got), -len(got)) == best, (starts, most, got)


def test_no_block_stack_warns_and_probes_in_full():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    batch = torch.randn(6, 4, dtype=torch.float64)

    def loss_fn(model, batch):
        return model(batch).square().mean()

    loss_fn(model, batch).backward()
    with pytest.warns(UserWarning, match="no stack of blocks .* full forward passes"):
        prober = adapeft.Prober(model, None, loss_fn, reuse_prefix=True)
    got, want = prober.step(batch, 1e-3), adapeft.Prober(model, None, loss_fn).step(batch, 1e-3)
    assert all(same_bits(getattr(got, field), getattr(want, field)) for field in FIELDS)
    assert prober.prefix.block_share() == 1.0


def test_a_loss_that_reads_every_block_is_caught_by_the_check():
    """A loss of every block's hidden state changes when the early blocks are skipped: the first probe's check
    sees it, warns, and the probe runs full passes (the same numbers as without reuse)."""
    model, groups, batch = probed_model("llama", "module")

    def every_layer_loss(model, batch):
        out = model(input_ids=batch, labels=batch, output_hidden_states=True)
        return out.loss + 1e-3 * sum(h.square().mean() for h in out.hidden_states)

    prober = adapeft.Prober(model, groups, every_layer_loss, reuse_prefix=True)
    with pytest.warns(UserWarning, match="kept output .* is not the full pass's .* residual added outside .*; probing with full forward passes"):
        got = prober.step(batch, 1e-3)
    want = adapeft.Prober(model, groups, every_layer_loss).step(batch, 1e-3)
    assert all(same_bits(getattr(got, field), getattr(want, field)) for field in FIELDS)
    assert prober.prefix.disabled and prober.prefix.block_share() == 1.0


class ResidualOutside(torch.nn.Module):
    """Blocks whose outputs the model adds to their inputs: a block's input is more than the last block's output."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))

    def forward(self, hidden):
        for block in self.blocks:
            hidden = hidden + torch.tanh(block(hidden))
        return hidden.square().mean()


def test_a_residual_outside_the_blocks_is_caught_by_the_check():
    torch.manual_seed(0)
    model, batch = ResidualOutside().double(), torch.randn(5, 6, dtype=torch.float64)
    loss_fn = lambda model, batch: model(batch)  # noqa: E731
    loss_fn(model, batch).backward()
    groups = group_parameters(model, "layer")
    prober = adapeft.Prober(model, groups, loss_fn, reuse_prefix=True)
    with pytest.warns(UserWarning, match="residual added outside the blocks"):
        got = prober.step(batch, 1e-3)
    want = adapeft.Prober(model, groups, loss_fn).step(batch, 1e-3)
    assert all(same_bits(getattr(got, field), getattr(want, field)) for field in FIELDS)


def interrupted_at(n):
    """causal_lm_loss that raises KeyboardInterrupt at its n-th call, and the calls counted so far."""
    calls = {"n": 0}

    def failing(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return causal_lm_loss(model, batch)

    return failing, calls


def test_a_failure_mid_probe_restores_the_blocks_and_the_weights():
    model, groups, batch = probed_model("llama", "module")
    blocks = model.base_model.model.model.layers
    own = blocks[0].forward = blocks[0].forward  # an instance forward, as accelerate's hooks install
    before = [p.detach().clone() for p in model.parameters()]
    failing, calls = interrupted_at(40)
    prober = adapeft.Prober(model, groups, failing, reuse_prefix=True)
    with pytest.raises(KeyboardInterrupt):
        prober.step(batch, 1e-3)
    assert calls["n"] == 40 and prober.prefix.kept
    assert all(same_bits(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert blocks[0].__dict__["forward"] is own and all("forward" not in block.__dict__ for block in blocks[1:])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("points", [5, 3])
def test_cuda_reused_prefixes_give_the_same_losses(dtype, points):
    """On CUDA (deterministic kernels for one shape) the losses are the full probe's bit for bit, with five points
    and with three; the realized steps are float64 atomic sums (to rounding)."""
    model, groups, batch = probed_model("llama", "module", dtype, "cuda")
    options = {"points": points, "slope": "autograd"} if points == 3 else {}
    full = adapeft.Prober(model, groups, causal_lm_loss, **options)
    reused = adapeft.Prober(model, groups, causal_lm_loss, reuse_prefix=True, **options)
    for _ in range(3):
        got, want = reused.step(batch, 1e-2), full.step(batch, 1e-2)
        assert same_bits(got.losses, want.losses) and torch.equal(got.verdict, want.verdict)
        torch.testing.assert_close(got.steps, want.steps, rtol=1e-12, atol=0, equal_nan=True)
    assert reused.prefix.kept == (1, 2, 3) and reused.prefix.disabled is None


def exact_attention(dtype):
    """float32 attention on PyTorch's math kernel: with the default one (memory-efficient) CUDA graph replays of tiny
    Llama gave losses a rounding away from eager passes' (2.4e-7, H100, 2026-12-07), with and without prefix reuse
    alike, and with the math kernel the same bits. bfloat16 keeps the default kernel, which gave the same bits."""
    if dtype != torch.float32:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphed_probe_of_a_lora_llama_matches_eager(dtype):
    """Without prefix reuse: graph replays on tiny Llama with LoRA per module give the eager probe's losses over
    steps with new batches."""
    model, groups, first = probed_model("llama", "module", dtype, "cuda")
    graphed = adapeft.Prober(model, groups, causal_lm_loss, cuda_graph=True)
    eager = adapeft.Prober(model, groups, causal_lm_loss)
    generator = torch.Generator().manual_seed(5)
    with exact_attention(dtype):
        for step in range(4):
            batch = first if step == 0 else torch.randint(0, 40, first.shape, generator=generator).cuda()
            assert_same_probe(graphed.step(batch, 1e-2), eager.step(batch, 1e-2))
    assert graphed.graph_disabled is None and graphed.graph_captures == 1


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("points", [5, 3])
def test_cuda_graphed_reuse_gives_the_eager_losses(dtype, points):
    """A graphed probe that reuses prefixes replays the unperturbed pass too: on a new batch its kept block outputs
    are the new batch's, and its losses are the eager reuse's and the full probe's bit for bit, step after step."""
    model, groups, first = probed_model("llama", "module", dtype, "cuda")
    before = [p.detach().clone() for p in model.parameters()]
    options = {"points": points, "slope": "autograd"} if points == 3 else {}
    graphed = adapeft.Prober(model, groups, causal_lm_loss, reuse_prefix=True, cuda_graph=True, **options)
    eager = adapeft.Prober(model, groups, causal_lm_loss, reuse_prefix=True, **options)
    full = adapeft.Prober(model, groups, causal_lm_loss, **options)
    generator = torch.Generator().manual_seed(5)
    with exact_attention(dtype):
        for step in range(4):
            batch = first if step == 0 else torch.randint(0, 40, first.shape, generator=generator).cuda()
            got, want, whole = graphed.step(batch, 1e-2), eager.step(batch, 1e-2), full.step(batch, 1e-2)
            assert same_bits(got.losses, want.losses) and same_bits(want.losses, whole.losses), step
            assert torch.equal(got.verdict, whole.verdict)
    assert graphed.graph_disabled is None and graphed.graph_captures == 1
    assert graphed.prefix.kept == (1, 2, 3) and graphed.forward_passes == eager.forward_passes
    assert all(same_bits(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert all("forward" not in block.__dict__ for block in graphed.prefix.blocks)
