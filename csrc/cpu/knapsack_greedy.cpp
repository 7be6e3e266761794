// CPU kernel of adapeft::knapsack_greedy: the paper's greedy order (APPI = value per parameter) and the
// value of each nested set along it, summed exactly and rounded once.
#include <torch/library.h>

#include "knapsack.h"

namespace adapeft {
namespace {

template <int N>
std::tuple<at::Tensor, at::Tensor> greedy(const KnapsackItems& items) {
  const std::vector<Fixed<N>> scale = exact_scales<N>(items);
  const std::vector<int64_t> order = efficiency_order(items, scale);
  auto sums = at::empty({static_cast<int64_t>(order.size())}, at::TensorOptions().dtype(at::kDouble));
  double* sp = sums.data_ptr<double>();
  Fixed<N> running;
  for (size_t i = 0; i < order.size(); ++i) {
    running += scale[order[i]];
    sp[i] = to_double(running, items.exponent);
  }
  return {at::tensor(order, at::TensorOptions().dtype(at::kLong)), sums};
}

std::tuple<at::Tensor, at::Tensor> knapsack_greedy_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                       const at::Tensor& rank) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_greedy");
  return with_words(items.words, [&](auto words) { return greedy<decltype(words)::value>(items); });
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_greedy", &knapsack_greedy_cpu); }

}  // namespace adapeft
