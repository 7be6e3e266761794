#include "knapsack.h"

#include <ATen/ops/equal.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace adapeft {

KnapsackItems knapsack_items(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& rank,
                             const char* op) {
  TORCH_CHECK(values.device().is_cpu() && counts.device().is_cpu() && rank.device().is_cpu(), op,
              ": the knapsack runs on the CPU; pass CPU tensors");
  TORCH_CHECK(values.dim() == 1 && counts.dim() == 1 && rank.dim() == 1, op,
              ": values, counts and rank must be vectors");
  const int64_t k = values.numel();
  TORCH_CHECK(k > 0, op, ": there are no groups to choose from (K = 0)");
  TORCH_CHECK(counts.numel() == k, op, ": values has ", k, " groups but counts has ", counts.numel());
  TORCH_CHECK(rank.numel() == k, op, ": rank must have one entry per group (", k, "), got ", rank.numel());
  const auto v = values.to(at::kDouble).contiguous();
  const auto w = counts.to(at::kLong).contiguous();
  const auto r = rank.to(at::kLong).contiguous();
  TORCH_CHECK(at::isFloatingType(values.scalar_type()) || at::isIntegralType(values.scalar_type(), false), op,
              ": values must be numbers, got ", values.scalar_type());
  TORCH_CHECK(!at::isFloatingType(counts.scalar_type()) || at::equal(counts.to(at::kDouble), w.to(at::kDouble)), op,
              ": counts must be whole numbers of parameters");
  TORCH_CHECK(at::isFloatingType(values.scalar_type()) || at::equal(v.to(values.scalar_type()), values), op,
              ": integer values beyond 2^53 are not exact as doubles; pass them as floats");
  const double* vp = v.data_ptr<double>();
  const int64_t* wp = w.data_ptr<int64_t>();
  KnapsackItems items;
  items.value.assign(vp, vp + k);
  items.weight.assign(wp, wp + k);
  items.rank.assign(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + k);
  int64_t lowest = std::numeric_limits<int64_t>::max(), highest = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(std::isfinite(vp[i]) && vp[i] >= 0.0, op, ": values[", i, "] = ", vp[i],
                "; loss reductions must be finite and >= 0");
    TORCH_CHECK(wp[i] > 0, op, ": counts[", i, "] = ", wp[i], "; every group must have at least one parameter");
    TORCH_CHECK(wp[i] <= (int64_t{1} << 42), op, ": counts[", i, "] = ", wp[i], " is larger than 2^42");
    TORCH_CHECK(!__builtin_add_overflow(items.total_weight, wp[i], &items.total_weight) &&
                    items.total_weight < (int64_t{1} << 62),
                op, ": the counts add up to more than 2^62 parameters");
    const Decomposed d = decompose(vp[i]);
    if (d.mantissa != 0) {
      lowest = std::min(lowest, d.exponent);
      highest = std::max<int64_t>(highest, d.exponent + 64 - __builtin_clzll(d.mantissa));  // value < 2^highest
    }
  }
  if (lowest <= highest) {
    items.exponent = lowest;
    // Scales are below 2^(highest - lowest); a sum of K of them needs ceil(log2 K) bits more, and a sign.
    const int64_t sum_bits = highest - lowest + 64 - __builtin_clzll(static_cast<uint64_t>(k)) + 1;
    items.words = static_cast<int>((sum_bits + 63) / 64);
  }
  return items;
}

void sort_by_ratio(const KnapsackItems& items, std::vector<int64_t>& order,
                   std::vector<std::pair<size_t, size_t>>& ties) {
  const size_t n = items.value.size();
  TORCH_CHECK(n < (size_t{1} << 32), "adapeft: the knapsack takes fewer than 2^32 groups");
  struct Keyed {
    uint32_t key;  // the ratio's float bits, complemented: ascending keys are descending ratios
    uint32_t index;
  };
  std::vector<Keyed> keyed(n), scratch(n);
  at::parallel_for(0, static_cast<int64_t>(n), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // Each rounding (value / count to a double, then to a float) is monotone, so the key never orders two
      // exact ratios the wrong way round; it can only tie them.
      const float ratio = static_cast<float>(items.value[i] / static_cast<double>(items.weight[i]));
      uint32_t bits;
      std::memcpy(&bits, &ratio, sizeof(bits));  // non-negative floats order as their bits
      keyed[i] = {~bits, static_cast<uint32_t>(i)};
    }
  });
  constexpr int kDigit = 16;
  std::vector<size_t> bucket((size_t{1} << kDigit) + 1);
  for (int shift = 0; shift < 32; shift += kDigit) {
    std::fill(bucket.begin(), bucket.end(), 0);
    for (size_t i = 0; i < n; ++i) ++bucket[((keyed[i].key >> shift) & 0xffff) + 1];
    for (size_t d = 1; d < bucket.size(); ++d) bucket[d] += bucket[d - 1];
    for (size_t i = 0; i < n; ++i) scratch[bucket[(keyed[i].key >> shift) & 0xffff]++] = keyed[i];
    keyed.swap(scratch);
  }
  order.resize(n);
  for (size_t i = 0; i < n; ++i) order[i] = keyed[i].index;
  for (size_t start = 0; start < n;) {
    size_t end = start + 1;
    while (end < n && keyed[end].key == keyed[start].key) ++end;
    if (end - start > 1) ties.emplace_back(start, end);
    start = end;
  }
}

}  // namespace adapeft
