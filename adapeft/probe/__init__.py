"""The Hessian-informed probe (the paper's Algorithm 1): per group, the loss reduction and learning rate.

Call `Prober.step(batch, eta)` after `backward()` and before `optimizer.step()`. For every group k alone
the model is moved in place to w - x * d_k for x in {-s_k,-1,1,s_k}*t_k, the loss is measured, and the group
is restored bit for bit (t_k: each group's own step, from eta, chosen to resolve its curvature; s_k: 2, or
further out where the inner points show the curvature too small to resolve at 2 t_k; see adapeft.steps, or
step_policy="fixed" for the paper's {-2,-1,1,2}*eta); one fused fit turns the K x 5 losses into b ~ G.d, A ~ d.H.d, R^2,
PPI = b^2/(A n) and eta* = b/A, accumulating PPI into APPI. On CUDA nothing in `step()` waits for the
device (the user's loss_fn aside), and the model, its gradients, buffers, training modes, the optimizer
and the RNG are left exactly as they were, also when loss_fn raises or the user presses Ctrl-C.
"""
from .plan import GroupPlan
from .points import POINTS
from .prober import BACKENDS, COMPUTES, SLOPES, Prober, ProbeSchedule, param_groups, probe
from .result import UNMEASURED, VERDICT, VERDICTS, ProbeResult

__all__ = ["BACKENDS", "COMPUTES", "POINTS", "SLOPES", "UNMEASURED", "VERDICT", "VERDICTS", "GroupPlan", "ProbeResult",
           "ProbeSchedule", "Prober", "param_groups", "probe"]
