// CPU kernel of adapeft::knapsack_exact: the 0-1 knapsack for one budget, exact, returning the
// refined solution of the paper's Theorem 2.2 (among all optimal sets, one with the fewest parameters).
//
// Method: items in efficiency order; the greedy break solution gives the Dantzig upper bound and, filled
// on by skipping, a lower bound LB; reduction tests fix every item whose opposite choice cannot reach LB
// (strictly, so that no optimal set is lost, ties included); the remaining core is solved by dynamic
// programming over Pareto states (weight, value), pruned by dominance and by an LP bound. All
// arithmetic is on integers (values on the fixed-point grid of knapsack.h), so ties are exact.
#include <torch/library.h>

#include <algorithm>

#include "knapsack.h"

namespace adapeft {
namespace {

struct State {
  int64_t weight;
  int64_t value;
  int64_t parent;  // index in the previous level's list
  bool took;       // whether this level's item is in
};

// LP bound of items[from:] (efficiency order, prefix sums `cw`/`cv` relative to the core) at capacity c,
// compared with a target: is base + LP(c) >= target?
struct LpBound {
  const std::vector<int64_t>& cw;  // cw[i] = weight of core items [0, i)
  const std::vector<int64_t>& cv;
  const std::vector<int64_t>& q;
  const std::vector<int64_t>& w;

  bool reaches(size_t from, int64_t capacity, int64_t base, int64_t target) const {
    const size_t n = q.size();
    // Largest k >= from with cw[k] - cw[from] <= capacity.
    const int64_t limit = cw[from] + capacity;
    const size_t k = static_cast<size_t>(std::upper_bound(cw.begin() + from, cw.end(), limit) - cw.begin()) - 1;
    const int64_t value = base + cv[k] - cv[from];
    if (value >= target) return true;
    if (k >= n) return false;
    const int64_t left = limit - cw[k];
    return static_cast<__int128>(value) * w[k] + static_cast<__int128>(left) * q[k] >=
           static_cast<__int128>(target) * w[k];
  }
};

std::tuple<at::Tensor, at::Tensor> knapsack_exact_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                      const at::Tensor& rank, int64_t capacity, int64_t max_states) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_exact");
  TORCH_CHECK(capacity >= 0, "adapeft.knapsack_exact: capacity must be >= 0, got ", capacity);
  TORCH_CHECK(max_states > 0, "adapeft.knapsack_exact: max_states must be positive, got ", max_states);
  const int64_t k = static_cast<int64_t>(items.value.size());
  auto mask = at::zeros({k}, at::TensorOptions().dtype(at::kBool));
  bool* chosen = mask.data_ptr<bool>();

  // Candidates: positive value and fitting alone (a zero value never belongs to a refined solution).
  std::vector<int64_t> order;
  for (int64_t i : efficiency_order(items)) {
    if (items.value[i] > 0 && items.weight[i] <= capacity) order.push_back(i);
  }
  const size_t n = order.size();
  std::vector<int64_t> q(n), w(n);
  for (size_t i = 0; i < n; ++i) {
    q[i] = items.value[order[i]];
    w[i] = items.weight[order[i]];
  }
  size_t b = 0;
  int64_t used = 0, break_value = 0;
  while (b < n && used + w[b] <= capacity) {
    used += w[b];
    break_value += q[b];
    ++b;
  }
  int64_t proven = 1, core_size = 0, states_stored = 0;
  if (b == n) {  // everything of value fits: the unique optimum, and nothing can be left out
    for (size_t i = 0; i < n; ++i) chosen[order[i]] = true;
    return {mask, at::tensor({proven, core_size, states_stored}, at::TensorOptions().dtype(at::kLong))};
  }
  const int64_t residual = capacity - used;
  // Lower bound: the break solution filled on with every later item that still fits.
  std::vector<bool> greedy_in(n, false);
  int64_t lower = break_value, room = residual;
  for (size_t i = 0; i < n; ++i) {
    if (i < b) {
      greedy_in[i] = true;
    } else if (i > b && w[i] <= room) {
      greedy_in[i] = true;
      room -= w[i];
      lower += q[i];
    }
  }
  // Reduction: dropping an item of the break solution, or adding one after it, bounded by the LP.
  const __int128 qb = q[b], wb = w[b];
  std::vector<int8_t> fixed(n, -1);  // 1 in, 0 out, -1 core
  for (size_t j = 0; j < n; ++j) {
    if (j == b) continue;
    const __int128 bound = j < b ? (static_cast<__int128>(break_value - q[j]) * wb + (residual + w[j]) * qb)
                                 : (static_cast<__int128>(break_value + q[j]) * wb + (residual - w[j]) * qb);
    if (bound < static_cast<__int128>(lower) * wb) fixed[j] = j < b ? 1 : 0;
  }
  std::vector<size_t> core;
  int64_t base_value = 0, base_weight = 0;
  for (size_t j = 0; j < n; ++j) {
    if (fixed[j] == 1) {
      base_value += q[j];
      base_weight += w[j];
    } else if (fixed[j] == -1) {
      core.push_back(j);
    }
  }
  core_size = static_cast<int64_t>(core.size());
  const int64_t room_core = capacity - base_weight;
  std::vector<int64_t> cq(core.size()), cwt(core.size()), cw(core.size() + 1, 0), cv(core.size() + 1, 0);
  for (size_t i = 0; i < core.size(); ++i) {
    cq[i] = q[core[i]];
    cwt[i] = w[core[i]];
    cw[i + 1] = cw[i] + cwt[i];
    cv[i + 1] = cv[i] + cq[i];
  }
  const LpBound bound{cw, cv, cq, cwt};

  // Dynamic programming over Pareto states, one level per core item.
  std::vector<std::vector<State>> levels;
  std::vector<State> current{{0, 0, -1, false}};
  for (size_t t = 0; t < core.size() && proven; ++t) {
    std::vector<State> next;
    next.reserve(current.size() * 2);
    size_t a = 0, c = 0;
    int64_t best = -1;
    const auto offer = [&](const State& s) {
      if (s.value <= best) return;  // dominated: no lighter-or-equal state is worse
      if (!next.empty() && next.back().weight == s.weight) next.pop_back();
      if (!bound.reaches(t + 1, room_core - s.weight, base_value + s.value, lower)) return;
      next.push_back(s);
      best = s.value;
      lower = std::max(lower, base_value + s.value);
    };
    while (a < current.size() || c < current.size()) {
      const bool take_from_with =
          c < current.size() && current[c].weight + cwt[t] <= room_core &&
          (a >= current.size() || current[c].weight + cwt[t] < current[a].weight);
      if (take_from_with) {
        offer({current[c].weight + cwt[t], current[c].value + cq[t], static_cast<int64_t>(c), true});
        ++c;
      } else if (a < current.size()) {
        offer({current[a].weight, current[a].value, static_cast<int64_t>(a), false});
        ++a;
      } else {
        ++c;  // the rest of the "with" list does not fit
      }
    }
    states_stored += static_cast<int64_t>(next.size());
    if (states_stored > max_states) {
      proven = 0;
      break;
    }
    levels.push_back(std::move(current));
    current = std::move(next);
  }

  if (!proven) {  // too hard within max_states: the greedy solution, reported as not proven optimal
    for (size_t i = 0; i < n; ++i) chosen[order[i]] = greedy_in[i];
    return {mask, at::tensor({proven, core_size, states_stored}, at::TensorOptions().dtype(at::kLong))};
  }
  for (size_t j = 0; j < n; ++j) chosen[order[j]] = fixed[j] == 1;
  // The last state has the highest value and, for it, the lowest weight.
  int64_t index = static_cast<int64_t>(current.size()) - 1;
  const State* state = &current[index];
  for (size_t t = core.size(); t-- > 0;) {
    if (state->took) chosen[order[core[t]]] = true;
    index = state->parent;
    state = &levels[t][index];
  }
  return {mask, at::tensor({proven, core_size, states_stored}, at::TensorOptions().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_exact", &knapsack_exact_cpu); }

}  // namespace adapeft
