// CPU kernel of adapeft::knapsack_exact: the 0-1 knapsack for one budget, exact, returning the
// refined solution of the paper's Theorem 2.2 (among all optimal sets, one with the fewest parameters).
//
// Method: items in efficiency order; the greedy break solution gives the Dantzig upper bound and, filled
// on by skipping, a lower bound LB; reduction tests fix every item whose opposite choice cannot reach LB
// (strictly, so that no optimal set is lost, ties included); the remaining core is solved by dynamic
// programming over Pareto states (weight, value), expanding from the break item outward as in
// Pisinger's minknap, pruned by dominance and by bounds. All arithmetic is exact (integer scales of the
// values, knapsack.h), so ties are exact.
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "knapsack.h"

namespace adapeft {
namespace {

template <int N>
struct State {
  int64_t weight;
  Fixed<N> value;
  int32_t parent;  // index in the previous level's list
  bool took;       // whether this level's item was flipped
};

template <int N>
int64_t solve(const KnapsackItems& items, int64_t capacity, int64_t max_states, bool* chosen, int64_t& core_size,
              int64_t& states_stored) {
  using Value = Fixed<N>;
  using Wide = Fixed<N + 1>;
  const std::vector<Value> scale = exact_scales<N>(items);
  const int64_t limit = state_limit<N>(max_states);
  // Candidates: positive value and fitting alone (a zero value never belongs to a refined solution).
  std::vector<int64_t> order;
  for (int64_t i : efficiency_order(items, scale)) {
    if (!scale[i].is_zero() && items.weight[i] <= capacity) order.push_back(i);
  }
  const size_t n = order.size();
  std::vector<Value> q(n);
  std::vector<int64_t> w(n);
  for (size_t i = 0; i < n; ++i) {
    q[i] = scale[order[i]];
    w[i] = items.weight[order[i]];
  }
  size_t b = 0;
  int64_t used = 0;
  Value break_value;
  while (b < n && used + w[b] <= capacity) {
    used += w[b];
    break_value += q[b];
    ++b;
  }
  if (b == n) {  // everything of value fits: the unique optimum, and nothing can be left out
    for (size_t i = 0; i < n; ++i) chosen[order[i]] = true;
    return 1;
  }
  const int64_t residual = capacity - used;
  // Lower bound: the break solution filled on with every later item that still fits.
  std::vector<bool> greedy_in(n, false);
  Value lower = break_value;
  int64_t spare = residual;
  for (size_t i = 0; i < n; ++i) {
    if (i < b) {
      greedy_in[i] = true;
    } else if (i > b && w[i] <= spare) {
      greedy_in[i] = true;
      spare -= w[i];
      lower += q[i];
    }
  }
  // Reduction: dropping an item of the break solution, or adding one after it, bounded by the LP.
  const Value& qb = q[b];
  const int64_t wb = w[b];
  const Wide lower_times_wb = times(lower, wb);
  std::vector<int8_t> fixed(n, -1);  // 1 in, 0 out, -1 core
  for (size_t j = 0; j < n; ++j) {
    if (j == b) continue;
    // The LP bound with j flipped, times w_b; the room left (residual - w_j) may be negative.
    const Wide bound = j < b ? times(break_value - q[j], wb) + times(qb, residual + w[j])
                             : times(break_value + q[j], wb) + times(qb, residual - w[j]);
    if (bound < lower_times_wb) fixed[j] = j < b ? 1 : 0;
  }
  // The core, processed outward from the break item: states start from the break solution (every core
  // item before b in), and each step either keeps or flips the next item on the right (adding it) or
  // on the left (removing it). A state may overweigh the capacity until a later removal.
  std::vector<size_t> left, right;  // left: nearest first, right: b first
  Value base_value;
  int64_t base_weight = 0;
  for (size_t j = 0; j < n; ++j) {
    if (fixed[j] == 1 || (fixed[j] == -1 && j < b)) {
      base_value += q[j];
      base_weight += w[j];
    }
  }
  for (size_t j = b; j-- > 0;) {
    if (fixed[j] == -1) left.push_back(j);
  }
  for (size_t j = b; j < n; ++j) {
    if (fixed[j] == -1) right.push_back(j);
  }
  core_size = static_cast<int64_t>(left.size() + right.size());
  const int64_t room = capacity - base_weight;  // >= 0: the break solution fits
  std::vector<size_t> steps;                    // the item of each level, in processing order
  for (size_t i = 0; i < std::max(left.size(), right.size()); ++i) {
    if (i < right.size()) steps.push_back(right[i]);
    if (i < left.size()) steps.push_back(left[i]);
  }
  // Pisinger's bounds on a state given the next unprocessed items: an underweight state can gain at most
  // the next right item's efficiency per free parameter; an overweight one must shed weight at least at
  // the next left item's efficiency.
  const auto promising = [&](const State<N>& st, size_t next_left, size_t next_right, const Value& target) {
    if (st.weight <= room) {
      if (next_right >= right.size()) return st.value >= target;
      const size_t t = right[next_right];
      return times(st.value, w[t]) + times(q[t], room - st.weight) >= times(target, w[t]);
    }
    if (next_left >= left.size()) return false;
    const size_t s = left[next_left];
    return times(st.value, w[s]) - times(q[s], st.weight - room) >= times(target, w[s]);
  };

  std::vector<std::vector<State<N>>> levels;
  std::vector<State<N>> current{{0, Value{}, -1, false}};
  Value target = lower - base_value;  // values below are relative to the break solution
  size_t next_left = 0, next_right = 0;
  for (size_t level = 0; level < steps.size(); ++level) {
    const size_t item = steps[level];
    const bool adding = item >= b;
    (adding ? next_right : next_left) += 1;
    const int64_t dw = adding ? w[item] : -w[item];
    const Value dv = adding ? q[item] : -q[item];
    std::vector<State<N>> next;
    next.reserve(current.size() * 2);
    Value best;
    bool any = false;
    const auto offer = [&](const State<N>& st) {
      if (any && st.value <= best) return;  // dominated: a lighter-or-equal state is at least as good
      if (!next.empty() && next.back().weight == st.weight) next.pop_back();
      if (!promising(st, next_left, next_right, target)) return;
      next.push_back(st);
      best = st.value;
      any = true;
      if (st.weight <= room && st.value > target) target = st.value;
    };
    // Merge the unchanged list with the flipped one (shifted by dw), both sorted by weight.
    size_t a = 0, c = 0;
    while (a < current.size() || c < current.size()) {
      const bool flipped = c < current.size() && (a >= current.size() || current[c].weight + dw < current[a].weight);
      if (flipped) {
        offer({current[c].weight + dw, current[c].value + dv, static_cast<int32_t>(c), true});
        ++c;
      } else {
        offer({current[a].weight, current[a].value, static_cast<int32_t>(a), false});
        ++a;
      }
    }
    states_stored += static_cast<int64_t>(next.size());
    if (states_stored > limit) break;
    levels.push_back(std::move(current));
    current = std::move(next);
  }

  if (states_stored > limit) {  // too hard within the limit: the greedy solution, not proven optimal
    for (size_t i = 0; i < n; ++i) chosen[order[i]] = greedy_in[i];
    return 0;
  }
  // The best feasible state: the highest value, and for it the lowest weight (the list is Pareto).
  int64_t index = -1;
  for (int64_t i = static_cast<int64_t>(current.size()) - 1; i >= 0; --i) {
    if (current[i].weight <= room) {
      index = i;
      break;
    }
  }
  for (size_t j = 0; j < n; ++j) chosen[order[j]] = fixed[j] == 1 || (fixed[j] == -1 && j < b);
  const State<N>* state = &current[index];
  for (size_t level = steps.size(); level-- > 0;) {
    if (state->took) chosen[order[steps[level]]] = steps[level] >= b;
    index = state->parent;
    state = &levels[level][index];
  }
  return 1;
}

std::tuple<at::Tensor, at::Tensor> knapsack_exact_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                      const at::Tensor& rank, int64_t capacity, int64_t max_states) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_exact");
  TORCH_CHECK(capacity >= 0, "adapeft.knapsack_exact: capacity must be >= 0, got ", capacity);
  TORCH_CHECK(max_states > 0 && max_states < (int64_t{1} << 31), "adapeft.knapsack_exact: max_states must be in "
              "[1, 2^31), got ", max_states);
  auto mask = at::zeros({static_cast<int64_t>(items.value.size())}, at::TensorOptions().dtype(at::kBool));
  int64_t core_size = 0, states_stored = 0;
  const int64_t proven = with_words(items.words, [&](auto words) {
    return solve<decltype(words)::value>(items, capacity, max_states, mask.data_ptr<bool>(), core_size,
                                         states_stored);
  });
  return {mask, at::tensor({proven, core_size, states_stored}, at::TensorOptions().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_exact", &knapsack_exact_cpu); }

}  // namespace adapeft
