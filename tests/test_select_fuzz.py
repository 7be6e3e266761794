"""The selector against brute force over all 2^K subsets, on instances full of ties.

The oracle here is independent of adapeft: values become exact integers on one power-of-two scale (every
double is an integer multiple of 2^-1074), subset sums are enumerated, and the budget's capacity is read
through `decimal`. Ties come in every form the selector must get right: equal values, equal sums (1 + 2
against 3), equal ratios (1/1 against 3/3, values proportional to counts), duplicated groups, zeros, values
that are tiny next to others, and doubles such as 0.1 + 0.2 whose exact sum differs from 0.3.
"""
import decimal
import math

import numpy as np
import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.ops import knapsack_reference as reference

from conftest import SEED

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
ops = torch.ops.adapeft

INSTANCES_PER_TEST = 5000  # four tests: 20,000 instances a run, each checked by every method


def exact_integers(values):
    """Values as integers on one power-of-two scale, and that scale's exponent (value = integer * 2^exponent)."""
    ratios = [float(v).as_integer_ratio() for v in values]
    exponent = max(d.bit_length() - 1 for _, d in ratios)
    return [n * (2 ** exponent // d) for n, d in ratios], -exponent


def capacity(budget, total):
    with decimal.localcontext() as context:
        context.prec = 100
        return int((decimal.Decimal(repr(float(budget))) * total).to_integral_value(rounding=decimal.ROUND_FLOOR))


class BruteForce:
    """Every subset's (parameters, exact value); subset s has group i when bit i of s is set."""

    def __init__(self, values, counts):
        self.k = len(values)
        self.q, self.exponent = exact_integers(values)
        weights, sums = [0], [0]
        for q_i, w_i in zip(self.q, counts):
            weights += [w + w_i for w in weights]
            sums += [s + q_i for s in sums]
        self.weights, self.sums = weights, sums

    def subset(self, mask):
        return sum(1 << i for i, m in enumerate(mask) if m)

    def point(self, mask):
        s = self.subset(mask)
        return self.weights[s], self.sums[s]

    def refined_optimum(self, cap):
        """(parameters, value) of the refined optimum: the most value within cap, the fewest parameters."""
        best = max((self.sums[s], -self.weights[s]) for s in range(1 << self.k) if self.weights[s] <= cap)
        return -best[1], best[0]

    def frontier(self):
        """Every non-dominated (parameters, value), by increasing parameters."""
        points, best = [], -1
        for w, q in sorted(zip(self.weights, self.sums), key=lambda p: (p[0], -p[1])):
            if q > best:
                points.append((w, q))
                best = q
        return points

    def rounded(self, q):
        return float(q * 2 ** self.exponent) if self.exponent >= 0 else q / 2 ** -self.exponent


def tie_heavy_instance(rng):
    k = int(rng.integers(1, 13))
    count_kind = rng.integers(0, 4)
    if count_kind == 0:
        counts = rng.integers(1, 7, k)  # tiny: many equal sums of counts
    elif count_kind == 1:  # model-like: a few layer sizes, repeated (e.g. hidden 576, MLP 1536, vocabulary 49152)
        palette = np.array([576, 576 * 576, 576 * 1536, 49152 * 576, 8 * 576, 8 * 1536])
        counts = rng.choice(palette[:rng.integers(1, len(palette) + 1)], size=k)
    elif count_kind == 2:
        counts = np.exp(rng.uniform(0, math.log(1e11), k)).astype(np.int64) + 1
    else:
        counts = rng.integers(1, 10**6, k)
    scale = 2.0 ** int(rng.integers(-40, 20))
    kind = rng.integers(0, 10)
    if kind == 0:  # small multiples of one power of two: ties of values and of sums, zeros
        values = rng.integers(0, 7, k) * scale
    elif kind == 1:  # every efficiency tied
        values = counts * (int(rng.integers(1, 8)) * scale)
    elif kind == 2:  # a few efficiencies, each shared
        ratios = rng.integers(1, 5, 3) * scale
        values = counts * rng.choice(ratios, size=k)
    elif kind == 3:
        values = rng.random(k) * 10.0 ** rng.integers(-12, 3)
    elif kind == 4:
        values = rng.pareto(1.0, k) * 1e-3
    elif kind == 5:  # duplicated groups
        values = rng.integers(0, 5, k) * scale
        values[k // 2:] = values[:k - k // 2]
        counts[k // 2:] = counts[:k - k // 2]
    elif kind == 6:  # exact sums: the last third are sums of pairs of the others
        values = rng.integers(0, 2**20, k) * scale
        for i in range(2 * k // 3, k):
            a, b = rng.integers(0, max(1, 2 * k // 3), 2)
            values[i] = values[a] + values[b]
    elif kind == 7:  # decimals whose doubles do not add up as the decimals do
        values = rng.integers(0, 10, k) * 0.1
    elif kind == 8:  # values of very different sizes: a tiny value still breaks a tie
        values = rng.integers(0, 3, k) * scale
        values[rng.integers(0, k)] = 2.0 ** -int(rng.integers(60, 1074))
    else:
        values = np.zeros(k) if rng.random() < 0.5 else np.where(rng.random(k) < 0.7, 0.0, rng.random(k))
    budget_kind = rng.integers(0, 4)
    total = int(counts.sum())
    if budget_kind == 0:
        budget = int(rng.integers(0, 11)) / 10  # 0.3 of 10 equal groups is 3 of them
    elif budget_kind == 1:
        budget = float(rng.random())
    elif budget_kind == 2:  # a share that lands on a subset's size, as a double
        budget = float(counts[rng.random(k) < 0.5].sum()) / total
    else:
        budget = float(rng.choice([0.0, 1.0, 0.001, 0.01, 0.25]))
    names = [f"g{i:02d}" for i in rng.permutation(k)]
    return [float(v) for v in values], [int(c) for c in counts], budget, names


def check_instance(values, counts, budget, names):
    brute = BruteForce(values, counts)
    cap = capacity(budget, sum(counts))
    where = f"values={values}, counts={counts}, budget={budget!r}, names={names}"
    optimum = brute.refined_optimum(cap)
    frontier = brute.frontier()

    exact = adapeft.select(values=values, counts=counts, budget=budget, method="exact", names=names)
    assert exact.proven and brute.point(exact.mask) == optimum, where
    assert exact.value == brute.rounded(optimum[1]), where

    pareto = adapeft.select(values=values, counts=counts, budget=budget, method="pareto", names=names)
    points = [brute.point(mask) for _, _, mask in pareto.frontier]
    assert points == frontier, where
    assert [(c, v) for c, v, _ in pareto.frontier] == [(w, brute.rounded(q)) for w, q in frontier], where
    assert pareto.proven and brute.point(pareto.mask) == optimum, where

    greedy = adapeft.select(values=values, counts=counts, budget=budget, method="greedy", names=names)
    q = brute.q
    rank = {name: position for position, name in enumerate(sorted(names))}
    order = [int(np.flatnonzero(b & ~a)[0]) for (_, _, a), (_, _, b) in zip(greedy.frontier, greedy.frontier[1:])]
    # The order: value per parameter exactly descending, then fewer parameters, then the name.
    keys = [(-q[i] * math.prod(counts) // counts[i], counts[i], rank[names[i]]) for i in order]
    assert keys == sorted(keys) and sorted(order) == list(range(len(values))), where
    nested = [brute.point(mask) for _, _, mask in greedy.frontier]
    assert [(c, v) for c, v, _ in greedy.frontier] == [(w, brute.rounded(s)) for w, s in nested], where
    # The chosen set: the nested set of most value within the budget, the fewest parameters among those.
    fitting = [p for p in nested if p[0] <= cap]
    best = max(s for _, s in fitting)
    assert brute.point(greedy.mask) == (min(w for w, s in fitting if s == best), best), where
    # Every nested set of groups of value is a refined optimum for its own size: it lies on the frontier.
    positive = sum(v > 0 for v in values)
    assert set(nested[:positive + 1]) <= set(frontier), where
    if greedy.proven:
        assert brute.point(greedy.mask) == optimum, where


@pytest.mark.parametrize("part", range(4))
def test_selector_against_brute_force(part):
    rng = np.random.default_rng([SEED, part])
    for _ in range(INSTANCES_PER_TEST):
        check_instance(*tie_heavy_instance(rng))


def test_the_cases_that_were_wrong():
    pareto = adapeft.select(values=[5, 10, 15], counts=[2, 2, 6], method="pareto")
    assert [(c, v) for c, v, _ in pareto.frontier] == [(0, 0.0), (2, 10.0), (4, 15.0), (8, 25.0), (10, 30.0)]
    greedy = adapeft.select(values=[2, 6], counts=[2, 6], budget=0.25, method="greedy")
    assert greedy.chosen == ["group0"] and greedy.proven  # fills the budget of 2 exactly
    for method in ("greedy", "exact", "pareto"):
        assert adapeft.select(values=[1.0] * 10, counts=[1] * 10, budget=0.3, method=method).count == 3
    assert adapeft.select(values=[0.1, 0.2, 0.3], counts=[1, 1, 2], budget=0.5, method="exact").chosen == \
        ["group0", "group1"]  # the doubles 0.1 + 0.2 sum to more than the double 0.3


def test_ops_and_twins_agree_on_tie_heavy_instances():
    rng = np.random.default_rng([SEED, 99])
    for _ in range(300):
        values, counts, budget, _ = tie_heavy_instance(rng)
        v, c = torch.tensor(values, dtype=torch.float64), torch.tensor(counts)
        rank = torch.tensor(rng.permutation(len(values)))
        cap = capacity(budget, sum(counts))
        for got, want in [(ops.knapsack_greedy(v, c, rank), reference.knapsack_greedy(v, c, rank)),
                          (ops.knapsack_pareto(v, c, rank, 10**7), reference.knapsack_pareto(v, c, rank)),
                          (ops.knapsack_exhaustive(v, c, rank), reference.knapsack_exhaustive(v, c, rank))]:
            for a, b in zip(got, want):
                assert torch.equal(a, b), (values, counts, budget)
        # Several sets can share the refined optimum's (parameters, value); each solver may return another.
        brute = BruteForce(values, counts)
        assert brute.point(ops.knapsack_exact(v, c, rank, cap, 10**7)[0].tolist()) == \
            brute.point(reference.knapsack_exact(v, c, rank, cap)[0].tolist()) == brute.refined_optimum(cap)
        weights, sums = ops.knapsack_exhaustive(v, c, rank)
        assert weights.tolist() == brute.weights
        assert sums.tolist() == [brute.rounded(s) for s in brute.sums] == [math.fsum(x for i, x in enumerate(values)
                                                                                      if s >> i & 1)
                                                                             for s in range(1 << len(values))]


def test_values_spanning_the_whole_double_range():
    """Scales of up to 34 words: the largest and the smallest doubles in one instance."""
    values = [1e308, 5e-324, 5e-324, 1e-308, 1.0, 1.0 + 2**-52, 2.0]
    counts = [3, 1, 1, 2, 1, 1, 2]
    brute = BruteForce(values, counts)
    for budget in (0.0, 2 / 11, 0.3, 0.5, 1.0):
        cap = capacity(budget, sum(counts))
        exact = adapeft.select(values=values, counts=counts, budget=budget, method="exact")
        assert exact.proven and brute.point(exact.mask) == brute.refined_optimum(cap)
    pareto = adapeft.select(values=values, counts=counts, method="pareto")
    assert [brute.point(m) for _, _, m in pareto.frontier] == brute.frontier()


@pytest.mark.parametrize("values", [
    [1.0, 2.0**-53],  # a tie: to even, 1
    [1.0 + 2.0**-52, 2.0**-53],  # a tie from an odd mantissa: up
    [1.0, 2.0**-53, 2.0**-1074],  # just above the tie, by a bit many words below: up
    [2.0**-1074, 2.0**-1074, 2.0**-1073],  # subnormal sums
    [2.0**-1022 - 2.0**-1074, 2.0**-1074],  # the largest subnormal and one more: the smallest normal
    [0.1, 0.2, 0.3, 0.7],
])
def test_each_sum_is_rounded_once(values):
    v = torch.tensor(values, dtype=torch.float64)
    _, sums = ops.knapsack_exhaustive(v, torch.ones(len(values), dtype=torch.int64), torch.arange(len(values)))
    assert sums.tolist() == [math.fsum(x for i, x in enumerate(values) if s >> i & 1) for s in range(1 << len(values))]


def test_a_sum_beyond_the_largest_double_is_infinite():
    big = float.fromhex("0x1.fffffffffffffp+1023")
    _, sums = ops.knapsack_exhaustive(torch.tensor([big, big], dtype=torch.float64), torch.ones(2, dtype=torch.int64),
                                      torch.arange(2))
    assert sums.tolist() == [0.0, big, big, math.inf]
    exact = adapeft.select(values=[big, big], counts=[1, 2], budget=1.0, method="exact")
    assert exact.chosen == ["group0", "group1"] and exact.proven and exact.value == math.inf
    assert "inf" in exact.table()
