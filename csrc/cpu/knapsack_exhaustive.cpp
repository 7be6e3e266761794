// CPU kernel of adapeft::knapsack_exhaustive: (parameters, value) of all 2^K subsets, subset s at index s
// (bit i: group i), for K <= 24: the oracle of the tests and the "all subsets" of the paper's Figure 5.
// Sums are exact (fixed-point values); blocks of subsets run in parallel, each walking a Gray code.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "knapsack.h"

namespace adapeft {
namespace {

std::tuple<at::Tensor, at::Tensor> knapsack_exhaustive_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                           const at::Tensor& rank) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_exhaustive");
  const int64_t k = static_cast<int64_t>(items.value.size());
  TORCH_CHECK(k <= 24, "adapeft.knapsack_exhaustive: enumerates 2^K subsets, so K must be at most 24 (got ", k, ")");
  const int64_t subsets = int64_t{1} << k;
  auto weights = at::empty({subsets}, at::TensorOptions().dtype(at::kLong));
  auto quanta = at::empty({subsets}, at::TensorOptions().dtype(at::kLong));
  int64_t* wp = weights.data_ptr<int64_t>();
  int64_t* qp = quanta.data_ptr<int64_t>();
  const int low_bits = static_cast<int>(std::min<int64_t>(k, 12));
  const int64_t block = int64_t{1} << low_bits;
  at::parallel_for(0, subsets / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t high = begin; high < end; ++high) {
      // The high bits are fixed for the block; the low bits walk a Gray code, one item per step.
      int64_t weight = 0, value = 0;
      for (int bit = low_bits; bit < k; ++bit) {
        if ((high >> (bit - low_bits)) & 1) {
          weight += items.weight[bit];
          value += items.value[bit];
        }
      }
      int64_t gray = 0;
      const int64_t base = high << low_bits;
      wp[base] = weight;
      qp[base] = value;
      for (int64_t step = 1; step < block; ++step) {
        const int bit = __builtin_ctzll(static_cast<unsigned long long>(step));
        gray ^= int64_t{1} << bit;
        const bool in = (gray >> bit) & 1;
        weight += in ? items.weight[bit] : -items.weight[bit];
        value += in ? items.value[bit] : -items.value[bit];
        wp[base | gray] = weight;
        qp[base | gray] = value;
      }
    }
  });
  return {weights, quanta};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_exhaustive", &knapsack_exhaustive_cpu); }

}  // namespace adapeft
