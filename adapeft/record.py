"""A probe record's fields (format adapeft.probe/1): what `adapeft probe`, the demos and the training callbacks
write of a probing run, and `adapeft select` and `adapeft plot` read."""
import torch


def probe_record(prober, units, squared_gradient=None):
    """A record's probe fields for the groups chosen from, `units`: their names, sizes, APPI and PPI of every
    probe, each a sum over the groups the prober probed (`units` themselves, or their parts from
    ParameterGroups.split_factors, whose own verdicts then go under "parts"); and where given, `squared_gradient`,
    each unit's training-gradient |g|^2 summed over the probe steps (adapeft.signals), which `adapeft select
    --values squared-gradient` chooses by."""
    def per_unit(ppi):
        reductions = (ppi.cpu() * torch.tensor(prober.groups.numel, dtype=torch.float64)).tolist()
        return [value / count for value, count in zip(units.values_from_parts(prober.names, reductions), units.numel)]

    fields = {"groups": units.names, "counts": units.numel, "appi": per_unit(prober.appi),
              "r2_threshold": prober.r2_threshold,
              "ppi_history": [per_unit(ppi) for ppi in prober.history]}
    if squared_gradient is not None:
        fields["squared_gradient"] = [float(value) for value in squared_gradient]
    measured = {"probe_history": [result.as_dict() for result in prober.results],
                "resolved_history": [result.resolved.tolist() for result in prober.results]}
    if prober.names == units.names:
        return {**fields, **measured}
    return {**fields, "parts": {"groups": prober.names, "counts": prober.groups.numel, **measured}}
