"""The direction an optimizer is about to move each parameter in, read from its state without stepping it.

`optimizer_direction(optimizer, params)` describes, for each parameter, d such that the optimizer's next
step is `w <- w - lr * d` (per unit of learning rate), as the perturbation op forms it on the fly from the
gradient and the optimizer's state tensors: no parameter-sized buffer is made and the state is only read.
Supported: torch.optim.Adam (with amsgrad, maximize, and decoupled weight decay), torch.optim.AdamW and
torch.optim.SGD (momentum, dampening, nesterov, L2 weight decay, maximize).
"""
import math
from dataclasses import dataclass

import torch

from .ops import layout as L


@dataclass
class OptimizerDirection:
    """What GroupPerturbation needs to move a group along an optimizer's next update."""

    directions: list  # the gradients
    states: list
    layout: list
    hyper: torch.Tensor  # float64, HYPER_WORDS per tensor, on the parameters' device


def _param_groups_by_param(optimizer):
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found[id(p)] = group
    return found


def _bias_corrections(step, beta1, beta2):
    """(1 - beta1^t, sqrt(1 - beta2^t)) for the coming step t = step + 1, on the host."""
    t = float(step) + 1.0
    return 1.0 - beta1 ** t, math.sqrt(1.0 - beta2 ** t)


def check_supported(optimizer, owner="adapeft.optimizer_direction"):
    """Refuses an optimizer whose update this module cannot describe."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        raise TypeError(f"{owner}: {type(optimizer).__name__} is not supported; direction='optimizer' knows "
                        "torch.optim.Adam, AdamW and SGD (direction='grad', or pass your own directions otherwise)")


def optimizer_direction(optimizer, params):
    """Describe the next update of `optimizer` for `params` (which must have gradients)."""
    check_supported(optimizer)
    adam_like = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    owners = _param_groups_by_param(optimizer)
    directions, states, layout, rows, device_steps = [], [], [], [], []
    for i, p in enumerate(params):
        group = owners.get(id(p))
        if group is None:
            raise ValueError(f"adapeft.optimizer_direction: params[{i}] is not optimized by this optimizer")
        if p.grad is None:
            raise ValueError(f"adapeft.optimizer_direction: params[{i}] has no gradient; call backward() first")
        state = optimizer.state.get(p, {})
        directions.append(p.grad)
        sign = -1.0 if group.get("maximize", False) else 1.0
        named = []

        def keep(name):
            tensor = state.get(name)
            if tensor is None:
                named.append(-1)  # no state yet: the kernel reads zeros
            else:
                named.append(len(states))
                states.append(tensor)

        row = [0.0] * L.HYPER_WORDS
        row[L.HYPER_SIGN] = sign
        if adam_like:
            beta1, beta2 = group["betas"]
            decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
            if group["weight_decay"] and not decoupled:
                raise ValueError("adapeft.optimizer_direction: Adam with (L2) weight_decay makes the update nonlinear "
                                 "in the weights; use AdamW (decoupled weight decay) or direction='grad'")
            for name in ("exp_avg", "exp_avg_sq"):
                keep(name)
            if group.get("amsgrad", False):
                keep("max_exp_avg_sq")
            else:
                named.append(-1)
            step = state.get("step", 0)
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                device_steps.append((i, step, beta1, beta2))
                step = 0
            bc1, bc2_sqrt = _bias_corrections(step.item() if isinstance(step, torch.Tensor) else step, beta1, beta2)
            row[L.HYPER_LAMBDA] = group["weight_decay"] if decoupled else 0.0
            row[L.HYPER_BETA1], row[L.HYPER_BETA2], row[L.HYPER_EPS] = beta1, beta2, group["eps"]
            row[L.HYPER_BIAS_CORRECTION1], row[L.HYPER_BIAS_CORRECTION2_SQRT] = bc1, bc2_sqrt
            layout += [L.DIRECTION_ADAM] + named
        else:
            momentum, dampening = group["momentum"], group["dampening"]
            nesterov, decay = group["nesterov"], group["weight_decay"]
            buffer = state.get("momentum_buffer") if momentum else None
            if buffer is None:
                # No buffer yet: torch starts it at the (decayed) gradient, without dampening.
                grad_coefficient, buffer_coefficient = (1.0 + momentum if nesterov and momentum else 1.0), 0.0
            elif nesterov:
                grad_coefficient, buffer_coefficient = 1.0 + momentum * (1.0 - dampening), momentum * momentum
            else:
                grad_coefficient, buffer_coefficient = 1.0 - dampening, momentum
            if buffer is not None:
                keep("momentum_buffer")
            else:
                named.append(-1)
            named += [-1] * (L.STATES_PER_TENSOR - 1)
            row[L.HYPER_LAMBDA] = decay * grad_coefficient
            row[L.HYPER_GRAD_COEFFICIENT], row[L.HYPER_BUFFER_COEFFICIENT] = grad_coefficient, buffer_coefficient
            layout += [L.DIRECTION_SGD] + named
        rows.append(row)
    device = params[0].device
    hyper = torch.tensor(rows, dtype=torch.float64)
    hyper = hyper.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hyper
    for i, step, beta1, beta2 in device_steps:
        # A capturable optimizer keeps its step count on the device: form the corrections there, no sync.
        t = step.to(torch.float64) + 1
        hyper[i, L.HYPER_BIAS_CORRECTION1] = 1 - beta1 ** t
        hyper[i, L.HYPER_BIAS_CORRECTION2_SQRT] = torch.sqrt(1 - beta2 ** t)
    return OptimizerDirection(directions, states, layout, hyper.reshape(-1))
