// CPU kernel of adapeft::knapsack_exhaustive: (parameters, value) of all 2^K subsets, subset s at index s
// (bit i: group i), for K <= 24: the oracle of the tests and the "all subsets" of the paper's Figure 5.
// Sums are exact (see knapsack.h), each rounded once to a double; blocks of subsets run in parallel, each
// walking a Gray code.
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "knapsack.h"

namespace adapeft {
namespace {

template <int N>
void enumerate_subsets(const KnapsackItems& items, int64_t* wp, double* vp) {
  const std::vector<Fixed<N>> scale = exact_scales<N>(items);
  const int64_t k = static_cast<int64_t>(scale.size());
  const int low_bits = static_cast<int>(std::min<int64_t>(k, 12));
  const int64_t block = int64_t{1} << low_bits;
  at::parallel_for(0, (int64_t{1} << k) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t high = begin; high < end; ++high) {
      // The high bits are fixed for the block; the low bits walk a Gray code, one item per step.
      int64_t weight = 0;
      Fixed<N> value;
      for (int bit = low_bits; bit < k; ++bit) {
        if ((high >> (bit - low_bits)) & 1) {
          weight += items.weight[bit];
          value += scale[bit];
        }
      }
      int64_t gray = 0;
      const int64_t base = high << low_bits;
      wp[base] = weight;
      vp[base] = to_double(value, items.exponent);
      for (int64_t step = 1; step < block; ++step) {
        const int bit = __builtin_ctzll(static_cast<unsigned long long>(step));
        gray ^= int64_t{1} << bit;
        if ((gray >> bit) & 1) {
          weight += items.weight[bit];
          value += scale[bit];
        } else {
          weight -= items.weight[bit];
          value -= scale[bit];
        }
        wp[base | gray] = weight;
        vp[base | gray] = to_double(value, items.exponent);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knapsack_exhaustive_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                           const at::Tensor& rank) {
  const KnapsackItems items = knapsack_items(values, counts, rank, "adapeft.knapsack_exhaustive");
  const int64_t k = static_cast<int64_t>(items.value.size());
  TORCH_CHECK(k <= 24, "adapeft.knapsack_exhaustive: enumerates 2^K subsets, so K must be at most 24 (got ", k, ")");
  auto weights = at::empty({int64_t{1} << k}, at::TensorOptions().dtype(at::kLong));
  auto sums = at::empty({int64_t{1} << k}, at::TensorOptions().dtype(at::kDouble));
  with_words(items.words, [&](auto words) {
    enumerate_subsets<decltype(words)::value>(items, weights.data_ptr<int64_t>(), sums.data_ptr<double>());
  });
  return {weights, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("knapsack_exhaustive", &knapsack_exhaustive_cpu); }

}  // namespace adapeft
