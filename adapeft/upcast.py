"""Forward passes of a 16-bit model computed in float32, op by op, with no float32 copy of the model.

A bfloat16 forward pass rounds every activation to 8 bits of mantissa, which adds to the loss an error far
above float32's rounding: on a probe's small steps that error, not the step, is what the five losses show.
Inside `float32_compute()` every torch function that receives a bfloat16 or float16 tensor gets it as float32
(an exact conversion), and every request for a 16-bit dtype (`x.to(torch.bfloat16)`, `dtype=` of a new tensor,
a module's `.dtype`) gets float32: the forward pass computes as the same model stored in float32 would, one
op's weights converted at a time, so the extra memory is the largest weight and the float32 activations.
Ops that only move values (embedding lookups, views) run on the 16-bit tensor and convert the result, which
is the same and lighter. In-place ops on a 16-bit tensor run as they are, on that tensor.
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Ops whose result is made of the input's values, unchanged: converting their result is exact and cheaper
# than converting their input (an embedding table, in particular).
_GATHERS = {torch.nn.functional.embedding, torch.Tensor.__getitem__, torch.Tensor.view, torch.Tensor.reshape,
            torch.reshape, torch.Tensor.index_select, torch.index_select, torch.Tensor.transpose, torch.transpose,
            torch.Tensor.t, torch.Tensor.permute, torch.Tensor.unsqueeze, torch.Tensor.squeeze}


def _raised(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    if isinstance(value, torch.dtype) and value in LOW_PRECISION:
        return torch.float32
    return value


class _Float32Compute(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # an attribute: read it from the tensor as it is, a 16-bit dtype read as float32
            return _raised(func(*args, **kwargs))
        if func in _GATHERS:
            return tree_map(_raised, func(*args, **kwargs))
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].dtype in LOW_PRECISION:
            return func(*args, **kwargs)  # in place on a 16-bit tensor: on that tensor, not on a copy
        args, kwargs = tree_map(_raised, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def float32_compute(enabled=True):
    """Within the block, torch computes what 16-bit tensors feed into in float32 (see the module's doc)."""
    if not enabled:
        yield
        return
    with _Float32Compute():
        yield
