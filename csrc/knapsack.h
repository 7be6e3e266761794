// Shared by the knapsack ops: input checks, the fixed-point values every solver works on, and the
// efficiency order. adapeft/reference.py mirrors the quantisation and the order exactly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace adapeft {

// Values (loss reductions, float) become integers on a fixed-point grid: q = round(v / v_max * 2^S)
// with S = 62 - ceil(log2 K), so that every sum is exact in int64. Equal values stay equal, ties are
// real ties, and the grid (2^-S of the largest value, at most 2^-42 of it for K = 10^6) lies below
// anything a loss reduction can resolve.
struct KnapsackItems {
  std::vector<int64_t> value;   // quantised
  std::vector<int64_t> weight;  // parameter counts
  std::vector<int64_t> rank;    // tie-break among equal efficiency and weight (e.g. the name order)
  double unit = 0.0;            // value of one quantum: v ~ q * unit
  int64_t total_weight = 0;
};

// Checks values (finite, >= 0), counts (> 0), lengths and rank; `op` names the caller in messages.
KnapsackItems knapsack_items(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& rank,
                             const char* op);

// Item indices by efficiency q/w descending, then fewer parameters, then rank: compared exactly.
std::vector<int64_t> efficiency_order(const KnapsackItems& items);

// True when item a is strictly more efficient than item b (q_a / w_a > q_b / w_b, exactly).
inline bool more_efficient(int64_t qa, int64_t wa, int64_t qb, int64_t wb) {
  return static_cast<__int128>(qa) * wb > static_cast<__int128>(qb) * wa;
}

}  // namespace adapeft
