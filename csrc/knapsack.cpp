#include "knapsack.h"

#include <algorithm>
#include <cmath>
#include <parallel/algorithm>

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
  for (int64_t i = 0; i < k; ++i) {
    items.value[i] = largest > 0 ? std::llrint(std::ldexp(vp[i] / largest, shift)) : 0;
  }
  items.unit = largest > 0 ? std::ldexp(largest, -shift) : 0.0;
  return items;
}

std::vector<int64_t> efficiency_order(const KnapsackItems& items) {
  std::vector<int64_t> order(items.value.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  const auto& q = items.value;
  const auto& w = items.weight;
  const auto& r = items.rank;
  const auto before = [&](int64_t a, int64_t b) {
    if (more_efficient(q[a], w[a], q[b], w[b])) return true;
    if (more_efficient(q[b], w[b], q[a], w[a])) return false;
    if (w[a] != w[b]) return w[a] < w[b];
    return r[a] != r[b] ? r[a] < r[b] : a < b;
  };
  // The GNU parallel sort uses OpenMP threads; the order is total, so the result does not depend on them.
  __gnu_parallel::sort(order.begin(), order.end(), before);
  return order;
}

}  // namespace adapeft
