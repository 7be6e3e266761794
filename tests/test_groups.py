"""adapeft.group_parameters on Hugging Face models (tiny configs, random weights), peft LoRA and plain
PyTorch modules."""
import json
import warnings

import pytest
import torch

import adapeft
from adapeft.groups import TYPES

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny(name):
    t = transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "gpt2":
            return t.GPT2LMHeadModel(t.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=97, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0))
        if name == "bert":
            return t.BertForSequenceClassification(t.BertConfig(num_hidden_layers=2, hidden_size=32,
                                                                num_attention_heads=2, intermediate_size=64,
                                                                vocab_size=97, num_labels=3))
        if name == "roberta":
            return t.RobertaForSequenceClassification(t.RobertaConfig(num_hidden_layers=2, hidden_size=32,
                                                                      num_attention_heads=2, intermediate_size=64,
                                                                      vocab_size=97, num_labels=2))
        if name == "t5":
            return t.T5ForConditionalGeneration(t.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64,
                                                           num_heads=2, d_kv=16, vocab_size=97))
        if name == "vit":
            return t.ViTForImageClassification(t.ViTConfig(num_hidden_layers=2, hidden_size=32,
                                                           num_attention_heads=2, intermediate_size=64,
                                                           image_size=32, patch_size=8, num_labels=5))
        if name == "llama":
            return t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                    num_key_value_heads=2, intermediate_size=64, vocab_size=97))
    raise ValueError(name)


LORA_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
                "vit": r".*attention.*\.(query|value|q_proj|v_proj)", "llama": ["q_proj", "v_proj"]}
EXPECTED = {  # name -> (groups that must exist, parameter names that must land in a given group)
    "gpt2": ({"norm", "bias", "embed", "others"}, {"transformer.ln_f.weight": "norm", "transformer.wte.weight": "embed",
                                                   "transformer.h.1.attn.c_attn.bias": "bias"}),
    "bert": ({"head", "norm", "bias", "embed", "others"}, {"classifier.weight": "head", "classifier.bias": "head",
                                                           "bert.encoder.layer.0.output.LayerNorm.weight": "norm",
                                                           "bert.encoder.layer.0.output.LayerNorm.bias": "bias",
                                                           "bert.embeddings.word_embeddings.weight": "embed"}),
    "roberta": ({"head", "norm", "bias", "embed", "others"}, {"classifier.out_proj.weight": "head",
                                                              "classifier.dense.bias": "head"}),
    "t5": ({"norm", "embed", "others"}, {"encoder.final_layer_norm.weight": "norm", "shared.weight": "embed"}),
    "vit": ({"head", "norm", "bias", "embed", "others"}, {"classifier.weight": "head", "vit.embeddings.cls_token": "embed",
                                                          "vit.layernorm.weight": "norm"}),
    "llama": ({"head", "norm", "embed", "others"}, {"lm_head.weight": "head", "model.norm.weight": "norm",
                                                    "model.layers.0.input_layernorm.weight": "norm"}),
}
MODELS = list(EXPECTED)


def assert_partition(groups, model):
    seen = {}
    for name in groups.names:
        for tensor_name, param in zip(groups.tensor_names(name), groups.params(name)):
            assert id(param) not in seen, f"{tensor_name} is in {seen[id(param)]} and {name}"
            assert model.get_parameter(tensor_name) is param, tensor_name
            seen[id(param)] = name
    assert set(seen) == {id(p) for p in model.parameters()}
    assert groups.total == sum(p.numel() for p in model.parameters())
    assert groups.numel == [sum(p.numel() for p in groups.params(n)) for n in groups.names]
    return {tensor_name: name for name in groups.names for tensor_name in groups.tensor_names(name)}


@pytest.mark.parametrize("name", MODELS)
def test_default_types_on_hf_models(name):
    model = tiny(name)
    groups = adapeft.group_parameters(model)
    owner = assert_partition(groups, model)
    required, placed = EXPECTED[name]
    assert required <= set(groups.names) <= set(TYPES)
    assert groups.names == [t for t in TYPES if t in groups.names]
    for tensor_name, group in placed.items():
        assert owner[tensor_name] == group, tensor_name


def test_tied_embedding_lands_once():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = adapeft.group_parameters(model, granularity="tensor")
    assert_partition(groups, model)
    assert "transformer.wte.weight" in groups.names and "lm_head.weight" not in groups.names


@pytest.mark.parametrize("name", MODELS)
def test_peft_lora_groups(name):
    model = peft.get_peft_model(tiny(name), peft.LoraConfig(r=4, target_modules=LORA_TARGETS[name]))
    groups = adapeft.group_parameters(model)
    owner = assert_partition(groups, model)
    assert {"lora_A", "lora_B"} <= set(groups.names)
    for tensor_name, group in owner.items():
        if ".lora_A." in tensor_name:
            assert group == "lora_A"
        elif ".lora_B." in tensor_name:
            assert group == "lora_B"
        elif "base_layer" in tensor_name and tensor_name.endswith("weight"):
            assert group == "others"
    layered = adapeft.group_parameters(model, granularity="layer")
    assert_partition(layered, model)
    block = "encoder.0" if name == "t5" else "0"
    assert f"lora_A@{block}" in layered.names and f"lora_B@{block}" in layered.names


def test_layer_granularity_names():
    gpt2 = adapeft.group_parameters(tiny("gpt2"), granularity="layer")
    assert [n for n in gpt2.names if n.startswith("norm")] == ["norm@0", "norm@1", "norm@2", "norm"]
    t5 = adapeft.group_parameters(tiny("t5"), granularity="layer")
    assert_partition(t5, t5.model)
    norms = [n for n in t5.names if n.startswith("norm")]
    assert norms == ["norm@encoder.0", "norm@encoder.1", "norm@decoder.0", "norm@decoder.1", "norm"]


def test_tensor_granularity():
    model = tiny("bert")
    groups = adapeft.group_parameters(model, granularity="tensor")
    assert groups.names == [n for n, _ in model.named_parameters()]
    assert all(len(groups.params(n)) == 1 for n in groups.names)


def test_rules_take_precedence_and_are_checked():
    model = tiny("bert")
    rules = [("attention", r"\.attention\.self\."), ("pooler", lambda name, p, m: name.startswith("bert.pooler"))]
    groups = adapeft.group_parameters(model, rules=rules)
    owner = assert_partition(groups, model)
    assert groups.names[:2] == ["attention", "pooler"]
    assert owner["bert.encoder.layer.1.attention.self.query.bias"] == "attention"
    assert owner["bert.pooler.dense.weight"] == "pooler"
    assert owner["bert.encoder.layer.1.attention.output.dense.bias"] == "bias"
    with pytest.raises(ValueError, match=r"matches rules \['a', 'b'\]"):
        adapeft.group_parameters(model, rules=[("a", "query"), ("b", "query.weight")])
    with pytest.raises(ValueError, match=r"rules \['nothing'\] match no parameter"):
        adapeft.group_parameters(model, rules=[("nothing", "no_such_module")])
    with pytest.raises(ValueError, match="collides with a default group"):
        adapeft.group_parameters(model, rules=[("norm", "pooler")])
    with pytest.raises(ValueError, match="rule names must be unique"):
        adapeft.group_parameters(model, rules=[("x", "query"), ("x", "key")])
    with pytest.raises(TypeError, match="must be a regex string or a callable"):
        adapeft.group_parameters(model, rules=[("x", 3)])


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        adapeft.group_parameters("bert")
    with pytest.raises(ValueError, match="granularity must be one of"):
        adapeft.group_parameters(tiny("bert"), granularity="block")
    with pytest.raises(ValueError, match="has no parameters"):
        adapeft.group_parameters(torch.nn.ReLU())
    with pytest.raises(KeyError, match="no group named 'lora_A'"):
        adapeft.group_parameters(tiny("bert")).params("lora_A")


def test_plain_pytorch_model_and_custom_norm():
    class ScaleNorm(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(width))

        def forward(self, x):
            return self.gain * x / x.norm(dim=-1, keepdim=True)

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), ScaleNorm(8),
                                torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    groups = adapeft.group_parameters(model)
    owner = assert_partition(groups, model)
    assert owner == {"0.weight": "embed", "1.weight": "others", "1.bias": "bias", "2.gain": "norm",
                     "3.weight": "norm", "3.bias": "bias", "4.weight": "head", "4.bias": "head"}


def test_plain_pytorch_decoder_tied_to_the_embedding_makes_no_head():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = torch.nn.Embedding(20, 16), torch.nn.Linear(16, 16)
            self.dec = torch.nn.Linear(16, 20, bias=False)
            self.dec.weight = self.emb.weight

    model = Tied()
    owner = assert_partition(adapeft.group_parameters(model), model)
    # the hidden layer was taken for the head: the tied decoder's weight is listed under the embedding only
    assert owner == {"emb.weight": "embed", "mid.weight": "others", "mid.bias": "bias"}


def test_a_callable_rule_that_fails_is_named_with_its_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    # its own TypeError ("takes 1 positional argument but 3 were given") named neither
    with pytest.raises(RuntimeError, match=r"adapeft.group_parameters: rule 'norms' failed on parameter '0.weight'"):
        adapeft.group_parameters(model, rules=[("norms", lambda name: "1." in name)])
    with pytest.raises(RuntimeError, match=r"rule 'odd' failed on parameter '0.weight': ZeroDivisionError"):
        adapeft.group_parameters(model, rules=[("odd", lambda name, param, module: 1 / 0)])


def test_summary_and_json_are_stable():
    model = tiny("vit")
    groups = adapeft.group_parameters(model)
    text = groups.summary()
    assert text.splitlines()[0].split() == ["group", "tensors", "parameters", "share"]
    assert "total" in text.splitlines()[-1] and "100.00%" in text
    first, second = groups.to_json(), adapeft.group_parameters(model).to_json()
    assert first == second
    data = json.loads(first)
    assert data["format"] == "adapeft.groups/1" and [g["name"] for g in data["groups"]] == groups.names
    assert sum(g["numel"] for g in data["groups"]) == data["total"] == groups.total


WRAPPERS = {  # wrapper -> the prefix it gives the parameters' names
    "DataParallel": (torch.nn.DataParallel, "module."),  # DistributedDataParallel wraps the same way
    "compile": (torch.compile, "_orig_mod."),
    "compile(DataParallel)": (lambda model: torch.compile(torch.nn.DataParallel(model)), "_orig_mod.module."),
    "DataParallel(compile)": (lambda model: torch.nn.DataParallel(torch.compile(model)), "module._orig_mod."),
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("name", MODELS)
def test_wrapped_model_groups_as_the_model(name, wrapper):
    model = peft.get_peft_model(tiny(name), peft.LoraConfig(r=4, target_modules=LORA_TARGETS[name]))
    wrap, prefix = WRAPPERS[wrapper]
    wrapped = wrap(model)
    for granularity in ("type", "layer", "tensor"):
        plain = adapeft.group_parameters(model, granularity=granularity)
        grouped = adapeft.group_parameters(wrapped, granularity=granularity)
        assert grouped.names == plain.names and grouped.numel == plain.numel
        assert_partition(grouped, wrapped)
        for group in plain.names:
            assert grouped.tensor_names(group) == [prefix + n for n in plain.tensor_names(group)]
