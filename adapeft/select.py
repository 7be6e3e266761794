"""Choose the trainable groups: the paper's 0-1 knapsack (value = loss reduction, weight = parameters).

`select(values=..., counts=..., budget=..., method=...)`, or `select(prober, budget=...)` straight from a
probe (values = APPI x parameters), returns a `Selection`:
- "greedy" (the paper's 3.2): groups by value per parameter (APPI), the K + 1 nested sets; with a budget,
  the nested set of most value that fits, and among those the one with the fewest parameters.
- "exact": the refined optimum of Theorem 2.2 for the budget: the most loss reduction, and among all sets
  that reach it, the one with the fewest parameters.
- "pareto": every non-dominated (parameters, value) set, each once, exactly for up to `max_exact_groups`
  groups; beyond that the nested greedy sets plus exact optima at `budgets` (and at `budget`), each point
  labelled. With a budget, the chosen set is the frontier's refined optimum within it.

How values compare: exactly, as the real numbers the given doubles stand for (csrc/knapsack.h). 1 + 2
equals 3 and 1/1 is as efficient as 3/3, so ties of values, of sums and of ratios are real ties; and the
doubles 0.1 + 0.2 sum to more than the double 0.3, as they do in exact arithmetic. Reported values are the
exact sums rounded once to a double (what `math.fsum` gives), so two frontier points whose values differ
below double precision can print alike. Among equally efficient groups the greedy order takes fewer
parameters first, then the name. Values that are all zero select nothing.

The budget is a share of all parameters: the capacity is floor(budget x total) computed exactly, with a
float budget read as the decimal it prints as (0.3 is 3/10, so 0.3 of 10 equal groups is 3 of them).

`Selection.proven` is true only when the chosen set is certified the refined optimum for the budget and,
for method="pareto", the frontier holds every non-dominated point; `notes` say why when it is not. From a prober,
a note also says when the accepted groups' eta* = b/A lie a median FAR_STEPS or more steps of the probes' eta away
(far_step_note): a training at that rate gains about steps x eta x b, which ranks groups by b, not by the values.
`select(prober, horizon=steps)` values each probe by what a training of that many steps at its eta reaches instead
(horizon_appi), a fit rejected for its negative curvature alone by its linear gain.
"""
import bisect
import decimal
import itertools
import math
import numbers
import statistics
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .groups import check_grouping
from .ops import backend as _backend
from .probe import Prober
from .probe.guards import check_eta
from .probe.result import VERDICT
from .selection import Frontier, Selection

METHODS = ("greedy", "exact", "pareto")
DEFAULT_BUDGETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# The exact frontier is kept for up to 64 groups (its masks are 64-bit) and 5 million points. Measured by
# benchmarks/bench_select.py: realistic, uniform and strongly correlated instances of 64 groups have
# frontiers of 10^3-10^4 points, found in milliseconds; values exactly proportional to counts (every
# efficiency tied) reach the point limit within a second, and the greedy frontier is used instead.
MAX_EXACT_GROUPS = 64
MAX_FRONTIER_POINTS = 5_000_000
MAX_EXACT_STATES = 20_000_000  # about 0.5 GB of search states at most


class _NestedSets:
    """The greedy order and its nested sets: size j holds the first j groups of the order (j = 0..K)."""

    def __init__(self, problem):
        order, nested_values = _backend.call("knapsack_greedy")(problem.v, problem.c, problem.rank)
        self.order = order.numpy()
        self.counts = np.concatenate([[0], np.cumsum(problem.c.numpy()[self.order])]).tolist()
        self.values = [0.0] + nested_values.tolist()
        # Groups of zero value sort last (they are the least efficient): the first `positive` have value.
        self.positive = int(np.count_nonzero(problem.v.numpy()))
        self.k = len(self.order)

    def mask(self, size):
        mask = np.zeros(self.k, dtype=bool)
        mask[self.order[:size]] = True
        return mask

    def best_within(self, capacity):
        """The size of the nested set of most value within `capacity`, the fewest parameters among ties."""
        fitting = bisect.bisect_right(self.counts, capacity) - 1
        return min(fitting, self.positive)

    def certified(self, size, capacity):
        """Whether nested set `size` is the refined optimum at `capacity`. It is when it leaves nothing of
        value out, or when it fills the capacity exactly: it is then the linear relaxation's optimum, and
        with every efficiency positive any lighter set is worth strictly less."""
        return size == self.positive or self.counts[size] == capacity


@dataclass
class _Problem:
    names: list
    values: list
    counts: list
    v: torch.Tensor
    c: torch.Tensor
    rank: torch.Tensor

    @property
    def total(self):
        return int(self.c.sum())

    def selection(self, mask, method, budget, **fields):
        return Selection(self.names, self.values, self.counts, mask, method, budget, **fields)

    def exact_values(self):
        """Every value as an integer on one power-of-two scale, so that sums compare exactly."""
        ratios = [float(v).as_integer_ratio() for v in self.values]
        scale = max(d.bit_length() for _, d in ratios) - 1
        return [n << (scale - d.bit_length() + 1) for n, d in ratios]


MAX_COUNT = 1 << 42  # parameters a group may have (the knapsack's sums stay within 2^62)


def _vector(x, what):
    """`x` as a 1-D numpy array of numbers, checked."""
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 1:
        raise ValueError(f"adapeft.select: {what} must be a vector, one number per group; got shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"adapeft.select: {what} must be numbers, got {array.tolist()[:8]}")
    return array


def _first(bad, array, what, why):
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"adapeft.select: {what}[{i}] = {array[i].item()!r}; {why}")


def _checked(values, counts):
    """(values, counts) as lists of floats and ints, with a ValueError naming the first bad entry."""
    values, counts = _vector(values, "values"), _vector(counts, "counts")
    if np.issubdtype(values.dtype, np.integer):
        _first(np.abs(values) > 2**53, values, "values", "integers beyond 2^53 are not exact as doubles")
    values = values.astype(np.float64)
    _first(~np.isfinite(values) | (values < 0), values, "values", "loss reductions must be finite and >= 0")
    whole = counts if np.issubdtype(counts.dtype, np.integer) else np.where(np.isfinite(counts), counts, 0.5)
    _first(whole != np.round(whole), counts, "counts", "counts must be whole numbers of parameters")
    _first((counts < 1) | (counts > MAX_COUNT), counts, "counts",
           "every group has between 1 and 2^42 parameters")
    return values.tolist(), counts.astype(np.int64).tolist()


def budget_share(budget, argument="budget", owner="adapeft.select"):
    """A budget as an exact fraction of the parameters, checked to lie in [0, 1]. A float is read as the
    decimal it prints as (0.3 is 3/10, not the double just below it); ints, Fractions and Decimals as they are."""
    share = None
    if isinstance(budget, bool):
        pass
    elif isinstance(budget, (numbers.Rational, decimal.Decimal)):
        share = Fraction(budget) if not isinstance(budget, decimal.Decimal) or budget.is_finite() else None
    elif isinstance(budget, numbers.Real) and math.isfinite(budget):
        text = (np.format_float_positional(budget, unique=True, trim="-") if isinstance(budget, np.floating)
                else repr(float(budget)))
        share = Fraction(text)
    if share is None or not 0 <= share <= 1:
        raise ValueError(f"{owner}: {argument} must be a share of the parameters in [0, 1], got {budget!r}")
    return share


def check_settings(owner, budget, method, granularity, eta, budget_given_later=False, rules=None,
                   trainable_only=False):
    """The errors a probing run's selection settings would give at its end, at once: those of select() for
    `budget` and `method` (budget_given_later: a missing budget may still come), group_parameters' for
    `granularity`, `rules` and `trainable_only`, the probe's for `eta` (None: the learning rate)."""
    check_budget_and_method(budget, method, owner, budget_needed=not budget_given_later)
    check_grouping(granularity, rules, trainable_only, owner)
    if eta is not None:
        check_eta(eta, owner)


def check_budget_and_method(budget, method, owner="adapeft.select", budget_needed=True):
    """The errors select() would give for `budget` and `method`, named for `owner`, which selects later
    (budget_needed=False: a missing budget may still be given to it)."""
    if method not in METHODS:
        raise ValueError(f"{owner}: method must be one of {METHODS}, got {method!r}")
    if budget is not None:
        budget_share(budget, owner=owner)
    elif method == "exact" and budget_needed:
        raise ValueError(f"{owner}: method='exact' needs a budget")


def capacity_of(budget, total):
    """The parameters `budget` allows out of `total`: floor(budget x total), exactly (see budget_share)."""
    share = budget_share(budget)
    return share.numerator * int(total) // share.denominator


def select(prober_or_values=None, counts=None, *, values=None, budget=None, method="greedy", names=None,
           budgets=DEFAULT_BUDGETS, max_exact_groups=MAX_EXACT_GROUPS, units=None, horizon=None):
    """Choose groups to train (see the module docstring). units: with a Prober that probed the parts of these
    groups (ParameterGroups.split_factors), choose among `units`, each valued as the sum of its parts'.
    horizon: with a Prober, value each probe of a group by what a training of that many steps at the probe's eta
    can reach of it (horizon_appi) instead of by a full step to eta*."""
    if isinstance(prober_or_values, Prober):
        prober = prober_or_values
        if values is not None:
            raise TypeError("adapeft.select: a Prober brings its own values (APPI x parameters); give values= with "
                            "counts= instead of the Prober to choose by other values")
        if counts is not None and len(counts) != len(prober.names):
            raise ValueError(f"adapeft.select: counts has {len(counts)} entries but the Prober has "
                             f"{len(prober.names)} groups")
        if units is not None:
            values, counts, names = prober_values(prober, units, horizon), units.numel, units.names
        else:
            counts = prober.groups.numel if counts is None else counts
            values = prober_values(prober, horizon=horizon, counts=counts)
            names = prober.names if names is None else names
    elif units is not None:
        raise TypeError("adapeft.select: units= folds a Prober's groups into the units they are parts of; give the "
                        "Prober")
    elif horizon is not None:
        raise TypeError("adapeft.select: horizon= applies to a Prober's probes (their eta, b and A); give the "
                        "Prober")
    elif prober_or_values is not None:
        if values is not None:
            raise TypeError("adapeft.select: give values either positionally or as values=, not both")
        values = prober_or_values
    if values is None or counts is None:
        raise TypeError("adapeft.select: give a Prober, or values= and counts=")
    values, counts = _checked(values, counts)
    k = len(values)
    if k == 0:
        raise ValueError("adapeft.select: there are no groups to choose from (K = 0)")
    if len(counts) != k:
        raise ValueError(f"adapeft.select: values has {k} groups but counts has {len(counts)}")
    # Default names sort as their indices do (group07 before group10), which spares sorting them for the ranks.
    names = [f"group{i:0{len(str(k - 1))}d}" for i in range(k)] if names is None else [str(n) for n in names]
    if len(names) != k or len(set(names)) != k:
        raise ValueError(f"adapeft.select: names must be {k} distinct strings")
    check_budget_and_method(budget, method)
    for share in budgets:
        budget_share(share, "every entry of budgets")
    in_order = all(a < b for a, b in zip(names, names[1:]))
    rank = torch.arange(k) if in_order else torch.tensor(np.argsort(np.argsort(names, kind="stable"), kind="stable"))
    problem = _Problem(names, values, counts, torch.tensor(values, dtype=torch.float64), torch.tensor(counts), rank)
    solve = {"greedy": _greedy, "exact": _exact}.get(method)
    selection = solve(problem, budget) if solve else _pareto(problem, budget, budgets, max_exact_groups)
    note = far_step_note(prober_or_values) if isinstance(prober_or_values, Prober) and horizon is None else None
    if note is not None:
        selection.notes.append(note)
    if budget is not None and not selection.chosen:
        selection.notes.append(nothing_fits_note(values, counts, names, budget) or NOTHING_OF_VALUE)
    selection.horizon = horizon
    # Values given as values= are the caller's (|g|^2, a Fisher, ...), which the table must not call APPI.
    selection.signal = None if isinstance(prober_or_values, Prober) else "given"
    if isinstance(prober_or_values, Prober):
        selection.granularity = (prober_or_values.groups if units is None else units).granularity
    return selection


NOTHING_OF_VALUE = "no group has a positive value: none is expected to lower the loss, so none is chosen"


def nothing_fits_note(values, counts, names, budget):
    """Why a choice under `budget` holds nothing though some group has a positive value (None where none has):
    the smallest such group is over the budget, or, where it fits, the method's choice (greedy's nested sets by
    value per parameter) stopped before it."""
    useful = [(int(count), name) for value, count, name in zip(values, counts, names) if value > 0]
    if not useful:
        return None
    count, name = min(useful)
    total = int(sum(counts))
    capacity = capacity_of(budget, total)
    if count > capacity:
        return (f"no group of positive value fits in the budget of {float(budget):.3%} of the parameters "
                f"({capacity:,} of {total:,}): the smallest, {name!r}, holds {count:,}")
    return (f"the nested sets by value per parameter hold none within the budget ({capacity:,} of {total:,} "
            f"parameters), though {name!r} ({count:,}) fits in it; method='exact' chooses the best set within it")


# Where reaching the accepted groups' eta* takes more steps of the probes' eta than this (median), select() says so.
FAR_STEPS = 100


def far_step_note(prober):
    """A note when the accepted groups' eta* = b/A lie far beyond the probes' step eta, or None. The values rank
    groups by b^2/2A, what one step of eta* gains; a training at eta gets there only after eta*/eta steps along a
    steady direction, and before that a group gains about (steps x eta) x b, which ranks groups by their slopes b."""
    steps = prober.last_eta_star_steps.cpu()
    steps = sorted(steps[torch.isfinite(steps)].tolist())
    if not steps or statistics.median(steps) < FAR_STEPS:
        return None
    return (f"the values rank groups by what a step of eta* = b/A gains (b^2/2A), and the {len(steps)} accepted "
            f"groups' eta* is a median {statistics.median(steps):.3g} times the probes' eta ({steps[0]:.3g} to "
            f"{steps[-1]:.3g} times): a training at eta reaches it only after that many steps along a steady "
            "direction, and until then gains about (steps x eta) x b from a group, which ranks groups by their slopes "
            "b (along the gradient, b = |g|^2), not by these values")


def prober_values(prober, units=None, horizon=None, counts=None):
    """The knapsack's values from a prober: each group's APPI (horizon_appi with a horizon) x its parameters
    (`counts`, by default its own), or, with `units` (whose parts the prober probed:
    ParameterGroups.split_factors), each unit's parts' sum."""
    if units is not None:
        strays = [name for name in prober.names if units.whole(name) not in units]
        if strays:
            raise ValueError(f"adapeft.select: units= must be the groups the Prober probed, or those whose parts it "
                             f"probed (ParameterGroups.split_factors); its groups {strays[:3]}"
                             f"{' and more' if len(strays) > 3 else ''} are in none of units' groups {units.names[:6]}"
                             f"{'...' if len(units.names) > 6 else ''}")
    per_parameter = prober.appi.cpu() if horizon is None else horizon_appi(prober, horizon)
    counts = prober.groups.numel if counts is None else counts
    values = (per_parameter * torch.tensor(counts, dtype=torch.float64)).tolist()
    return values if units is None else units.values_from_parts(prober.names, values)


def horizon_appi(prober, horizon):
    """APPI with each probe's PPI scaled to what a training of `horizon` steps at that probe's eta reaches: it
    moves a group up to x = horizon x eta along the probe's direction, and the quadratic's reduction there,
    x b - x^2 A/2, is the share u (2 - u) of the full step's b^2/2A, u = min(1, x / eta*). For accepted fits the
    paper's APPI is the limit of a long horizon (a concave fit's linear term, below, grows with it); a short one
    ranks groups by their slopes b, as a training at eta does (far_step_note). A fit the paper rejects for its
    curvature alone (b > 0, A <= 0, resolved, R^2 over the prober's threshold: the loss falls faster than its slope
    along the direction) counts its linear term x b, where the paper's values count nothing (reached_value)."""
    check_horizon(horizon)
    if prober.results is None:
        raise ValueError("adapeft.select: horizon= needs every probe's eta and eta*, which a Prober made with "
                         "history=False does not keep")
    counts = torch.tensor(prober.groups.numel, dtype=torch.float64)
    total = torch.zeros(len(prober.names), dtype=torch.float64)
    for result in prober.results:
        concave = concave_fits(result.verdict.cpu(), result.r2.cpu(), prober.r2_threshold)
        total += reached_value(horizon, result.eta, result.b.cpu(), result.A.cpu(), result.ppi.cpu(),
                               result.accepted.cpu(), concave, counts)
    return total


def concave_fits(verdict, r2, r2_threshold):
    """The fits rejected for their curvature alone: verdict "A <= 0" (so measured, resolved, with b > 0) and R^2 over
    the threshold, which that verdict, coming first, left unchecked."""
    return (verdict == VERDICT["A <= 0"]) & (r2 > r2_threshold)


def reached_value(horizon, eta, b, A, ppi, accepted, concave, counts):
    """Per parameter, in PPI's units (twice a reduction, as PPI's b^2/A is twice a full step's b^2/2A), what
    `horizon` steps of `eta` reach of one probe of each group: for accepted fits PPI x u (2 - u) (reached_share);
    for `concave` ones 2 x b over the parameters, x = horizon x eta: the linear term alone, as the quadratic's
    negative curvature, which would add to it, is not to be trusted past the probed steps; 0 for the others."""
    linear = 2.0 * float(horizon) * eta * b / counts
    shared = ppi * reached_share(horizon, eta, b / A, accepted)
    return torch.where(concave & ~accepted, linear, shared)


def check_horizon(horizon, owner="adapeft.select"):
    if isinstance(horizon, bool) or not isinstance(horizon, numbers.Real) or not 0 < horizon < math.inf:
        raise ValueError(f"{owner}: horizon must be a finite number of training steps > 0, got {horizon!r}")


def reached_share(horizon, eta, eta_star, accepted):
    """u (2 - u), u = min(1, horizon x eta / eta*): the share of a probe's b^2/2A that `horizon` steps of `eta`
    reach, for groups whose fit was accepted (0 for the others, whose eta* may be nan)."""
    reach = (float(horizon) * eta / eta_star).clamp(max=1.0)
    return torch.where(accepted, reach * (2.0 - reach), torch.zeros_like(reach))


def _greedy(problem, budget):
    nested = _NestedSets(problem)
    capacity = problem.total if budget is None else capacity_of(budget, problem.total)
    size = nested.best_within(capacity)
    proven = nested.certified(size, capacity)
    notes = [] if proven else ["the greedy set is the best nested set in value-per-parameter order, not proven "
                               "optimal for the budget; method='exact' finds the optimum"]
    frontier = Frontier([(nested.counts[j], nested.values[j], j) for j in range(nested.k + 1)], nested)
    return problem.selection(nested.mask(size), "greedy", budget, proven=proven, frontier=frontier,
                             labels=["greedy"] * len(frontier), notes=notes)


def _exact(problem, budget):
    mask, info = _backend.call("knapsack_exact")(problem.v, problem.c, problem.rank,
                                                  capacity_of(budget, problem.total), MAX_EXACT_STATES)
    proven = bool(info[0])
    notes = [] if proven else [f"the exact search stopped at its limit of {MAX_EXACT_STATES:,} states: this is the "
                               "greedy solution, not proven optimal"]
    return problem.selection(mask.numpy().astype(bool), "exact", budget, proven=proven, notes=notes)


def _pareto(problem, budget, budgets, max_exact_groups):
    k, total = len(problem.values), problem.total
    capacity = total if budget is None else capacity_of(budget, total)
    notes = []
    if k <= min(max_exact_groups, 64):
        weights, sums, masks = _backend.call("knapsack_pareto")(problem.v, problem.c, problem.rank,
                                                                 MAX_FRONTIER_POINTS)
        if weights.numel():
            points = [(w, v, _bits_to_mask(m, k)) for w, v, m in zip(weights.tolist(), sums.tolist(), masks.tolist())]
            # Values rise strictly along an exact frontier: the last point that fits is the refined optimum.
            chosen = points[bisect.bisect_right(weights.tolist(), capacity) - 1][2]
            return problem.selection(chosen, "pareto", budget, frontier=Frontier(points),
                                     labels=["exact"] * len(points))
        notes.append(f"the exact frontier grew past its limit of {MAX_FRONTIER_POINTS:,} points")
    else:
        notes.append(f"{k} groups is more than the {max_exact_groups} the exact frontier is computed for")
    nested = _NestedSets(problem)
    # Nested sets of groups of value are refined optima for their own size, so all lie on the frontier.
    found = [(nested.counts[j], nested.values[j], j, "greedy") for j in range(nested.positive + 1)]
    shares = list(budgets) + ([budget] if budget is not None else [])
    unproven = []
    for share in shares:
        optimum = _exact(problem, share)
        found.append((optimum.count, optimum.value, optimum.mask,
                      f"{'exact' if optimum.proven else 'best'}@{float(share):g}"))
        if not optimum.proven:
            unproven.append(share)
    points, labels = _non_dominated(problem, nested, found)
    frontier = Frontier(points, nested)
    fitting = bisect.bisect_right([p[0] for p in points], capacity) - 1
    notes.append("frontier: the nested greedy sets and exact optima at the budgets; other non-dominated sets may "
                 "lie between them")
    if unproven:
        notes.append(f"the exact search stopped at its state limit for budgets {[float(u) for u in unproven]}: "
                     "those points are greedy solutions")
    return problem.selection(frontier[fitting][2], "pareto", budget, proven=False, frontier=frontier,
                             labels=labels, notes=notes)


def _non_dominated(problem, nested, found):
    """The points of `found` (count, value, mask or nested size, label) that no other one dominates, each
    (count, value) once, sorted by count: compared on exact values."""
    exact = problem.exact_values()
    prefix = [0] + list(itertools.accumulate(exact[i] for i in nested.order))
    preference = {"exact": 0, "greedy": 1, "best": 2}

    def exact_value(mask):
        return prefix[mask] if isinstance(mask, int) else sum(q for q, m in zip(exact, mask) if m)

    keyed = sorted(((count, -exact_value(mask), preference[label.split("@")[0]], i)
                    for i, (count, _, mask, label) in enumerate(found)))
    points, labels, best = [], [], None
    for _, negative_value, _, i in keyed:
        if best is None or -negative_value > best:
            count, value, mask, label = found[i]
            points.append((count, value, mask))
            labels.append(label)
            best = -negative_value
    return points, labels


def all_subsets(values, counts):
    """(parameters, loss reduction) of every subset of at most 24 groups, subset s at index s (bit i: group
    i), each value the exact sum rounded once: the cloud the paper's Figure 5 draws the frontier against."""
    v = torch.as_tensor(values, dtype=torch.float64)
    c = torch.as_tensor(counts).to(torch.int64)
    subset_counts, subset_values = _backend.call("knapsack_exhaustive")(v, c, torch.arange(v.numel()))
    return subset_counts.numpy(), subset_values.numpy()


def _bits_to_mask(bits, k):
    bits &= (1 << 64) - 1
    return np.array([bool(bits >> i & 1) for i in range(k)])
