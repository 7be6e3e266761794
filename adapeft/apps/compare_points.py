"""`adapeft demo --compare-points`: a three-point probe and a five-point one (both with exact slopes) run beside the
demo's probe on the same batches, steps and directions, and how far their answers differ: which groups each
accepts, their A where both accept, and the groups the knapsack chooses from each one's APPI."""
import statistics

from ..select import select

# The probes compared, as AdaPEFT.probe_train's `compare` takes them.
PROBES = {"five points": {"slope": "autograd", "points": 5}, "three points": {"slope": "autograd", "points": 3}}


def agreement(run, units, budget):
    """{per probe: accepted by each, by both, the same verdict; A's relative difference where both accept
    (median, largest); each one's selection at `budget` and their overlap; their seconds, forward passes and
    backward passes (of the exact slopes) in all}. run: the ProbeRun with PROBES compared; units: the
    ParameterGroups chosen from (the probed groups, or those they are parts of: ParameterGroups.split_factors)."""
    five, three = run.compared["five points"], run.compared["three points"]
    probes = []
    for r5, r3 in zip(five.results, three.results):
        a5, a3 = r5.accepted.cpu(), r3.accepted.cpu()
        both = a5 & a3
        difference = ((r3.A - r5.A).abs() / r5.A.abs()).cpu()[both].tolist()
        probes.append({"accepted_five": int(a5.sum()), "accepted_three": int(a3.sum()), "accepted_both": int(both.sum()),
                       "same_verdict": int((a5 == a3).sum()), "groups": len(a5),
                       "A_difference_median": statistics.median(difference) if difference else None,
                       "A_difference_largest": max(difference) if difference else None})
    chosen = {}
    for label, prober in (("five points", five), ("three points", three)):
        chosen[label] = select(prober, units=units, budget=budget, method="exact").chosen
    shared = set(chosen["five points"]) & set(chosen["three points"])
    union = set(chosen["five points"]) | set(chosen["three points"])
    return {"probes": probes, "chosen": chosen, "chosen_shared": len(shared),
            "chosen_jaccard": len(shared) / len(union) if union else 1.0,
            "seconds": dict(run.compared_seconds),
            "passes": {label: prober.forward_passes for label, prober in run.compared.items()},
            "backward_passes": {label: prober.backward_passes for label, prober in run.compared.items()}}


def describe(found):
    """One line per probe and one for the selections, for the demos' logs."""
    lines = []
    for i, probe in enumerate(found["probes"]):
        median = probe["A_difference_median"]
        lines.append(f"  probe {i}: five points accepted {probe['accepted_five']}, three {probe['accepted_three']}, "
                     f"both {probe['accepted_both']} of {probe['groups']} (same verdict {probe['same_verdict']}); "
                     + ("A differs by a median " f"{median:.2%}, at most {probe['A_difference_largest']:.2%}"
                        if median is not None else "no group accepted by both"))
    lines.append(f"  chosen: five points {found['chosen']['five points']}, three points "
                 f"{found['chosen']['three points']} ({found['chosen_shared']} shared, Jaccard "
                 f"{found['chosen_jaccard']:.2f}); forward passes {found['passes']}, seconds "
                 + ", ".join(f"{label} {seconds:.1f}" for label, seconds in found["seconds"].items()))
    return lines
