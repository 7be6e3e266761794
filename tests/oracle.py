"""Independent oracles for the tests: numpy float32 arithmetic and explicit round-to-nearest-even, no
torch kernels and no adapeft code."""
import numpy as np
import torch

BITS = {torch.float32: np.uint32, torch.bfloat16: np.uint16, torch.float16: np.uint16}


def bits_of(t):
    """The raw bits of a tensor as a numpy unsigned array (a copy, on the host)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return t.detach().cpu().reshape(-1).view(view).numpy().view(BITS[t.dtype]).copy()


def to_float32(bits, dtype):
    if dtype == torch.float32:
        return bits.view(np.float32)
    if dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def round_to(values, dtype):
    """float32 values rounded to `dtype` (nearest, ties to even), as bits."""
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


def step(w0_bits, direction32, eta, dtype):
    """(bits of round(w0 - eta*d), whether stepping back by +eta*d misses w0), all in float32 as the op does."""
    with np.errstate(all="ignore"):
        s = np.float32(eta) * direction32
        moved = round_to(to_float32(w0_bits, dtype) - s, dtype)
        back = round_to(to_float32(moved, dtype) + s, dtype)
    return moved, back != w0_bits


def direction_float32(d):
    return d.detach().cpu().float().reshape(-1).numpy()
