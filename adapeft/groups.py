"""Split a model's parameters into named groups: the paper's types, per layer, per tensor, or by rules.

The default types follow the PEFT methods they stand for: `lora_A`, `lora_B` (LoRA), `head` (linear
probing), `norm` (LayerNorm tuning: the weights of normalisation layers, found by module type), `bias`
(BitFit), `embed` (embedding tuning) and `others`. Every parameter lands in exactly one group; a tensor
shared by two modules (tied embeddings) is one parameter and lands once.
"""
import json
import re
from collections import OrderedDict

import torch

TYPES = ("lora_A", "lora_B", "head", "norm", "bias", "embed", "others")
GRANULARITIES = ("type", "layer", "tensor")

# Module names that hold a model's output head, in Hugging Face and torchvision models.
HEAD_MODULE_NAMES = {"classifier", "score", "lm_head", "qa_outputs", "cls", "head", "heads", "fc",
                     "pre_classifier", "pooler_head", "classification_head"}
NORM_TYPES = tuple(t for t in (torch.nn.LayerNorm, torch.nn.GroupNorm, getattr(torch.nn, "RMSNorm", None),
                               torch.nn.modules.batchnorm._BatchNorm,
                               torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
                   if t is not None)
# Normalisation layers of other libraries (LlamaRMSNorm, T5LayerNorm, ...) are recognised by class name.
NORM_CLASS_NAME = re.compile(r"(Layer|RMS|Group|Batch|Instance|Scale)Norm", re.IGNORECASE)
# peft wraps the base model and keeps trainable copies of some modules; these path parts are plumbing.
PEFT_PLUMBING = {"base_model", "model", "base_layer", "modules_to_save", "original_module", "default"}


class ParameterGroups:
    """Named groups of a model's parameters (see `group_parameters`).

    `names`: group names in a stable order; `numel`: parameters per group; `params(name)`: the tensors;
    `tensor_names(name)`: their qualified names in the model. `summary()` prints a table; `to_json()`
    gives a stable form to match a selection against another model by group name.
    """

    def __init__(self, model, members, granularity):
        self.model = model
        self.granularity = granularity
        self._members = members  # name -> list of (qualified name, parameter)
        self.names = list(members)
        self.numel = [sum(p.numel() for _, p in members[name]) for name in self.names]

    def params(self, name):
        self._check(name)
        return [p for _, p in self._members[name]]

    def tensor_names(self, name):
        self._check(name)
        return [n for n, _ in self._members[name]]

    def _check(self, name):
        if name not in self._members:
            raise KeyError(f"adapeft.ParameterGroups: no group named {name!r}; groups are {self.names}")

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name):
        return name in self._members

    @property
    def total(self):
        return sum(self.numel)

    def summary(self):
        width = max([len("group")] + [len(n) for n in self.names])
        lines = [f"{'group':<{width}} {'tensors':>7} {'parameters':>13} {'share':>7}"]
        for name, count in zip(self.names, self.numel):
            share = count / self.total if self.total else 0.0
            lines.append(f"{name:<{width}} {len(self._members[name]):7d} {count:13,d} {share:7.2%}")
        lines.append(f"{'total':<{width}} {sum(len(m) for m in self._members.values()):7d} {self.total:13,d} "
                     f"{1.0 if self.total else 0.0:7.2%}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self):
        return f"ParameterGroups({len(self)} groups, granularity={self.granularity!r}, {self.total:,} parameters)"

    def as_dict(self):
        return {
            "format": "adapeft.groups/1",
            "granularity": self.granularity,
            "total": self.total,
            "groups": [{"name": name, "numel": count, "tensors": self.tensor_names(name)}
                       for name, count in zip(self.names, self.numel)],
        }

    def to_json(self, indent=2):
        return json.dumps(self.as_dict(), indent=indent)


def _clean_path(name):
    """A parameter's path without peft's wrapper components."""
    return [part for part in name.split(".") if part not in PEFT_PLUMBING]


def _is_norm(module):
    return isinstance(module, NORM_TYPES) or bool(NORM_CLASS_NAME.search(type(module).__name__))


def _is_embedding(module):
    return isinstance(module, torch.nn.Embedding) or type(module).__name__.endswith(("Embedding", "Embeddings"))


def _output_head_ids(model):
    """Ids of the parameters of a Hugging Face model's output embeddings, unless tied to the input ones."""
    ids = set()
    get_output, get_input = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if callable(get_output):
        try:
            output = get_output()
            inputs = get_input() if callable(get_input) else None
        except (NotImplementedError, AttributeError):
            return ids
        if isinstance(output, torch.nn.Module):
            tied = {id(p) for p in inputs.parameters()} if isinstance(inputs, torch.nn.Module) else set()
            ids = {id(p) for p in output.parameters()} - tied
    return ids


def _default_type(name, param, owner, head_ids, fallback_head_ids):
    path = _clean_path(name)
    if any(part.startswith(("lora_A", "lora_embedding_A")) for part in path):
        return "lora_A"
    if any(part.startswith(("lora_B", "lora_embedding_B")) for part in path):
        return "lora_B"
    if id(param) in head_ids or id(param) in fallback_head_ids or (path and path[0] in HEAD_MODULE_NAMES):
        return "head"
    leaf = path[-1] if path else name
    if _is_norm(owner) and leaf != "bias":
        return "norm"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    if _is_embedding(owner):
        return "embed"
    return "others"


def _block_of(name, stacks):
    """The transformer block a parameter belongs to: the index after a ModuleList, qualified by the
    list's path when the model has several (an encoder and a decoder)."""
    path = _clean_path(name)
    for i, part in enumerate(path):
        if part.isdigit():
            stack = ".".join(path[:i])
            if len(stacks) > 1:
                return f"{_short_stack(stack, stacks)}.{part}"
            return part
    return None


def _short_stack(stack, stacks):
    """The shortest trailing-free prefix part that tells this stack from the others (e.g. 'encoder')."""
    parts = stack.split(".")
    for part in parts:
        if sum(part in other.split(".") for other in stacks) == 1:
            return part
    return stack


def _stacks(names):
    found = []
    for name in names:
        path = _clean_path(name)
        for i, part in enumerate(path):
            if part.isdigit():
                stack = ".".join(path[:i])
                if stack not in found:
                    found.append(stack)
                break
    return found


def _rule_matcher(rule_name, pattern):
    if callable(pattern):
        return pattern
    if isinstance(pattern, str):
        compiled = re.compile(pattern)
        return lambda name, param, module: compiled.search(name) is not None
    raise TypeError(f"adapeft.group_parameters: rule {rule_name!r} must be a regex string or a callable "
                    f"(name, param, module) -> bool, got {type(pattern).__name__}")


def group_parameters(model, granularity="type", rules=None):
    """Split `model`'s parameters into named groups.

    granularity: "type" (the paper's lora_A, lora_B, head, norm, bias, embed, others), "layer" (type x
    transformer block, e.g. "norm@3"; parameters outside the blocks keep their type name) or "tensor"
    (one group per parameter, named by its path).
    rules: an ordered list of (group name, pattern) pairs taken before the defaults, pattern a regex
    searched in the parameter's qualified name or a callable (name, param, module) -> bool. A parameter
    matching two rules, or a rule matching nothing, is an error.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"adapeft.group_parameters: model must be a torch.nn.Module, got {type(model).__name__}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"adapeft.group_parameters: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    rules = list(rules or [])
    rule_names = [r[0] if isinstance(r, (tuple, list)) and len(r) == 2 else None for r in rules]
    if None in rule_names:
        raise TypeError("adapeft.group_parameters: rules must be (group name, pattern) pairs")
    if len(set(rule_names)) != len(rule_names):
        raise ValueError(f"adapeft.group_parameters: rule names must be unique, got {rule_names}")
    matchers = [(rule_name, _rule_matcher(rule_name, pattern)) for rule_name, pattern in rules]

    owners = {}
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), module)
    named = list(model.named_parameters())
    if not named:
        raise ValueError("adapeft.group_parameters: the model has no parameters")
    # A data-parallel wrapper groups as the model it wraps; the groups keep the wrapper's tensor names.
    inner = model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) \
        else model
    wrapper = "module." if inner is not model else ""

    def unwrapped(name):
        return name[len(wrapper):]

    head_ids = _output_head_ids(inner)
    fallback_head_ids = set()
    named_heads = any(_clean_path(unwrapped(n))[:1] and _clean_path(unwrapped(n))[0] in HEAD_MODULE_NAMES
                      for n, _ in named)
    if not hasattr(inner, "get_output_embeddings") and not named_heads:
        # A plain PyTorch model: its last Linear layer is the head.
        linears = [m for m in inner.modules() if isinstance(m, torch.nn.Linear)]
        if linears:
            fallback_head_ids = {id(p) for p in linears[-1].parameters()}
    stacks = _stacks(unwrapped(n) for n, _ in named)

    members = OrderedDict()
    by_rule = {rule_name: [] for rule_name in rule_names}
    by_default = []
    for name, param in named:
        owner = owners[id(param)]
        hits = [rule_name for rule_name, match in matchers if match(name, param, owner)]
        if len(hits) > 1:
            raise ValueError(f"adapeft.group_parameters: parameter {name!r} matches rules {hits}; rules must not "
                             "overlap")
        if hits:
            by_rule[hits[0]].append((name, param))
        else:
            by_default.append((name, param, owner))
    empty = [rule_name for rule_name, found in by_rule.items() if not found]
    if empty:
        raise ValueError(f"adapeft.group_parameters: rules {empty} match no parameter of the model")
    members.update(by_rule)

    default = OrderedDict()
    for position, (name, param, owner) in enumerate(by_default):
        kind = _default_type(unwrapped(name), param, owner, head_ids, fallback_head_ids)
        if granularity == "tensor":
            label, order = name, (position,)
        elif granularity == "layer":
            block = _block_of(unwrapped(name), stacks)
            label = kind if block is None else f"{kind}@{block}"
            order = (TYPES.index(kind), _block_sort_key(block, stacks))
        else:
            label, order = kind, (TYPES.index(kind),)
        default.setdefault(label, (order, []))[1].append((name, param))
    for label, (_, found) in sorted(default.items(), key=lambda item: item[1][0]):
        if label in members:
            raise ValueError(f"adapeft.group_parameters: rule name {label!r} collides with a default group; "
                             "rename the rule")
        members[label] = found
    return ParameterGroups(model, members, granularity)


def _block_sort_key(block, stacks):
    """Blocks in model order (stacks as discovered, then index), parameters outside any block last."""
    if block is None:
        return (len(stacks), 0)
    stack, _, index = block.rpartition(".")
    position = next((i for i, full in enumerate(stacks) if not stack or _short_stack(full, stacks) == stack), 0)
    return (position, int(index))
