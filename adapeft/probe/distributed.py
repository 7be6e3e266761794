"""Probing under torch.distributed: which ranks probe together, one collective that makes them agree on every
number, and FSDP2's shards (each rank moves its own; the next forward pass gathers them afresh)."""
import torch

from ..ops import layout as L


def is_sharded(tensor):
    return type(tensor).__name__ == "DTensor"


def local(tensor):
    """The part of a tensor this rank holds (a DTensor's local shard; any other tensor itself)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard(modules):
    """FSDP2 keeps some modules' gathered parameters after a forward pass (the root's, by default): drop them,
    so that the next forward gathers the shards as they are now."""
    for module in modules:
        module.reshard()


def process_group_for(model, groups, requested, direction):
    """(process group whose ranks probe together, whether the parameters are sharded across it), checked."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    params = [p for name in groups.names for p in groups.params(name)]
    sharded = [p for p in params if is_sharded(p)]
    if sharded:
        # Equal meshes, not one object: fully_shard without mesh= (as accelerate calls it) makes a default mesh
        # of the whole world at every call.
        mesh = sharded[0].device_mesh
        why = ("its parameters lie on different device meshes" if any(p.device_mesh != mesh for p in sharded) else
               f"its device mesh has {mesh.ndim} dimensions" if mesh.ndim != 1 else
               f"{len(params) - len(sharded)} of its {len(params)} parameters are plain tensors beside sharded ones"
               if len(sharded) != len(params) else None)
        if why is not None:
            raise NotImplementedError("adapeft.Prober: parameters sharded over one 1-D device mesh (FSDP2's "
                                      f"fully_shard) are supported; in this model {why}")
        if direction == "optimizer":
            raise NotImplementedError("adapeft.Prober: direction='optimizer' is not supported on sharded (FSDP2) "
                                      "parameters yet; use direction='grad'")
        return (mesh.get_group() if requested == "auto" else requested), True
    if requested == "auto":
        return (model.process_group if isinstance(model, DistributedDataParallel) else None), False
    if requested is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("adapeft.Prober: process_group was given but torch.distributed is not initialised")
    return requested, False


def sum_over_ranks(tensor, group):
    """The sum of `tensor` over the ranks of `group` (a new tensor)."""
    import torch.distributed as dist
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def mean_over_ranks(tensor, group):
    """The mean of `tensor` over the ranks of `group` (a new tensor)."""
    import torch.distributed as dist
    return sum_over_ranks(tensor, group) / dist.get_world_size(group)


def agree(losses, report, plans, names, group, sharded):
    """One collective: the mean over the ranks of every loss (each rank measured its own batch; a nan on any
    rank rejects that group on all), and with sharded parameters the moves' measurements summed: the realized
    step is -sum(d.dw)/sum(d.d) over all shards, so each rank's step is weighted by its shards' sum(d.d). On
    CUDA (NCCL) the wait is the stream's, not the host's. losses: K x 5, report: K*5 rows, both in place."""
    import torch.distributed as dist
    k = len(names)
    report = report.view(k, 5, len(L.REPORT_FIELDS))
    parts = [losses]
    if sharded:
        # sum(d.d) of each group's shards: one multi-tensor norm pass, no copy of the directions
        norms = torch.stack([torch.stack(torch._foreach_norm(plans[name].directions)).double().square().sum()
                             if name in plans else torch.zeros((), dtype=torch.float64, device=losses.device)
                             for name in names])
        summed = report[:, :, [L.REPORT_CHANGED, L.REPORT_UNMOVED]]
        parts += [report[:, :, L.REPORT_STEP] * norms[:, None], norms[:, None], summed]
    packed = torch.cat([part.reshape(k, -1) for part in parts], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    losses.copy_(packed[:, :5] / dist.get_world_size(group))
    if sharded:
        norms = packed[:, 10:11]
        report[:, :, L.REPORT_STEP] = torch.where(norms > 0, packed[:, 5:10] / norms, 0.0)
        report[:, :, L.REPORT_CHANGED] = packed[:, 11:21].reshape(k, 5, 2)[:, :, 0]
        report[:, :, L.REPORT_UNMOVED] = packed[:, 11:21].reshape(k, 5, 2)[:, :, 1]
