"""Loads the compiled extension and fills every missing backend with the pure-PyTorch reference.

Import never fails because a backend is missing: where the compiled kernel of an op is absent for a
device, the reference runs instead and the first call says which op and why. With
ADAPEFT_REQUIRE_EXT=1 a missing extension or missing CPU kernels raise instead, so that a silent
fallback cannot pass CI.
"""
import functools
import importlib
import os
import warnings

import torch

from . import knapsack_reference, reference

OPS = ("pack_group", "perturb_", "quadratic_fit", "knapsack_greedy", "knapsack_exact", "knapsack_pareto",
       "knapsack_exhaustive")
# The knapsack is CPU work whatever the model's device: those ops have no CUDA kernel, by design.
CPU_ONLY = ("knapsack_greedy", "knapsack_exact", "knapsack_pareto", "knapsack_exhaustive")
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
REQUIRE_EXT = os.environ.get("ADAPEFT_REQUIRE_EXT", "0") == "1"

try:
    _C = importlib.import_module("adapeft._C")
    LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = error

if _C is None:
    if REQUIRE_EXT:
        raise ImportError(f"ADAPEFT_REQUIRE_EXT=1 but the compiled extension adapeft._C failed to load: {LOAD_ERROR}")
    warnings.warn(
        f"adapeft: the compiled extension could not be loaded ({LOAD_ERROR}); every op runs the pure-PyTorch "
        "reference, which is exact but slow. Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
    BUILD_INFO = {"openmp": False, "cuda": False}
else:
    BUILD_INFO = dict(_C.build_info())


def _compiled(op, key):
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"adapeft::{op}", key)


#: Which implementation serves each op on each device type: "compiled" or "reference" ("cpu only" for the
#: knapsack ops on CUDA).
BACKENDS = {op: {device: "cpu only" if device == "cuda" and op in CPU_ONLY
                 else "compiled" if _compiled(op, key) else "reference" for device, key in DEVICE_KEYS.items()}
            for op in OPS}

if REQUIRE_EXT:
    missing = [op for op in OPS if BACKENDS[op]["cpu"] != "compiled"]
    if missing:
        raise ImportError(f"ADAPEFT_REQUIRE_EXT=1 but adapeft._C lacks CPU kernels for {missing}")


def _why_missing(device):
    if _C is None:
        return f"the compiled extension could not be loaded ({LOAD_ERROR})"
    if device == "cuda" and not BUILD_INFO["cuda"]:
        return ("this build of adapeft has no CUDA kernels (it was compiled against a torch without CUDA, without "
                "nvcc, or with ADAPEFT_CUDA=0)")
    return "the compiled extension has no kernel for it"


def _fallback(op, device):
    """The reference implementation of `op`, warning once on its first call on `device`."""
    implementation = getattr(knapsack_reference if op.startswith("knapsack_") else reference, op)
    warned = []

    @functools.wraps(implementation)
    def run(*args, **kwargs):
        if not warned:
            warnings.warn(f"adapeft.{op}: no compiled {device.upper()} kernel ({_why_missing(device)}); running the "
                          "pure-PyTorch reference", RuntimeWarning, stacklevel=3)
            warned.append(True)
        return implementation(*args, **kwargs)

    return run


if _C is not None:
    from . import fake  # noqa: F401  (registers the fake implementations)

    for _op in OPS:
        for _device, _key in DEVICE_KEYS.items():
            if BACKENDS[_op][_device] == "reference" and not (_device == "cuda" and _op in CPU_ONLY):
                torch.library.impl(f"adapeft::{_op}", _device, func=_fallback(_op, _device))

    def call(op):
        return getattr(torch.ops.adapeft, op)
else:
    _fallbacks = {op: _fallback(op, "cpu") for op in OPS}

    def call(op):
        return _fallbacks[op]
