"""Where each parameter of a model sits once the wrappers that only add to its name are seen through
(DistributedDataParallel, DataParallel, torch.compile, peft's model, tuner and base_layer), and which parameters
training would update under peft (not the original behind modules_to_save, not inactive adapters' weights); see
adapeft.groups for what the groups make of it."""
import sys
from dataclasses import dataclass

import torch


class _Peft:
    """The peft classes that decide where a parameter sits (see the module docstring)."""

    def __init__(self, peft):
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
        from peft.utils import other
        self.models = (peft.PeftModel, peft.PeftMixedModel)
        self.tuner, self.layer = BaseTuner, BaseTunerLayer
        # peft < 0.15 has ModulesToSaveWrapper alone; later ones derive it and TrainableTokensWrapper from this
        self.saved = getattr(other, "AuxiliaryTrainingWrapper", other.ModulesToSaveWrapper)


def _name_only_wrappers(peft):
    """(class, attribute holding the wrapped module) for the wrappers that add to the parameters' names and
    change nothing else. A model can only hold instances of imported classes, so torch.compile's and peft's
    are looked up only once their modules are imported (importing them costs seconds)."""
    wrappers = [((torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel), "module")]
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None:
        wrappers.append((eval_frame.OptimizedModule, "_orig_mod"))
    if peft is not None:
        wrappers += [(peft.models, "base_model"), (peft.tuner, "model"), (peft.layer, "base_layer")]
    return wrappers


def _wrapped_attribute(module, wrappers):
    return next((attribute for classes, attribute in wrappers if isinstance(module, classes)), None)


def _active_adapters(module):
    active = module.active_adapter  # a name or a list of names, in every peft version
    return frozenset([active] if isinstance(active, str) else active)


@dataclass(frozen=True)
class _Place:
    """Where a module sits in the unwrapped model: its path; for a container keyed by adapter name, the active
    adapters and whether their names stay in the path; for an adapter's weights, the path of the module the
    adapter is attached to (None elsewhere)."""

    path: tuple
    adapters: frozenset = None
    keeps_adapter_name: bool = False
    adapted: tuple = None

    def child(self, parent, key, peft, wrappers):
        """The place of `parent`'s module or parameter `key`, or None when training would not update it."""
        if self.adapters is not None:
            if key not in self.adapters:
                return None
            return _Place(self.path + (key,) if self.keeps_adapter_name else self.path, adapted=self.adapted)
        if peft is not None and isinstance(parent, peft.saved):
            # The copy of the active adapter takes the wrapped module's place and the original is not used;
            # TrainableTokensWrapper's token_adapter (a tuner layer) takes its place too.
            if key == "original_module":
                return None
            return _Place(self.path, _active_adapters(parent) if key == "modules_to_save" else None,
                          adapted=self.adapted)
        if peft is not None and isinstance(parent, peft.layer) and key in parent.adapter_layer_names:
            active = _active_adapters(parent)
            return _Place(self.path + (key,), active, keeps_adapter_name=len(active) > 1, adapted=self.path)
        if key == _wrapped_attribute(parent, wrappers):
            return _Place(self.path, adapted=self.adapted)
        return _Place(self.path + (key,), adapted=self.adapted)


@dataclass(frozen=True)
class Tensor:
    """A parameter to group: its name in the model given, its path in the unwrapped model, its module, and for
    an adapter's weight the path of the module the adapter is attached to."""

    name: str
    path: tuple
    param: torch.nn.Parameter
    owner: torch.nn.Module
    adapted: tuple = None

    @property
    def unwrapped_name(self):
        return ".".join(self.path)


def trainable_tensors(model):
    """The parameters that training `model` would update, each once, in the order of `model.named_parameters()`,
    and the model without its name-only wrappers."""
    peft = _Peft(sys.modules["peft"]) if "peft" in sys.modules else None
    wrappers = _name_only_wrappers(peft)
    places, modules, found, seen = {"": _Place(())}, {"": model}, [], set()
    # A shared module or tensor is visited under each of its names and grouped under the first one that is not
    # left out, which need not be the first one (the one named_parameters() keeps).
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            parent_name, _, key = name.rpartition(".")
            parent_place = places[parent_name]
            places[name] = None if parent_place is None else parent_place.child(modules[parent_name], key, peft,
                                                                                 wrappers)
            modules[name] = module
        place = places[name]
        if place is None:
            continue
        for key, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if hasattr(param, "ds_numel"):
                raise ValueError(
                    f"adapeft.group_parameters: parameter {f'{name}.{key}' if name else key!r} is partitioned by "
                    f"DeepSpeed ZeRO-3 ({param.ds_numel} elements, most of them on other ranks): adapeft cannot "
                    "probe or count it yet. Use ZeRO stage 1 or 2, FSDP2 (fully_shard) or DDP")
            param_place = place.child(module, key, peft, wrappers)
            if param_place is not None and id(param) not in seen:
                seen.add(id(param))
                found.append(Tensor(f"{name}.{key}" if name else key, param_place.path, param, module,
                                     param_place.adapted))
    unwrapped = model
    while _wrapped_attribute(unwrapped, wrappers) is not None:
        unwrapped = getattr(unwrapped, _wrapped_attribute(unwrapped, wrappers))
    return found, unwrapped
