"""Independent oracles for the tests: numpy float32 (float64 for float64 storage) arithmetic and explicit
round-to-nearest-even, no torch kernels and no adapeft code."""
import numpy as np
import torch

BITS = {torch.float32: np.uint32, torch.bfloat16: np.uint16, torch.float16: np.uint16, torch.float64: np.uint64}
VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}


def arithmetic(dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def bits_of(t):
    """The raw bits of a tensor as a numpy unsigned array (a copy, on the host)."""
    return t.detach().cpu().reshape(-1).view(VIEWS[t.dtype]).numpy().view(BITS[t.dtype]).copy()


def to_float32(bits, dtype):
    """Values in the arithmetic type: float32, or float64 for float64 storage."""
    if dtype == torch.float64:
        return bits.view(np.float64)
    if dtype == torch.float32:
        return bits.view(np.float32)
    if dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def round_to(values, dtype):
    """Values of the arithmetic type rounded to `dtype` (nearest, ties to even), as bits."""
    if dtype == torch.float64:
        return np.ascontiguousarray(values, dtype=np.float64).view(np.uint64).copy()
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == torch.float32:
        return values.view(np.uint32).copy()
    if dtype == torch.float16:
        with np.errstate(over="ignore"):
            return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32).astype(np.uint64)
    nan = np.isnan(values)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(nan, (bits >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)


def step(w0_bits, direction, eta, dtype):
    """(bits of round(w0 - eta*d), whether stepping back by +eta*d misses w0), in the op's arithmetic type."""
    with np.errstate(all="ignore"):
        s = arithmetic(dtype)(np.float32(eta)) * direction.astype(arithmetic(dtype))
        moved = round_to(to_float32(w0_bits, dtype) - s, dtype)
        back = round_to(to_float32(moved, dtype) + s, dtype)
    return moved, back != w0_bits


def direction_float32(d):
    """The direction as the op reads it: float32, or float64 when it is stored in float64."""
    return d.detach().cpu().reshape(-1).to(torch.float64 if d.dtype == torch.float64 else torch.float32).numpy()
