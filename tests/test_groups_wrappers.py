"""adapeft.group_parameters and Selection.apply on wrapped models: peft's modules_to_save and several adapters,
torch.compile, data parallelism, and a peft model against its merge_and_unload() (real objects, tiny configs)."""
import warnings

import pytest
import torch

import adapeft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GRANULARITIES = ("type", "layer", "tensor")
PEFT_TYPES = ("lora_A", "lora_B")


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertForSequenceClassification(config)


def lora_config(**options):
    return peft.LoraConfig(r=2, target_modules=["query", "value"], **options)


def peft_bert(saved=("classifier",), second=False):
    """BERT with LoRA and modules_to_save; second: a second adapter "other" (inactive) of the same kind."""
    model = peft.get_peft_model(bert(), lora_config(modules_to_save=list(saved)))
    if second:
        model.add_adapter("other", lora_config(modules_to_save=list(saved)))
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 50, (4, 8), generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator)}


def grouped(groups):
    return {id(p): name for name in groups.names for p in groups.params(name)}


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def classifier(model):
    return model.base_model.model.classifier


def test_modules_to_save_head_is_the_active_copy_alone():
    eager, model = bert(), peft_bert(second=True)
    groups = adapeft.group_parameters(model)
    wrapper = classifier(model)
    copy = wrapper.modules_to_save["default"]
    assert {id(p) for p in groups.params("head")} == {id(p) for p in copy.parameters()}
    assert groups.numel[groups.names.index("head")] == sum(p.numel() for p in eager.classifier.parameters())
    eager_groups = adapeft.group_parameters(eager)  # LoRA aside, each group counts what it counts without peft
    assert [(n, c) for n, c in zip(groups.names, groups.numel) if n not in PEFT_TYPES] == \
        list(zip(eager_groups.names, eager_groups.numel))
    left_out = {n for n, p in model.named_parameters() if id(p) not in grouped(groups)}
    assert left_out == {n for n, _ in model.named_parameters() if ".original_module." in n or ".other." in n}
    assert all(".default." in n for name in PEFT_TYPES for n in groups.tensor_names(name))


def test_groups_hold_exactly_what_training_updates():
    """Behavioural: with every parameter unfrozen, the ones a backward pass reaches are the grouped ones."""
    model = peft_bert(saved=("classifier", "pooler"), second=True)
    for granularity in GRANULARITIES:
        groups = adapeft.group_parameters(model, granularity=granularity)
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(**batch()).loss.backward()
        reached = {id(p) for p in model.parameters() if p.grad is not None}
        assert reached == set(grouped(groups)), granularity


@pytest.mark.parametrize("chosen", [["head"], ["head", "others"], ["lora_A", "lora_B", "head", "norm", "bias",
                                                                   "embed", "others"]])
def test_apply_never_unfreezes_saved_originals_or_inactive_adapters(chosen):
    model = peft_bert(second=True)
    model.requires_grad_(True)  # even when something unfroze them before
    groups = adapeft.group_parameters(model)
    report = adapeft.Selection.given(chosen, groups).apply(model, groups)
    wrapper = classifier(model)
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert not any(p.requires_grad for p in wrapper.modules_to_save["other"].parameters())
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    owner = grouped(groups)
    assert all(p.requires_grad == (owner.get(id(p)) in chosen) for p in model.parameters())
    assert report["trainable_parameters"] == trainable_count(model) == adapeft.Selection.given(chosen, groups).count


def test_active_adapter_decides_the_groups_and_names_stay():
    model = peft_bert(second=True)
    before = {g: adapeft.group_parameters(model, granularity=g) for g in GRANULARITIES}
    model.set_adapter("other")
    for granularity in GRANULARITIES:
        after = adapeft.group_parameters(model, granularity=granularity)
        assert after.names == before[granularity].names and after.numel == before[granularity].numel
    groups = adapeft.group_parameters(model)
    assert {id(p) for p in groups.params("head")} == {id(p) for p in classifier(model).modules_to_save["other"]
                                                      .parameters()}
    assert all(".other." in n for name in PEFT_TYPES for n in groups.tensor_names(name))
    adapeft.Selection.given(["lora_A", "lora_B", "head"], groups).apply(model, groups)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def test_several_active_lora_adapters_keep_their_names():
    model = peft.get_peft_model(bert(), lora_config())
    model.add_adapter("other", lora_config())
    model.base_model.set_adapter(["default", "other"])
    tensors = adapeft.group_parameters(model, granularity="tensor")
    lora = [n for n in tensors.names if ".lora_" in n]
    assert len(lora) == 16 and len(set(lora)) == 16
    assert {n.split(".")[-2] for n in lora} == {"default", "other"}
    one = adapeft.group_parameters(peft_bert())
    assert adapeft.group_parameters(model).numel[:2] == [2 * c for c in one.numel[:2]]  # lora_A, lora_B


def resolves_on(groups, model):
    return all(model.get_parameter(n) is p for name in groups.names
               for n, p in zip(groups.tensor_names(name), groups.params(name)))


def without_wrappers(name):
    """A parameter's name without torch.compile's and DataParallel's parts (BERT has no module named so)."""
    return ".".join(part for part in name.split(".") if part not in ("_orig_mod", "module"))


def compile_submodule(model):
    """torch.compile of one block in place: `_orig_mod.` inside the names."""
    model.bert.encoder.layer[1] = torch.compile(model.bert.encoder.layer[1])
    return model


@pytest.mark.parametrize("wrap", [torch.compile, lambda m: torch.compile(torch.nn.DataParallel(m)),
                                  compile_submodule], ids=["compile", "compile(DataParallel)", "compiled block"])
@pytest.mark.parametrize("make", [bert, peft_bert], ids=["eager", "peft"])
def test_compiled_model_groups_as_the_eager_one(make, wrap):
    reference = make()
    wrapped = wrap(make())
    for granularity in GRANULARITIES:
        eager = adapeft.group_parameters(reference, granularity=granularity)
        compiled = adapeft.group_parameters(wrapped, granularity=granularity)
        assert compiled.names == eager.names and compiled.numel == eager.numel
        assert resolves_on(compiled, wrapped)
        assert all([without_wrappers(n) for n in compiled.tensor_names(g)] == eager.tensor_names(g)
                   for g in eager.names)
    assert "head" in adapeft.group_parameters(wrapped).names


def test_rules_see_the_unwrapped_names():
    rules = [("pooler", r"^bert\.pooler\."), ("classifier", r"^classifier\.")]
    eager = adapeft.group_parameters(peft_bert(), rules=rules)
    compiled = adapeft.group_parameters(torch.compile(peft_bert()), rules=rules)
    assert compiled.names == eager.names and compiled.numel == eager.numel
    assert eager.numel[1] == sum(p.numel() for p in bert().classifier.parameters())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_selection_moves_between_eager_and_compiled(tmp_path, granularity):
    eager_model, compiled = peft_bert(), torch.compile(peft_bert())
    eager = adapeft.group_parameters(eager_model, granularity=granularity)
    chosen = [n for n in eager.names if n.startswith(("head", "norm", "classifier"))]
    assert chosen
    adapeft.Selection.given(chosen, eager).save(tmp_path / "selection.json")
    loaded = adapeft.Selection.load(tmp_path / "selection.json")
    report = loaded.apply(compiled, adapeft.group_parameters(compiled, granularity=granularity))
    assert report["trained"] == chosen and report["trainable_parameters"] == trainable_count(compiled)
    loaded.apply(eager_model, eager)
    assert {without_wrappers(n): p.requires_grad for n, p in compiled.named_parameters()} == \
        {n: p.requires_grad for n, p in eager_model.named_parameters()}
    back = adapeft.Selection.given(chosen, adapeft.group_parameters(compiled, granularity=granularity))
    assert back.apply(eager_model, eager)["trainable_parameters"] == report["trainable_parameters"]


def test_freeze_to_a_compiled_peft_model():
    hf = pytest.importorskip("adapeft.hf")
    selection = adapeft.Selection.given(["lora_A", "lora_B", "head"], adapeft.group_parameters(peft_bert()))
    model = peft_bert(second=True)
    report = hf.freeze_to(selection, torch.compile(model))
    assert report["trainable_parameters"] == trainable_count(model) == selection.count
    assert not any(p.requires_grad for p in classifier(model).original_module.parameters())


def test_training_a_compiled_model_updates_only_the_chosen_groups():
    model = peft_bert(second=True)
    # aot_eager traces the forward and backward graphs as inductor does, without its C++ build (a minute here)
    compiled = torch.compile(model, backend="aot_eager")
    groups = adapeft.group_parameters(compiled)
    adapeft.Selection.given(["lora_B", "head"], groups).apply(compiled, groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in compiled.parameters() if p.requires_grad], lr=0.1)
    compiled(**batch()).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {without_wrappers(n) for name in ("lora_B", "head") for n in groups.tensor_names(name)}
    assert changed == expected


def test_peft_model_and_its_merge_share_the_groups_the_names_allow():
    model = peft_bert()
    peft_groups = {g: adapeft.group_parameters(model, granularity=g) for g in GRANULARITIES}
    merged = model.merge_and_unload()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    for granularity, before in peft_groups.items():
        after = adapeft.group_parameters(merged, granularity=granularity)
        shared = [(n, c) for n, c in zip(before.names, before.numel) if "lora_" not in n]
        assert list(zip(after.names, after.numel)) == shared, granularity
    tensors = adapeft.group_parameters(merged, granularity="tensor")
    assert all(merged.get_parameter(n).numel() == c for n, c in zip(tensors.names, tensors.numel))
    types = peft_groups["type"]
    merged_groups = adapeft.group_parameters(merged)
    with pytest.raises(ValueError, match=r"chosen but not in the model \['lora_B'\], in the model but not in the "
                                         r"selection \[\]"):
        adapeft.Selection.given(["lora_B", "head"], types).apply(merged, merged_groups)
    # A selection made on the peft model that leaves the LoRA groups frozen applies to the merged model.
    report = adapeft.Selection.given(["head", "norm", "bias"], types).apply(merged, merged_groups)
    assert report["trainable_parameters"] == sum(c for n, c in zip(types.names, types.numel)
                                                 if n in ("head", "norm", "bias"))
    assert report["trainable_parameters"] == sum(p.numel() for p in merged.parameters() if p.requires_grad)


def test_deepspeed_zero3_partitioned_parameters_are_refused_not_miscounted():
    """ZeRO-3 leaves each rank a shard of every parameter (an empty tensor where the rank holds none, the size in
    ds_numel): groups and probes of what is there would be silently wrong, so adapeft says it cannot."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[1].weight.ds_numel = 16  # what deepspeed.zero.Init sets on a partitioned parameter
    model[1].weight.data = torch.empty(0)
    with pytest.raises(ValueError, match="parameter '1.weight' is partitioned by DeepSpeed ZeRO-3 \\(16 elements"):
        adapeft.group_parameters(model)
    with pytest.raises(ValueError, match="Use ZeRO stage 1 or 2, FSDP2"):
        adapeft.Prober(model, None, lambda m, b: m(b).sum())
