"""Hessian-informed learning rates: each accepted group's learning rate moved toward its eta* = b/A."""
import torch


class LearningRates:
    """The optimizer's param groups of the prober's groups (one each, named under "adapeft_group", as
    adapeft.param_groups builds them) and GeN's safeguards: an accepted group's lr moves toward eta*, clipped to
    [low lr, high lr], by an EMA."""

    def __init__(self, optimizer, direction, names, groups, ema, clip):
        if direction != "optimizer":
            raise ValueError("adapeft.Prober: apply_lr=True needs direction='optimizer', so that eta* is a learning "
                             "rate of that optimizer")
        by_name = {group.get("adapeft_group"): group for group in optimizer.param_groups}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise ValueError(f"adapeft.Prober: apply_lr=True needs one optimizer param group per adapeft group; "
                             f"none is named for {missing}. Build them with adapeft.param_groups(groups, lr=...)")
        for name in names:
            if {id(p) for p in by_name[name]["params"]} != {id(p) for p in groups.params(name)}:
                raise ValueError(f"adapeft.Prober: the optimizer param group named {name!r} does not hold exactly "
                                 "that group's parameters")
        self.param_groups = [by_name[name] for name in names]
        self.ema, self.clip = ema, clip

    def apply(self, result):
        """Tensor learning rates on the device are updated there; float ones cost one host synchronisation."""
        low, high = self.clip
        floats = [k for k, group in enumerate(self.param_groups) if not isinstance(group["lr"], torch.Tensor)]
        if floats:
            accepted, eta_star = result.accepted.tolist(), result.eta_star.tolist()
        for k, group in enumerate(self.param_groups):
            lr = group["lr"]
            if k in floats:
                if accepted[k]:
                    target = min(max(eta_star[k], low * lr), high * lr)
                    group["lr"] = self.ema * lr + (1 - self.ema) * target
                continue
            star = result.eta_star[k].to(lr.device, lr.dtype)
            target = torch.minimum(torch.maximum(star, low * lr), high * lr)
            moved = self.ema * lr + (1 - self.ema) * target
            lr.copy_(torch.where(result.accepted[k].to(lr.device), moved, lr))
