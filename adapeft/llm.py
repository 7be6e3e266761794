"""Causal language models: the next-token loss, where LoRA can go, and a selection handed to peft.

The question an LLM fine-tuner asks is which modules of which layers get LoRA, and at what rank. adapeft
answers it by probing LoRA on every projection of every block, each adapter a group of its own:

    model = equip_lora(model, lora_targets(model), train_all=False)     # LoRA everywhere, the base frozen
    groups = group_parameters(model, "module", trainable_only=True)     # "self_attn.q_proj@3", ...
    ... probe while training (AdaPEFT.probe_train, Prober) and select ...
    config = LoraConfig(**lora_config(selection, groups))               # LoRA where it was chosen

`lora_config` writes the chosen (module, layer) pairs as peft's `target_modules` and `layers_to_transform`
where they form a grid (these modules in these layers), else as the list of the chosen modules' full names,
and with ranks="values" also a `rank_pattern` that shares the rank among them by their values.
"""
import collections
import fractions
import math
import re
import warnings

import torch

from .groups import ParameterGroups, block_position, group_parameters, lora_factor
from .selection import Selection

IGNORED = -100  # the target of a position that is not scored (padding), as torch and transformers take it


def causal_lm_loss(model, batch):
    """Mean next-token cross-entropy over `batch`: a LongTensor of token ids (sequences x positions), or a
    dict with "input_ids" and, optionally, "attention_mask" (a position whose next token is padding is not
    scored). Computed in float32 for a 16-bit model (in the model's dtype otherwise); the value of
    transformers' own `model(input_ids, labels=...).loss`, with no host synchronisation."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, collections.abc.Mapping) and "input_ids" in batch:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError("adapeft.causal_lm_loss: batch must be a LongTensor of token ids or a dict with "
                        f"'input_ids', got {type(batch).__name__}")
    where = "batch" if isinstance(batch, torch.Tensor) else "batch['input_ids']"
    # Checked here: the embedding's own error names neither this function nor the batch
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"adapeft.causal_lm_loss: {where} must be a tensor of integer token ids, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"adapeft.causal_lm_loss: {where} must be sequences x positions with at least "
                         f"2 positions, got shape {tuple(ids.shape)}")
    # No key-value cache: a loss needs none, and building one costs memory (and host work a CUDA graph capture
    # may not take).
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, IGNORED)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORED)


def lora_targets(model):
    """The linear layers of the model's blocks (torch Linear, and transformers' Conv1D of GPT-2), named by
    their path inside a block, in model order: ['self_attn.q_proj', ..., 'mlp.down_proj'] for Llama. Each is
    a name peft's `target_modules` takes, and it selects that module in every block."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            position = block_position(name)
            inside = ".".join(position[2]) if position is not None else ""
            if inside and "lora_" not in inside and "base_layer" not in inside:
                found.append(inside)
    if not found:
        raise ValueError("adapeft.lora_targets: the model has no linear layer inside a stack of blocks "
                         "(a ModuleList such as model.layers)")
    return list(dict.fromkeys(found))


ADAPTER_UNITS = ("module", "layer")


def adapter_groups(model, units="module"):
    """A causal LM's LoRA adapters (its trainable parameters: equip_lora(..., train_all=False)) as units of choice that
    peft can train: units="module", each adapter of each block ("self_attn.q_proj@3"); "layer", every adapter of one
    block ("layer@3"). A unit holds both of an adapter's factors, since a LoraConfig trains both: a choice of one
    factor alone would count half the parameters its config trains. Probe them apart with `.split_factors()`."""
    if units not in ADAPTER_UNITS:
        raise ValueError(f"adapeft.adapter_groups: units must be one of {ADAPTER_UNITS}, got {units!r}")
    if units == "module":
        return group_parameters(model, "module", trainable_only=True)
    blocks = sorted({block_index(name) for name, param in model.named_parameters() if param.requires_grad} - {None})
    rules = [(f"layer@{block}", lambda name, param, module, block=block: block_index(name) == block)
             for block in blocks]
    return group_parameters(model, "module", rules=rules, trainable_only=True)


def block_index(name):
    """The index of the block a qualified parameter or module name sits in, or None outside a stack of blocks."""
    found = block_position(name)
    return None if found is None else found[1]


DEFAULT_LORA_RANK = 8  # LoRA's rank where no adapter tells it (adapeft probe's --lora-rank default)


def lora_rank(model):
    """The rank of a model's LoRA adapters (the most common where they differ; None where it has none): the rows of
    their A factors."""
    ranks = collections.Counter(param.shape[0] for name, param in model.named_parameters()
                                if lora_factor(name.split(".")) == "lora_A")
    return ranks.most_common(1)[0][0] if ranks else None


def lora_config(chosen, groups, r=None, ranks="uniform", alpha=None, counts=None):
    """Keyword arguments for peft's `LoraConfig` that put LoRA on the modules whose adapters were chosen.

    chosen: an adapeft.Selection or a list of group names; groups: the ParameterGroups the probe used, or a
    mapping {group name: [qualified names of the modules its adapter weights adapt]} (a probe record's
    "adapted_modules"). r: the rank of every adapter (None: the probed adapters' own, lora_rank, where `groups` is a
    ParameterGroups, else 8); ranks="values" shares r per chosen module, r x their
    number in all, in proportion to the chosen groups' values (a Selection's), at least 1 each, as a
    `rank_pattern` (the same total rank; the parameters it trains change with the modules' shapes). alpha: LoRA's
    alpha (default 2 r, as adapeft's probes use); where ranks differ, an `alpha_pattern` keeps every adapter at the
    probe's scaling alpha / r. The names are those of the model without peft's wrapper, as `get_peft_model` matches
    them. counts: {group name: parameters} where `groups` is a mapping (a probe record's "counts"; a ParameterGroups
    has its own).

    A config trains both factors of every adapter it names: where the groups hold one factor each (the "type" or
    "tensor" granularity), it trains more parameters than the chosen groups count, and a warning says how many more
    (use `adapter_groups`, whose units hold both).
    """
    if isinstance(chosen, Selection):
        values = dict(zip(chosen.names, chosen.values))
        names = list(chosen.chosen)
    else:
        values, names = None, list(chosen)
    adapted = ({name: groups.adapted_modules(name) for name in groups.names} if isinstance(groups, ParameterGroups)
               else dict(groups))
    unknown = [name for name in names if name not in adapted]
    if unknown:
        raise ValueError(f"adapeft.lora_config: chosen groups {unknown} are not groups of `groups`")
    if r is None:
        r = (lora_rank(groups.model) if isinstance(groups, ParameterGroups) else None) or DEFAULT_LORA_RANK
    if not (isinstance(r, int) and r >= 1):
        raise ValueError(f"adapeft.lora_config: r must be a positive whole number, got {r!r}")
    if ranks not in ("uniform", "values"):
        raise ValueError(f"adapeft.lora_config: ranks must be 'uniform' or 'values', got {ranks!r}")
    modules = {name: list(adapted[name]) for name in names if adapted[name]}
    if not modules:
        raise ValueError("adapeft.lora_config: no chosen group holds adapter weights (LoRA's A and B); probe the "
                         f"model with LoRA on its modules and group it by module. Chosen: {names}")
    every = list(dict.fromkeys(module for found in modules.values() for module in found))
    if isinstance(groups, ParameterGroups):
        counts = dict(zip(groups.names, groups.numel))
    if counts is not None:
        _warn_of_more_trained(names, adapted, counts, set(every))
    lora_alpha = 2 * r if alpha is None else alpha
    config = {"r": r, "lora_alpha": lora_alpha, **_targets(every)}
    if ranks == "values":
        if values is None:
            raise ValueError("adapeft.lora_config: ranks='values' needs the values: pass the Selection")
        config["rank_pattern"] = _shared_ranks(modules, values, r)
        config["alpha_pattern"] = {module: _whole(lora_alpha * rank / r) for module, rank in config["rank_pattern"].items()}
    return config


def _warn_of_more_trained(names, adapted, counts, modules):
    """A warning where the config that adapts `modules` trains groups besides the chosen `names` (the other factor
    of a chosen adapter): the groups all of whose adapters it puts LoRA on, counted at the probe's rank."""
    missing = [name for name in adapted if name not in counts]
    if missing:
        raise ValueError(f"adapeft.lora_config: counts has no count for the groups {missing[:4]}")
    chosen = sum(counts[name] for name in names)
    trained = sum(counts[name] for name, found in adapted.items() if found and set(found) <= modules)
    if trained > chosen:
        warnings.warn(f"adapeft: the LoraConfig trains both factors of each of its {len(modules)} adapters, "
                      f"{trained:,} parameters at the probe's rank, where the chosen groups count {chosen:,} "
                      f"({trained / chosen:.2g}x): their groups hold one LoRA factor each; probe units that hold both "
                      "(adapeft.adapter_groups, adapeft probe --granularity module or layer)", UserWarning,
                      stacklevel=3)


def count_at_ranks(chosen, adapted, counts, config, probe_rank):
    """The parameters that `config` (lora_config's, for the `chosen` groups) trains at the ranks it gives its modules
    (its rank_pattern, else its r), from the `counts` at the probe's rank of the groups it trains: those all of whose
    adapters it puts LoRA on, the other factor of a chosen one's adapters included. A group's count scales with its
    modules' rank; None where a trained group's modules were given different ranks (its count cannot be split among
    them)."""
    pattern = config.get("rank_pattern", {})
    modules = {module for name in chosen for module in adapted[name]}
    total = 0
    for name, found in adapted.items():
        if not found or not set(found) <= modules:
            continue
        ranks = {pattern.get(module, config["r"]) for module in found}
        if len(ranks) > 1:
            return None
        total += fractions.Fraction(counts[name] * ranks.pop(), probe_rank)
    return _whole(float(total))


def _whole(number):
    return int(number) if float(number).is_integer() else number


def _targets(modules):
    """target_modules (and layers_to_transform) that select exactly `modules`: a grid of module kinds x
    layers of one stack in short form, anything else as the full names."""
    split = [re.match(r"^(.*?)\.(\d+)\.(.+)$", name) for name in modules]
    if all(split) and len({m.group(1) for m in split}) == 1:
        kinds = list(dict.fromkeys(m.group(3) for m in split))
        layers = sorted({int(m.group(2)) for m in split})
        if len(kinds) * len(layers) == len(modules):
            pattern = split[0].group(1).rpartition(".")[2]
            return {"target_modules": kinds, "layers_to_transform": layers, "layers_pattern": pattern}
    return {"target_modules": list(modules)}


def _shared_ranks(modules, values, r):
    """{module name: rank}: r per module in all, shared in proportion to each group's value by largest
    remainders (ties to the earlier group), each module at least rank 1."""
    weights = {name: max(float(values[name]), 0.0) for name in modules}
    total_value = sum(weights.values())
    count = sum(len(found) for found in modules.values())
    spare = r * count - count  # every module has rank 1 first
    if total_value == 0 or spare == 0:
        return {module: r for found in modules.values() for module in found}
    shares = {name: spare * weight / total_value / len(modules[name]) for name, weight in weights.items()}
    ranks = {name: 1 + math.floor(share) for name, share in shares.items()}
    left = r * count - sum(rank * len(modules[name]) for name, rank in ranks.items())
    by_remainder = sorted(modules, key=lambda name: -(shares[name] - math.floor(shares[name])))
    for name in by_remainder:
        if left < len(modules[name]):
            continue
        ranks[name] += 1
        left -= len(modules[name])
    return {module: ranks[name] for name, found in modules.items() for module in found}
