// CPU kernel of adapeft::knapsack_greedy: the paper's greedy order (APPI = value per parameter).
#include <torch/library.h>

#include "knapsack.h"

namespace adapeft {
namespace {

at::Tensor knapsack_greedy_cpu(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& rank) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_greedy");
  const std::vector<int64_t> order = efficiency_order(items);
  return at::tensor(order, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_greedy", &knapsack_greedy_cpu); }

}  // namespace adapeft
