// Shared by the knapsack ops: input checks, the exact values every solver works on, and the efficiency
// order. adapeft/ops/reference.py computes the same answers with Python fractions.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fixed_point.h"

namespace adapeft {

// Values (loss reductions) are compared exactly as the real numbers their doubles stand for: value i is
// scale_i * 2^exponent with scale_i an integer of `words` 64-bit words (Fixed<N>, N >= words), the
// exponent that of the lowest set bit among all values. So 1 + 2 equals 3, 1/1 equals 3/3, and 0.1 + 0.2
// (doubles) is more than 0.3 (double), as it is in exact arithmetic on those doubles.
struct KnapsackItems {
  std::vector<double> value;    // as given
  std::vector<int64_t> weight;  // parameter counts
  std::vector<int64_t> rank;    // tie-break among equal efficiency and weight (e.g. the name order)
  int64_t exponent = 0;         // value = scale * 2^exponent
  int words = 1;                // 64-bit words that hold any sum of scales and its sign
  int64_t total_weight = 0;
};

// Checks values (finite, >= 0), counts (> 0), lengths and rank; `op` names the caller in messages.
KnapsackItems knapsack_items(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& rank,
                             const char* op);

// A limit on stored states, given for values of one word: wider values get proportionally fewer, so that
// the limit bounds memory (a state of N words takes N + 2 words).
template <int N>
int64_t state_limit(int64_t one_word_states) {
  return std::max<int64_t>(1, one_word_states / (N + 2) * 3);
}

// The exact integer scale of every value (see KnapsackItems).
template <int N>
std::vector<Fixed<N>> exact_scales(const KnapsackItems& items) {
  std::vector<Fixed<N>> scale(items.value.size());
  at::parallel_for(0, static_cast<int64_t>(scale.size()), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Decomposed v = decompose(items.value[i]);
      if (v.mantissa == 0) continue;
      const int64_t shift = v.exponent - items.exponent;  // >= 0: items.exponent is the least
      scale[i].word[shift / 64] = v.mantissa << (shift % 64);
      if (shift % 64 > 11 && shift / 64 + 1 < N) scale[i].word[shift / 64 + 1] = v.mantissa >> (64 - shift % 64);
    }
  });
  return scale;
}

// True when a is strictly more efficient than b: scale_a / w_a > scale_b / w_b, exactly.
template <int N>
bool more_efficient(const Fixed<N>& scale_a, int64_t weight_a, const Fixed<N>& scale_b, int64_t weight_b) {
  return times(scale_a, weight_b) > times(scale_b, weight_a);
}

// Sorts item indices by efficiency descending, then fewer parameters, then rank, compared exactly: a radix
// sort on value / count rounded to a float, which never reverses two exact ratios, then an exact sort of
// each run of equal keys (`ties`).
void sort_by_ratio(const KnapsackItems& items, std::vector<int64_t>& order,
                   std::vector<std::pair<size_t, size_t>>& ties);

template <int N>
std::vector<int64_t> efficiency_order(const KnapsackItems& items, const std::vector<Fixed<N>>& scale) {
  std::vector<int64_t> order;
  std::vector<std::pair<size_t, size_t>> ties;
  sort_by_ratio(items, order, ties);
  const auto& w = items.weight;
  const auto& r = items.rank;
  const auto before = [&](int64_t a, int64_t b) {
    if (more_efficient(scale[a], w[a], scale[b], w[b])) return true;
    if (more_efficient(scale[b], w[b], scale[a], w[a])) return false;
    if (w[a] != w[b]) return w[a] < w[b];
    return r[a] != r[b] ? r[a] < r[b] : a < b;
  };
  for (const auto& [start, end] : ties) std::sort(order.begin() + start, order.begin() + end, before);
  return order;
}

}  // namespace adapeft
