#include "knapsack.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

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
  const double* vp = v.data_ptr<double>();
  const int64_t* wp = w.data_ptr<int64_t>();
  KnapsackItems items;
  items.value.resize(k);
  items.weight.assign(wp, wp + k);
  items.rank.assign(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + k);
  double largest = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(std::isfinite(vp[i]) && vp[i] >= 0.0, op, ": values[", i, "] = ", vp[i],
                "; loss reductions must be finite and >= 0");
    TORCH_CHECK(wp[i] > 0, op, ": counts[", i, "] = ", wp[i], "; every group must have at least one parameter");
    TORCH_CHECK(wp[i] <= (int64_t{1} << 42), op, ": counts[", i, "] = ", wp[i], " is larger than 2^42");
    largest = std::max(largest, vp[i]);
    TORCH_CHECK(!__builtin_add_overflow(items.total_weight, wp[i], &items.total_weight) &&
                    items.total_weight < (int64_t{1} << 62),
                op, ": the counts add up to more than 2^62 parameters");
  }
  const int shift = 62 - static_cast<int>(std::ceil(std::log2(static_cast<double>(std::max<int64_t>(k, 2)))));
  const double grid = std::ldexp(1.0, shift);  // a power of two: the product below is exact
  at::parallel_for(0, k, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) items.value[i] = largest > 0 ? std::llrint(vp[i] / largest * grid) : 0;
  });
  items.unit = largest > 0 ? std::ldexp(largest, -shift) : 0.0;
  return items;
}

std::vector<int64_t> efficiency_order(const KnapsackItems& items) {
  const auto& q = items.value;
  const auto& w = items.weight;
  const auto& r = items.rank;
  const size_t n = q.size();
  const auto before = [&](int64_t a, int64_t b) {
    if (more_efficient(q[a], w[a], q[b], w[b])) return true;
    if (more_efficient(q[b], w[b], q[a], w[a])) return false;
    if (w[a] != w[b]) return w[a] < w[b];
    return r[a] != r[b] ? r[a] < r[b] : a < b;
  };
  // A radix sort on the efficiency as a double, then an exact sort of each run of efficiencies too close
  // for doubles to tell apart (within 2^-48 relative; a double ratio is off by at most 2^-52): the result
  // is the exact order, at the cost of a radix sort.
  struct Keyed {
    uint64_t key;  // the efficiency's bits, complemented: ascending keys are descending efficiencies
    int64_t index;
  };
  std::vector<Keyed> keyed(n), scratch(n);
  at::parallel_for(0, static_cast<int64_t>(n), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double ratio = static_cast<double>(q[i]) / static_cast<double>(w[i]);
      uint64_t bits;
      std::memcpy(&bits, &ratio, sizeof(bits));  // non-negative doubles order as their bits
      keyed[i] = {~bits, i};
    }
  });
  constexpr int kDigit = 16;
  std::vector<size_t> bucket((size_t{1} << kDigit) + 1);
  for (int shift = 0; shift < 64; shift += kDigit) {
    std::fill(bucket.begin(), bucket.end(), 0);
    for (size_t i = 0; i < n; ++i) ++bucket[((keyed[i].key >> shift) & 0xffff) + 1];
    for (size_t d = 1; d < bucket.size(); ++d) bucket[d] += bucket[d - 1];
    for (size_t i = 0; i < n; ++i) scratch[bucket[(keyed[i].key >> shift) & 0xffff]++] = keyed[i];
    keyed.swap(scratch);
  }
  std::vector<int64_t> order(n);
  const auto ratio_of = [&](size_t i) {
    const uint64_t bits = ~keyed[i].key;
    double ratio;
    std::memcpy(&ratio, &bits, sizeof(ratio));
    return ratio;
  };
  for (size_t i = 0; i < n; ++i) order[i] = keyed[i].index;
  const double close = 1.0 - std::ldexp(1.0, -48);
  for (size_t start = 0; start < n;) {
    size_t end = start + 1;
    while (end < n && ratio_of(end) >= ratio_of(end - 1) * close) ++end;
    if (end - start > 1) std::sort(order.begin() + start, order.begin() + end, before);
    start = end;
  }
  return order;
}

}  // namespace adapeft
