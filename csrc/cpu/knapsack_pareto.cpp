// CPU kernel of adapeft::knapsack_pareto: every non-dominated (parameters, value) subset, by the
// Nemhauser-Ullmann recursion (merge the list with itself shifted by one item, drop dominated states).
// Exact (see knapsack.h); its size grows quickly with K, so it stops with an empty answer past its limit.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "knapsack.h"

namespace adapeft {
namespace {

template <int N>
struct Point {
  int64_t weight;
  Fixed<N> value;
  uint64_t mask;
};

template <int N>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pareto_frontier(const KnapsackItems& items, int64_t max_points) {
  const std::vector<Fixed<N>> scale = exact_scales<N>(items);
  const int64_t limit = state_limit<N>(max_points);
  std::vector<Point<N>> frontier{{0, Fixed<N>{}, 0}};
  bool complete = true;
  // Items by efficiency: the list then grows mostly at its heavy end, which keeps merges short.
  for (int64_t i : efficiency_order(items, scale)) {
    if (scale[i].is_zero()) continue;  // adds parameters and no value: never on the frontier
    std::vector<Point<N>> next;
    next.reserve(frontier.size() * 2);
    const auto offer = [&](const Point<N>& p) {
      if (!next.empty() && p.value <= next.back().value) return;
      if (!next.empty() && next.back().weight == p.weight) next.pop_back();
      next.push_back(p);
    };
    const int64_t w = items.weight[i];
    size_t a = 0, c = 0;
    while (a < frontier.size() || c < frontier.size()) {
      if (c < frontier.size() && (a >= frontier.size() || frontier[c].weight + w < frontier[a].weight)) {
        offer({frontier[c].weight + w, frontier[c].value + scale[i], frontier[c].mask | (uint64_t{1} << i)});
        ++c;
      } else {
        offer(frontier[a]);
        ++a;
      }
    }
    frontier = std::move(next);
    if (static_cast<int64_t>(frontier.size()) > limit) {
      complete = false;
      break;
    }
  }
  const int64_t size = complete ? static_cast<int64_t>(frontier.size()) : 0;
  auto weights = at::empty({size}, at::TensorOptions().dtype(at::kLong));
  auto sums = at::empty({size}, at::TensorOptions().dtype(at::kDouble));
  auto masks = at::empty({size}, at::TensorOptions().dtype(at::kLong));
  for (int64_t p = 0; p < size; ++p) {
    weights.data_ptr<int64_t>()[p] = frontier[p].weight;
    sums.data_ptr<double>()[p] = to_double(frontier[p].value, items.exponent);
    masks.data_ptr<int64_t>()[p] = static_cast<int64_t>(frontier[p].mask);
  }
  return {weights, sums, masks};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knapsack_pareto_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                                   const at::Tensor& rank, int64_t max_points) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_pareto");
  const int64_t k = static_cast<int64_t>(items.value.size());
  TORCH_CHECK(k <= 64, "adapeft.knapsack_pareto: the exact frontier takes at most 64 groups (got ", k,
              "); adapeft.select(method='pareto') falls back to the greedy frontier plus exact budgets");
  TORCH_CHECK(max_points > 0, "adapeft.knapsack_pareto: max_points must be positive, got ", max_points);
  return with_words(items.words, [&](auto words) { return pareto_frontier<decltype(words)::value>(items, max_points); });
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_pareto", &knapsack_pareto_cpu); }

}  // namespace adapeft
