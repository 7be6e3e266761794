"""Split a model's parameters into named groups: the paper's types, per layer, per tensor, or by rules.

The default types follow the PEFT methods they stand for: `lora_A`, `lora_B` (LoRA), `head` (linear
probing), `norm` (LayerNorm tuning: the weights of normalisation layers, found by module type), `bias`
(BitFit), `embed` (embedding tuning) and `others`. Every parameter lands in exactly one group; a tensor
shared by two modules (tied embeddings) is one parameter and lands once.

The groups hold the parameters that training the model would update, and nothing else. Under peft that
leaves out what the forward pass never uses: the `original_module` that a `modules_to_save` copy stands in
for, and the weights of inactive adapters (LoRA's `lora_A.<adapter>`, the copies `modules_to_save.<adapter>`).
The active adapters' weights are grouped, and so are the base model's weights, which peft freezes but which
a group such as `others` may choose to train. peft's `disable_adapter()` is a switch for inference and
changes no group.

Wrappers that only add to the parameters' names are seen through: DistributedDataParallel and DataParallel
(`module.`), torch.compile (`_orig_mod.`), peft's model and tuner (`base_model.model.`) and its layers'
`base_layer`, at any depth and nested. A wrapped model gets the groups, group names and counts of the model
it wraps, so a selection moves between them by group name; the same holds between a peft model and its
`merge_and_unload()` for the groups both have. Group names and rules see each parameter's name in the
unwrapped model, where a layer's adapter name is left out while that layer has one active adapter (as in
peft's saved adapter files); `tensor_names` keep the names in the model given, so that
`model.get_parameter(name)` finds them.
"""
import json
import re
from collections import OrderedDict

import torch

from .unwrap import trainable_tensors

TYPES = ("lora_A", "lora_B", "head", "norm", "bias", "embed", "others")
GRANULARITIES = ("type", "layer", "module", "tensor")
# peft's names of LoRA's factors and the factor each is (an embedding's adapter has names of its own)
LORA_FACTORS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}


def lora_factor(path):
    """The LoRA factor ("lora_A" or "lora_B") a parameter's path lies in, or None."""
    return next((LORA_FACTORS[part] for part in path if part in LORA_FACTORS), None)

# Module names that hold a model's output head, in Hugging Face and torchvision models.
HEAD_MODULE_NAMES = {"classifier", "score", "lm_head", "qa_outputs", "cls", "head", "heads", "fc",
                     "pre_classifier", "pooler_head", "classification_head"}
NORM_TYPES = tuple(t for t in (torch.nn.LayerNorm, torch.nn.GroupNorm, getattr(torch.nn, "RMSNorm", None),
                               torch.nn.modules.batchnorm._BatchNorm,
                               torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
                   if t is not None)
# Normalisation layers of other libraries (LlamaRMSNorm, T5LayerNorm, ...) are recognised by class name.
NORM_CLASS_NAME = re.compile(r"(Layer|RMS|Group|Batch|Instance|Scale)Norm", re.IGNORECASE)


class ParameterGroups:
    """Named groups of a model's parameters (see `group_parameters`).

    `names`: group names in a stable order; `numel`: parameters per group; `params(name)`: the tensors;
    `tensor_names(name)`: their qualified names in the model; `adapted_modules(name)`: the modules that the
    group's adapter weights adapt. `summary()` prints a table; `to_json()` gives a stable form to match a
    selection against another model by group name.
    """

    def __init__(self, model, members, granularity):
        self.model = model
        self.granularity = granularity
        self._members = members  # name -> list of adapeft.unwrap.Tensor
        self.names = list(members)
        self.numel = [sum(t.param.numel() for t in members[name]) for name in self.names]

    def params(self, name):
        self._check(name)
        return [t.param for t in self._members[name]]

    def tensor_names(self, name):
        self._check(name)
        return [t.name for t in self._members[name]]

    def adapted_modules(self, name):
        """Qualified names, in the model without its wrappers, of the modules whose adapters (peft's LoRA and
        the like) have weights in this group, in model order; [] for a group of no adapter's weights."""
        self._check(name)
        return list(dict.fromkeys(".".join(t.adapted) for t in self._members[name] if t.adapted is not None))

    def split_factors(self):
        """These groups with each LoRA factor apart: "self_attn.q_proj@3/lora_A" and ".../lora_B" (a group's other
        tensors stay under its own name; a group of one factor's tensors, as the "lora_A" type, stays whole). Probing both factors of an adapter as one group adds the
        product's cross term to the curvature, and along a descent direction, once B is no longer 0, that term
        is negative (it made the LLM demo's quick probe find A <= 0 for all 30 blocks); each factor alone has
        none. `whole(part)` names the group a part came from."""
        members = {}
        for name in self.names:
            factors = [lora_factor(tensor.path) for tensor in self._members[name]]
            whole = len(set(factors)) == 1  # one factor only (the "lora_A" type group), or none
            for tensor, factor in zip(self._members[name], factors):
                members.setdefault(name if whole or factor is None else f"{name}/{factor}", []).append(tensor)
        return ParameterGroups(self.model, members, f"{self.granularity}/factors")

    @staticmethod
    def whole(part):
        """The group a part of `split_factors` came from."""
        return part.rpartition("/")[0] if part.endswith(("/lora_A", "/lora_B")) else part

    def values_from_parts(self, parts, values):
        """Each group's value as the sum of its parts' (`parts`: group names of `split_factors`, or these groups'
        own; `values`: one per part), in `names` order."""
        totals = dict.fromkeys(self.names, 0.0)
        for part, value in zip(parts, values):
            totals[self.whole(part)] += value
        return [totals[name] for name in self.names]

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


def _default_type(tensor, head_ids, fallback_head_ids):
    path = tensor.path
    factor = lora_factor(path)
    if factor is not None:
        return factor
    if id(tensor.param) in head_ids or id(tensor.param) in fallback_head_ids or path[0] in HEAD_MODULE_NAMES:
        return "head"
    if _is_norm(tensor.owner) and path[-1] != "bias":
        return "norm"
    if path[-1] == "bias" or path[-1].endswith("_bias"):
        return "bias"
    if _is_embedding(tensor.owner):
        return "embed"
    return "others"


def block_position(path):
    """Where a qualified name ("model.layers.3.mlp.up_proj") or a path of its parts sits in a stack of blocks:
    (the stack's name, the block's index, the parts inside the block), or None outside one. The first part
    that is a number is the index in the first ModuleList on the way."""
    parts = path.split(".") if isinstance(path, str) else tuple(path)
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), parts[i + 1:]
    return None


def _block_of(path, stacks):
    """The transformer block a parameter belongs to: the index after a ModuleList, qualified by the
    list's path when the model has several (an encoder and a decoder)."""
    found = block_position(path)
    if found is None:
        return None
    stack, index, _ = found
    return f"{_short_stack(stack, stacks)}.{index}" if len(stacks) > 1 else str(index)


def _short_stack(stack, stacks):
    """The shortest trailing-free prefix part that tells this stack from the others (e.g. 'encoder')."""
    parts = stack.split(".")
    for part in parts:
        if sum(part in other.split(".") for other in stacks) == 1:
            return part
    return stack


def _stacks(paths):
    """The ModuleLists that hold blocks, in model order."""
    found = [block_position(path) for path in paths]
    return list(OrderedDict.fromkeys(stack for stack, _, _ in filter(None, found)))


def _rule_matcher(pattern):
    if callable(pattern):
        return pattern
    compiled = re.compile(pattern)
    return lambda name, param, module: compiled.search(name) is not None


def check_granularity(granularity, owner="adapeft.group_parameters"):
    if granularity not in GRANULARITIES:
        raise ValueError(f"{owner}: granularity must be one of {GRANULARITIES}, got {granularity!r}")


def check_grouping(granularity, rules=None, trainable_only=False, owner="adapeft.group_parameters"):
    """The errors group_parameters gives for its arguments before it looks at a model, so that those who group
    later (the callbacks, when training starts) can give them when made. Returns the rules as a list."""
    check_granularity(granularity, owner)
    if not isinstance(trainable_only, bool):  # any object is truthy: "no" would group only what trains
        raise TypeError(f"{owner}: trainable_only must be True or False, got {trainable_only!r}")
    # A string or a dict iterates as characters or keys, so it is refused as a whole, not pair by pair.
    if rules is not None and not isinstance(rules, (list, tuple)):
        raise TypeError(f"{owner}: rules must be a list of (group name, pattern) pairs, got "
                        f"{type(rules).__name__} {rules!r}")
    rules = list(rules or [])
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str) and rule[0]):
            raise TypeError(f"{owner}: rules must be (group name, pattern) pairs with a non-empty name, got {rule!r}")
        name, pattern = rule
        if not (callable(pattern) or isinstance(pattern, str)):
            raise TypeError(f"{owner}: rule {name!r} must be a regex string or a callable (name, param, module) -> "
                            f"bool, got {type(pattern).__name__}")
        if isinstance(pattern, str):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{owner}: rule {name!r}: {pattern!r} is not a regex ({error})") from None
    names = [name for name, _ in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: rule names must be unique, got {names}")
    return rules


def groups_like(model, granularity):
    """The groups of `model` at `granularity` as a Selection records it: a granularity of group_parameters, or one
    followed by "/factors" for ParameterGroups.split_factors of it."""
    base, _, parts = granularity.partition("/")
    if parts not in ("", "factors"):
        raise ValueError(f"adapeft.groups_like: granularity must be one of {GRANULARITIES}, or one followed by "
                         f"'/factors', got {granularity!r}")
    groups = group_parameters(model, granularity=base)
    return groups.split_factors() if parts else groups


def group_parameters(model, granularity="type", rules=None, trainable_only=False):
    """Split `model`'s parameters into named groups.

    granularity: "type" (the paper's lora_A, lora_B, head, norm, bias, embed, others), "layer" (type x
    transformer block, e.g. "norm@3"; parameters outside the blocks keep their type name), "module" (module x
    block, e.g. "self_attn.q_proj@3", the path inside the block: an adapter's weights (LoRA's A and B
    together) form the group of the module they adapt, and that module's own weights, where it has an adapter,
    the group "self_attn.q_proj.base_layer@3"; outside the blocks an adapter's weights form the group of its module's
    path, "lm_head", and other parameters keep their type name) or "tensor"
    (one group per parameter, named by its path in the unwrapped model).
    trainable_only: leave out the parameters that do not require gradients (a base model peft froze), so that
    the groups and their counts are those of what is being trained.
    rules: an ordered list of (group name, pattern) pairs taken before the defaults, pattern a regex
    searched in the parameter's qualified name in the unwrapped model or a callable (name, param, module)
    -> bool. A parameter matching two rules, or a rule matching nothing, is an error.
    Which parameters are grouped, and under which names: see the module docstring.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"adapeft.group_parameters: model must be a torch.nn.Module, got {type(model).__name__}")
    rules = check_grouping(granularity, rules, trainable_only)
    rule_names = [rule_name for rule_name, _ in rules]
    matchers = [(rule_name, _rule_matcher(pattern)) for rule_name, pattern in rules]

    tensors, unwrapped = trainable_tensors(model)
    if trainable_only:
        tensors = [t for t in tensors if t.param.requires_grad]
    if not tensors:
        raise ValueError("adapeft.group_parameters: the model has no parameters that training would update"
                         + (" and that require gradients (trainable_only=True)" if trainable_only else ""))
    head_ids = _output_head_ids(unwrapped)
    fallback_head_ids = set()
    if not hasattr(unwrapped, "get_output_embeddings") and not any(t.path[0] in HEAD_MODULE_NAMES for t in tensors):
        # A plain PyTorch model: its last Linear layer is the head (not a Linear of a LoRA adapter). A tensor is
        # listed under its first module only, so the layers are found among the modules: a decoder tied to the
        # embedding is the last Linear, and its weight stays the embedding's, as in a Hugging Face model; the
        # Linear before it is no head.
        base = {id(t.param) for t in tensors if t.adapted is None}
        linears = [module for module in unwrapped.modules() if isinstance(module, torch.nn.Linear)
                   and any(id(p) in base for p in module.parameters(recurse=False))]
        if linears:
            embedded = {id(p) for t in tensors if _is_embedding(t.owner) for p in t.owner.parameters(recurse=False)}
            fallback_head_ids = {id(p) for p in linears[-1].parameters()} - embedded
    stacks = _stacks(t.path for t in tensors)

    members = OrderedDict()
    by_rule = {rule_name: [] for rule_name in rule_names}
    by_default = []
    for tensor in tensors:
        hits = [rule_name for rule_name, match in matchers if _rule_hits(rule_name, match, tensor)]
        if len(hits) > 1:
            raise ValueError(f"adapeft.group_parameters: parameter {tensor.unwrapped_name!r} matches rules {hits}; "
                             "rules must not overlap")
        if hits:
            by_rule[hits[0]].append(tensor)
        else:
            by_default.append(tensor)
    empty = [rule_name for rule_name, found in by_rule.items() if not found]
    if empty:
        raise ValueError(f"adapeft.group_parameters: rules {empty} match no parameter of the model")
    members.update(by_rule)

    adapted = {t.adapted for t in by_default if t.adapted is not None}
    default = OrderedDict()
    for position, tensor in enumerate(by_default):
        kind = _default_type(tensor, head_ids, fallback_head_ids)
        if granularity == "tensor":
            label, order = tensor.unwrapped_name, (position,)
        elif granularity == "module":
            block = _block_of(tensor.path, stacks)
            if block is not None:
                label = f"{_module_in_block(tensor, adapted)}@{block}"
            else:  # an adapter outside the blocks (a LoRA on the embedding or the head) is its module's, as inside
                label = kind if tensor.adapted is None else ".".join(tensor.adapted)
            order = (_block_sort_key(block, stacks), position)
        elif granularity == "layer":
            block = _block_of(tensor.path, stacks)
            label = kind if block is None else f"{kind}@{block}"
            order = (TYPES.index(kind), _block_sort_key(block, stacks))
        else:
            label, order = kind, (TYPES.index(kind),)
        default.setdefault(label, (order, []))[1].append(tensor)
    for label, (_, found) in sorted(default.items(), key=lambda item: item[1][0]):
        if label in members:
            raise ValueError(f"adapeft.group_parameters: rule name {label!r} collides with a default group; "
                             "rename the rule")
        members[label] = found
    return ParameterGroups(model, members, granularity)


def _rule_hits(rule_name, match, tensor):
    """Whether a rule's pattern matches `tensor`; a callable's own error would name neither the rule nor the
    parameter it failed on."""
    try:
        return match(tensor.unwrapped_name, tensor.param, tensor.owner)
    except Exception as error:
        raise RuntimeError(f"adapeft.group_parameters: rule {rule_name!r} failed on parameter {tensor.unwrapped_name!r}"
                           f": {error!r}; a callable rule is called as (name, param, module) -> bool") from error


def _module_in_block(tensor, adapted):
    """The path inside its block of the module a tensor belongs to (for an adapter's weight, the adapted
    module; for the own weights of an adapted module, its base_layer)."""
    module = tensor.adapted if tensor.adapted is not None else tensor.path[:-1]
    inside = block_position(module)[2]
    if tensor.adapted is None and module in adapted:
        inside += ("base_layer",)
    return ".".join(inside) or tensor.path[-1]  # a tensor of the block module itself: its own name


def _block_sort_key(block, stacks):
    """Blocks in model order (stacks as discovered, then index), parameters outside any block last."""
    if block is None:
        return (len(stacks), 0)
    stack, _, index = block.rpartition(".")
    position = next((i for i, full in enumerate(stacks) if not stack or _short_stack(full, stacks) == stack), 0)
    return (position, int(index))
