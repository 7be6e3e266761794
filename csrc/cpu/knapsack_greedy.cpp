// CPU kernel of adapeft::knapsack_greedy: the paper's greedy order (APPI = value per parameter) and the
// value of each nested set along it, summed exactly and rounded once.
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "knapsack.h"

namespace adapeft {
namespace {

template <int N>
std::tuple<at::Tensor, at::Tensor> greedy(const KnapsackItems& items) {
  const std::vector<Fixed<N>> scale = exact_scales<N>(items);
  const std::vector<int64_t> order = efficiency_order(items, scale);
  const int64_t k = static_cast<int64_t>(order.size());
  auto sums = at::empty({k}, at::TensorOptions().dtype(at::kDouble));
  double* sp = sums.data_ptr<double>();
  // The running sums in blocks, one thread a block: each block's total first, then each block's sums
  // from the totals of the blocks before it (exact integers: the order of additions does not matter).
  const int64_t blocks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, k >> 16));
  std::vector<Fixed<N>> offset(blocks + 1), ordered(k);
  const auto block_range = [&](int64_t b) { return std::make_pair(k * b / blocks, k * (b + 1) / blocks); };
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto [first, last] = block_range(b);
      for (int64_t i = first; i < last; ++i) {
        ordered[i] = scale[order[i]];
        offset[b + 1] += ordered[i];
      }
    }
  });
  for (int64_t b = 0; b < blocks; ++b) offset[b + 1] += offset[b];
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto [first, last] = block_range(b);
      Fixed<N> running = offset[b];
      for (int64_t i = first; i < last; ++i) {
        running += ordered[i];
        sp[i] = to_double(running, items.exponent);
      }
    }
  });
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
