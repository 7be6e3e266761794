"""What a probe step returns: per group b, A, R^2, PPI, eta*, the step, and the verdict that says why a fit was kept."""
import math
from dataclasses import dataclass

import torch

# Why a group's fit was kept or not, the first that applies (ProbeResult.verdict holds the index). Up to
# "unresolved" the probe could not measure the group this time, which is no evidence against it; from "b <= 0"
# on, it measured a reason.
VERDICTS = ("accepted", "not probed", "zero direction", "non-finite", "ledger full", "did not move", "unresolved",
            "b <= 0", "A <= 0", "R^2")
VERDICT = {name: code for code, name in enumerate(VERDICTS)}
# What the warnings say of the groups a probe could not measure, once a group and cause.
UNMEASURED = {
    "zero direction": "the direction is exactly zero (a gradient that is zero this step, as lora_A's while "
                      "lora_B is 0); such a probe is no evidence against the group, and its next one may measure it",
    "non-finite": "a loss, a direction element or the fit is not finite; the fit is not used",
    "did not move": "most of their elements did not change at some probe point: the step is below the "
                    "resolution of the group's dtype",
    "ledger full": "some chunks stayed unmoved because the ledger was full; it grows for the next probe",
}


@dataclass
class ProbeResult:
    """One probe step, per group in `names` order (device tensors; reading them is the caller's sync).

    b, A, r2, ppi, eta_star: float64; accepted: the fit passed b > 0, A > 0, R^2 > threshold and was
    reliable (and resolved, with Prober(require_resolved=True)); reliable: at every point most elements
    really moved or the realized step along the direction is within 10% of the nominal one (a direction
    that is zero on most elements, as an embedding's gradient is, moves few), and no chunk was left unmoved;
    resolved: the loss's noise moves A by at most adapeft.steps.RESOLVED_SHARE (10%) of |A|, whatever the sign
    of A (a resolved A < 0 is a measured non-convexity): at symmetric steps, a curvature term |A| t^2 / 2 at the
    widest point t of about 4 times the loss's `resolution`;
    noise: the standard deviation of one loss's error, measured from the groups' fourth differences where
    they started at eta (nan until measured; a forward pass in bfloat16 makes it far larger than the loss
    dtype's rounding); resolution: the larger of the loss dtype's eps times |L0| and sqrt(12) noise (the
    rounding step that gives that noise) less the noise of a forward pass in the loss's own dtype (4 eps |L0|;
    adapeft.steps.resolution), the unit the steps are chosen in; b_error, A_error: what each b and
    A may be off by from g.d and d.H.d (about one standard deviation): the noise through the fit plus the
    loss's cubic and quartic terms as the polynomial through the five losses shows them, at least one
    deviation of theirs (adapeft.steps.fit_errors); with slope="autograd", b_error is 0;
    probed: the group had a direction (frozen groups are skipped); losses and steps: K x 5 (column 2 the
    unperturbed loss, steps the realized ones); changed: K x 5 elements whose bits changed; scale: each
    group's step t_k at this probe (its points are {-s_k,-1,1,s_k} t_k, s_k = 2 unless the outer points went
    further out: adapeft.steps.outer_ratio); verdict: why each fit was kept or not,
    an index into VERDICTS (`reasons()` names them); eta: the step the probe was called with;
    b_fit: the five points' own least-squares slope (b itself unless Prober(slope="autograd"), where b is
    g.d from autograd and A and R^2 are fitted through it); slope_error: (b_fit - b) / |b|, how far the five
    points' slope is from the exact one (nan without slope="autograd"): near 0 where they lie on a parabola,
    a sharper test than R^2, which the rounding of a nearly flat loss can leave high.
    """

    names: list
    b: torch.Tensor
    A: torch.Tensor
    r2: torch.Tensor
    accepted: torch.Tensor
    ppi: torch.Tensor
    eta_star: torch.Tensor
    reliable: torch.Tensor
    resolved: torch.Tensor
    probed: torch.Tensor
    losses: torch.Tensor
    steps: torch.Tensor
    changed: torch.Tensor
    scale: torch.Tensor
    verdict: torch.Tensor
    eta: float
    b_fit: torch.Tensor
    slope_error: torch.Tensor
    noise: torch.Tensor
    resolution: torch.Tensor
    b_error: torch.Tensor
    A_error: torch.Tensor

    def reasons(self):
        """Each group's verdict by name (see VERDICTS; synchronises with the device)."""
        return [VERDICTS[code] for code in self.verdict.tolist()]

    def as_dict(self):
        """Per group (lists in `names` order): the step t, b, A, R^2, PPI, resolved and the verdict, with
        None where a number is not finite (JSON has no nan), and the probe's eta. Synchronises with the device."""
        def numbers(tensor):
            return [value if math.isfinite(value) else None for value in tensor.tolist()]
        noise, resolution = (numbers(value.reshape(1))[0] for value in (self.noise, self.resolution))
        return {"t": numbers(self.scale), "b": numbers(self.b), "A": numbers(self.A), "r2": numbers(self.r2),
                "ppi": numbers(self.ppi), "resolved": self.resolved.tolist(), "verdict": self.reasons(),
                "slope_error": numbers(self.slope_error), "b_error": numbers(self.b_error),
                "A_error": numbers(self.A_error), "noise": noise,
                "resolution": resolution, "eta": self.eta}

    def table(self):
        """A printable table (synchronises with the device). "A err": A_error over |A|."""
        host = {k: getattr(self, k).cpu().tolist()
                for k in ("scale", "b", "A", "A_error", "r2", "ppi", "eta_star", "probed", "slope_error")}
        exact = any(math.isfinite(v) for v in host["slope_error"])  # slope="autograd"
        rows = [f"{'group':12} {'t':>9} {'b':>11} {'A':>11} {'A err':>7} {'R^2':>8} {'PPI':>10} {'eta*':>9}"
                f"{' slope err' if exact else ''}  verdict"]
        for k, (name, verdict) in enumerate(zip(self.names, self.reasons())):
            if not host["probed"][k]:
                rows.append(f"{name:12} {'':>{82 if exact else 72}}  {verdict} (no direction)")
                continue
            error = f" {host['slope_error'][k]:9.2e}" if exact else ""
            relative = host["A_error"][k] / abs(host["A"][k]) if host["A"][k] else math.inf
            rows.append(f"{name:12} {host['scale'][k]:9.3g} {host['b'][k]:11.4e} {host['A'][k]:11.4e} "
                        f"{relative:7.1%} {host['r2'][k]:8.5f} {host['ppi'][k]:10.3e} {host['eta_star'][k]:9.3g}"
                        f"{error}  {verdict}")
        return "\n".join(rows)
