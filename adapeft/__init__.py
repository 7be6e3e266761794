"""adapeft: adaptive parameter-efficient fine-tuning.

Probe every parameter group with a few forward passes, fit the loss along its update direction, and
choose which groups to train. The compiled ops live under torch.ops.adapeft; the functions below serve
them on every device, falling back to the pure-PyTorch reference where a kernel is missing.
"""
from importlib import metadata as _metadata

from .groups import ParameterGroups, group_parameters, groups_like
from .llm import adapter_groups, causal_lm_loss, lora_config, lora_targets
from .optim import OptimizerDirection, optimizer_direction
from .ops import FitResult, group_fingerprint, new_ledger, new_report, pack_group, perturb_, quadratic_fit
from .ops.backend import BACKENDS, BUILD_INFO
from .ops.layout import CHUNK_ELEMENTS, REPORT_FIELDS
from .perturb import GroupPerturbation
from .probe import ProbeResult, Prober, ProbeSchedule, param_groups, probe
from .select import select
from .selection import Selection

try:
    __version__ = _metadata.version("adapeft")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that pip never installed
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS",
    "BUILD_INFO",
    "CHUNK_ELEMENTS",
    "REPORT_FIELDS",
    "FitResult",
    "OptimizerDirection",
    "GroupPerturbation",
    "ParameterGroups",
    "ProbeResult",
    "Prober",
    "ProbeSchedule",
    "Selection",
    "causal_lm_loss",
    "group_fingerprint",
    "group_parameters",
    "groups_like",
    "adapter_groups",
    "lora_config",
    "lora_targets",
    "new_ledger",
    "new_report",
    "optimizer_direction",
    "pack_group",
    "param_groups",
    "perturb_",
    "probe",
    "quadratic_fit",
    "select",
]
