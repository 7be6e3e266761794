"""What the probe guarantees comes back as it was: training flags, the RNG, float32 precision settings."""
import contextlib
import math
import numbers

import torch


def check_eta(eta, owner="adapeft.Prober.step"):
    """eta as a positive finite float, or a TypeError or ValueError naming it and `owner`."""
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1 or eta.device.type != "cpu":
            raise TypeError(f"{owner}: eta must be a positive number (a Python float, or a one-element CPU tensor); "
                            "a device tensor would need a host synchronisation to check")
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"{owner}: eta must be a positive number, got {type(eta).__name__}")
    eta = float(eta)
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"{owner}: eta must be positive and finite, got {eta}")
    return eta


@contextlib.contextmanager
def model_untouched(model, modules, device):
    """Eval mode and a forked RNG for the probe; every module's own training flag and the RNG state seen by
    the next training step come back exactly, whatever happens inside. `modules`: list(model.modules())."""
    modes = [(module, module.training) for module in modules]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            # Each flag set costs a Module.__setattr__; on a model already in eval mode (and on the way
            # back, for flags that did not change) none is needed: a graphed probe waits for this.
            if any(training for _, training in modes):
                model.eval()
            yield
    finally:
        for module, training in modes:
            if module.training != training:
                set_training(module, training)


def set_training(module, flag):
    """`module.training = flag`, bypassing nn.Module.__setattr__ where the class keeps it: its checks for
    parameters, modules and buffers never apply to a bool, and cost 1.2 ms a probe step on GPT-2-large's
    838 modules (a CPU core of the development machine). A class's own __setattr__ is kept."""
    if type(module).__setattr__ is torch.nn.Module.__setattr__:
        object.__setattr__(module, "training", flag)
    else:
        module.training = flag


# The per-backend float32 precision settings of torch >= 2.9; older versions have only the global ones.
_FP32_PRECISION_SETTINGS = [("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"),
                            ("mkldnn", "conv"), ("mkldnn", "rnn")]


@contextlib.contextmanager
def full_float32_precision():
    """float32 matrix products and convolutions at full precision (no TF32, no bfloat16 emulation) while the
    probe measures, whatever the process set for training: TF32 rounds every product's inputs to 10
    mantissa bits, below which a step of one learning rate vanishes (GPT-2-small with LoRA on an H100: the
    LoRA groups' APPI came out 10^4 times smaller, the norms' 100 times). Every setting comes back exactly.
    torch >= 2.9 has per-backend settings besides the global ones, and refuses reads of the global ones
    once the per-backend ones were set: where the process uses the global ones they are set (so that both
    kinds of read work inside), and the per-backend ones only where it uses those."""
    backends = [getattr(getattr(torch.backends, backend), op) for backend, op in _FP32_PRECISION_SETTINGS
                if hasattr(getattr(torch.backends, backend, None), op)]
    per_backend = [backend.fp32_precision for backend in backends]
    try:
        legacy = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # refused: the per-backend settings are in use
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    else:
        for backend in backends:
            backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        for backend, precision in zip(backends, per_backend):
            backend.fp32_precision = precision
