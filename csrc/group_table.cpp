#include "group_table.h"

#include <ATen/ops/zeros.h>
#include <algorithm>
#include <utility>
#include <vector>

namespace adapeft {
namespace {

int64_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return kFloat32;
    case at::kBFloat16:
      return kBFloat16;
    case at::kHalf:
      return kFloat16;
    case at::kDouble:
      return kFloat64;
    default:
      return -1;
  }
}

struct Span {
  uintptr_t begin;
  uintptr_t end;
  const char* list;
  size_t index;
};

// Perturbing a tensor twice (tied weights listed twice, overlapping views) or reading a direction or
// state that the perturbation itself overwrites would silently corrupt the group.
void check_no_overlap(at::TensorList params, const std::vector<std::pair<const char*, at::TensorList>>& readers) {
  std::vector<Span> spans;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    auto begin = reinterpret_cast<uintptr_t>(params[i].data_ptr());
    spans.push_back({begin, begin + params[i].nbytes(), "params", i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k].begin >= spans[k - 1].end,
                "adapeft.pack_group: params[", spans[k - 1].index, "] and params[", spans[k].index,
                "] overlap in memory; a tensor (tied or shared weights included) must appear once in a group");
  }
  for (const auto& [list_name, list] : readers) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      auto begin = reinterpret_cast<uintptr_t>(list[i].data_ptr());
      auto end = begin + list[i].nbytes();
      auto after = std::upper_bound(spans.begin(), spans.end(), begin,
                                    [](uintptr_t value, const Span& s) { return value < s.begin; });
      // The span starting at or before `begin`, and any span starting inside [begin, end).
      if (after != spans.begin()) {
        const Span& before = *(after - 1);
        TORCH_CHECK(before.end <= begin, "adapeft.pack_group: ", list_name, "[", i, "] overlaps params[",
                    before.index, "] in memory; it must not alias the parameters it moves");
      }
      TORCH_CHECK(after == spans.end() || after->begin >= end, "adapeft.pack_group: ", list_name, "[", i,
                  "] overlaps params[", after->index, "] in memory; it must not alias the parameters it moves");
    }
  }
}

uint64_t fnv1a(uint64_t hash, int64_t word) {
  for (int byte = 0; byte < 8; ++byte) {
    hash ^= static_cast<uint64_t>(word >> (8 * byte)) & 0xffu;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

}  // namespace

at::Tensor table_on(const at::Tensor& host_table, const c10::Device& device) {
  if (device.is_cpu()) return host_table;
  return host_table.pin_memory().to(device, /*non_blocking=*/true);
}

int64_t count_chunks(at::TensorList params) {
  int64_t chunks = 0;
  for (const auto& p : params) chunks += (p.numel() + kChunkElements - 1) >> kChunkShift;
  return chunks;
}

at::Tensor build_group_table(at::TensorList params, at::TensorList directions, at::TensorList states,
                             at::IntArrayRef layout) {
  TORCH_CHECK(params.size() == directions.size(), "adapeft.pack_group: params has ", params.size(),
              " tensors but directions has ", directions.size(), "; give one direction per parameter");
  const int64_t num_tensors = static_cast<int64_t>(params.size());
  constexpr int64_t per_tensor = kStatesPerTensor + 1;
  TORCH_CHECK(layout.empty() || static_cast<int64_t>(layout.size()) == num_tensors * per_tensor,
              "adapeft.pack_group: layout must be empty or hold ", per_tensor, " integers per tensor (",
              num_tensors * per_tensor, "), got ", layout.size());
  TORCH_CHECK(num_tensors < (int64_t{1} << (64 - kChunkTensorShift - 1)),
              "adapeft.pack_group: too many tensors in one group (", num_tensors, ")");
  for (int64_t i = 0; i < num_tensors; ++i) {
    const auto& p = params[i];
    const auto& d = directions[i];
    TORCH_CHECK(p.device() == params[0].device(), "adapeft.pack_group: params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device(), "; a group lives on one device");
    TORCH_CHECK(d.device() == p.device(), "adapeft.pack_group: directions[", i, "] is on ", d.device(),
                " but params[", i, "] is on ", p.device());
    TORCH_CHECK(dtype_code(p.scalar_type()) >= 0, "adapeft.pack_group: params[", i, "] has dtype ",
                p.scalar_type(), "; supported are float32, bfloat16, float16 and float64");
    TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == p.scalar_type(),
                "adapeft.pack_group: directions[", i, "] has dtype ", d.scalar_type(),
                "; it must be float32 or the dtype of params[", i, "] (", p.scalar_type(), ")");
    TORCH_CHECK(d.sizes() == p.sizes(), "adapeft.pack_group: directions[", i, "] has shape ", d.sizes(),
                " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(p.is_contiguous(), "adapeft.pack_group: params[", i,
                "] is not contiguous (a strided view); perturb the contiguous tensor it views instead");
    TORCH_CHECK(d.is_contiguous(), "adapeft.pack_group: directions[", i,
                "] is not contiguous; pass direction.contiguous()");
    if (layout.empty()) continue;
    const int64_t kind = layout[i * per_tensor];
    TORCH_CHECK(kind == kDirectionTensor || kind == kDirectionAdam || kind == kDirectionSgd,
                "adapeft.pack_group: layout gives tensor ", i, " the unknown direction kind ", kind);
    int64_t state_dtype = -1;
    for (int j = 0; j < kStatesPerTensor; ++j) {
      const int64_t index = layout[i * per_tensor + 1 + j];
      if (index < 0) continue;
      TORCH_CHECK(kind != kDirectionTensor, "adapeft.pack_group: tensor ", i,
                  " has a given direction and must not name optimizer states");
      TORCH_CHECK(index < static_cast<int64_t>(states.size()), "adapeft.pack_group: layout names states[", index,
                  "] for tensor ", i, " but there are ", states.size(), " states");
      const auto& st = states[index];
      TORCH_CHECK(st.device() == p.device() && st.sizes() == p.sizes() && st.is_contiguous(),
                  "adapeft.pack_group: states[", index, "] must be a contiguous tensor of the shape of params[", i,
                  "] on its device");
      TORCH_CHECK(st.scalar_type() == at::kFloat || st.scalar_type() == p.scalar_type(),
                  "adapeft.pack_group: states[", index, "] has dtype ", st.scalar_type(),
                  "; it must be float32 or the dtype of params[", i, "]");
      TORCH_CHECK(state_dtype < 0 || state_dtype == dtype_code(st.scalar_type()), "adapeft.pack_group: the states",
                  " of tensor ", i, " must share one dtype");
      state_dtype = dtype_code(st.scalar_type());
    }
  }
  check_no_overlap(params, {{"directions", directions}, {"states", states}});

  const int64_t num_chunks = count_chunks(params);
  auto table = at::zeros({kTableHeaderWords + num_tensors * kTableTensorWords + num_chunks},
                         at::TensorOptions().dtype(at::kLong));
  int64_t* words = table.data_ptr<int64_t>();
  int64_t* rows = words + kTableHeaderWords;
  int64_t* chunk_words = rows + num_tensors * kTableTensorWords;
  int64_t total = 0;
  int64_t chunk = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    const auto& p = params[i];
    const auto& d = directions[i];
    int64_t* row = rows + i * kTableTensorWords;
    row[kTensorParamPtr] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.data_ptr()));
    row[kTensorDirectionPtr] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(d.data_ptr()));
    row[kTensorNumel] = p.numel();
    const int64_t kind = layout.empty() ? kDirectionTensor : layout[i * per_tensor];
    int64_t state_dtype = kFloat32;
    for (int j = 0; j < kStatesPerTensor; ++j) {
      const int64_t index = layout.empty() ? -1 : layout[i * per_tensor + 1 + j];
      row[kTensorStatePtr + j] =
          index < 0 ? 0 : static_cast<int64_t>(reinterpret_cast<uintptr_t>(states[index].data_ptr()));
      if (index >= 0) state_dtype = dtype_code(states[index].scalar_type());
    }
    row[kTensorDtypes] = tensor_codes(dtype_code(p.scalar_type()), dtype_code(d.scalar_type()), kind, state_dtype);
    const int64_t tensor_chunks = (p.numel() + kChunkElements - 1) >> kChunkShift;
    for (int64_t c = 0; c < tensor_chunks; ++c) chunk_words[chunk++] = (i << kChunkTensorShift) | c;
    total += p.numel();
  }
  words[kTableNumTensors] = num_tensors;
  words[kTableNumChunks] = num_chunks;
  words[kTableNumElements] = total;
  words[kTableVersion] = kTableLayoutVersion;
  return table;
}

int64_t group_fingerprint(at::TensorList params, at::TensorList directions, at::TensorList states,
                          at::IntArrayRef layout) {
  uint64_t hash = 0xcbf29ce484222325ull;
  hash = fnv1a(hash, static_cast<int64_t>(params.size()));
  hash = fnv1a(hash, static_cast<int64_t>(directions.size()));
  hash = fnv1a(hash, static_cast<int64_t>(states.size()));
  hash = fnv1a(hash, static_cast<int64_t>(layout.size()));
  for (int64_t value : layout) hash = fnv1a(hash, value);
  for (at::TensorList list : {params, directions, states}) {
    for (const auto& t : list) {
      hash = fnv1a(hash, static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.numel() ? t.data_ptr() : nullptr)));
      hash = fnv1a(hash, t.numel());
      hash = fnv1a(hash, dtype_code(t.scalar_type()));
      hash = fnv1a(hash, t.is_contiguous() ? 1 : 0);
    }
  }
  return static_cast<int64_t>(hash);
}

StepCall check_step_args(
    at::TensorList params,
    at::TensorList directions,
    at::TensorList states,
    at::IntArrayRef layout,
    const at::Tensor& table,
    int64_t fingerprint,
    const at::Tensor& hyper,
    const at::Tensor& steps,
    int64_t from_step,
    int64_t to_step,
    const at::Tensor& ledger_in,
    const at::Tensor& ledger_out,
    const at::Tensor& report,
    int64_t report_row) {
  TORCH_CHECK(params.size() == directions.size(), "adapeft.perturb_: params has ", params.size(),
              " tensors but directions has ", directions.size());
  const auto device = table.device();
  for (const auto& [name, t] : std::initializer_list<std::pair<const char*, const at::Tensor*>>{
           {"table", &table}, {"hyper", &hyper}, {"steps", &steps}, {"ledger_in", &ledger_in},
           {"ledger_out", &ledger_out}, {"report", &report}}) {
    TORCH_CHECK(t->device() == device, "adapeft.perturb_: ", name, " is on ", t->device(), " but table is on ", device);
    TORCH_CHECK(t->is_contiguous(), "adapeft.perturb_: ", name, " must be contiguous");
  }
  if (!params.empty()) {
    TORCH_CHECK(params[0].device() == device, "adapeft.perturb_: the group is on ", params[0].device(),
                " but its table is on ", device);
  }
  const int64_t num_tensors = static_cast<int64_t>(params.size());
  const int64_t num_chunks = count_chunks(params);
  TORCH_CHECK(steps.scalar_type() == at::kFloat, "adapeft.perturb_: steps must be float32, got ", steps.scalar_type());
  TORCH_CHECK(from_step >= -1 && from_step < steps.numel(), "adapeft.perturb_: from_step=", from_step,
              " is outside [-1, ", steps.numel(), ") (-1 means the unperturbed weights)");
  TORCH_CHECK(to_step >= -1 && to_step < steps.numel(), "adapeft.perturb_: to_step=", to_step,
              " is outside [-1, ", steps.numel(), ") (-1 means restore)");
  for (const auto& [name, ledger] : std::initializer_list<std::pair<const char*, const at::Tensor*>>{
           {"ledger_in", &ledger_in}, {"ledger_out", &ledger_out}}) {
    TORCH_CHECK(ledger->scalar_type() == at::kLong && ledger->numel() >= kLedgerHeaderWords + num_chunks,
                "adapeft.perturb_: ", name, " must be int64 with at least ", kLedgerHeaderWords + num_chunks,
                " words for this group; make it with adapeft.new_ledger");
  }
  TORCH_CHECK(from_step < 0 || !ledger_in.is_same(ledger_out),
              "adapeft.perturb_: ledger_in and ledger_out must be different ledgers when rebasing from a step");
  TORCH_CHECK(report.scalar_type() == at::kDouble && report.numel() % kReportFields == 0,
              "adapeft.perturb_: report must be float64 with ", static_cast<int64_t>(kReportFields),
              " values per row");
  TORCH_CHECK(report_row >= -1 && report_row < report.numel() / kReportFields, "adapeft.perturb_: report_row=",
              report_row, " is outside [-1, ", report.numel() / kReportFields, ")");
  bool optimizer_kinds = false;
  for (size_t i = 0; i < layout.size(); i += kStatesPerTensor + 1) optimizer_kinds |= layout[i] != kDirectionTensor;
  TORCH_CHECK(!optimizer_kinds || (hyper.scalar_type() == at::kDouble &&
                                   hyper.numel() == num_tensors * static_cast<int64_t>(kHyperWords)),
              "adapeft.perturb_: hyper must be float64 with ", static_cast<int64_t>(kHyperWords),
              " values per tensor when directions come from an optimizer");
  StepCall call;
  call.table = table;
  call.hyper = optimizer_kinds ? hyper.data_ptr<double>() : nullptr;
  if (fingerprint == group_fingerprint(params, directions, states, layout)) {
    TORCH_CHECK(table.scalar_type() == at::kLong &&
                    table.numel() == kTableHeaderWords + num_tensors * kTableTensorWords + num_chunks,
                "adapeft.perturb_: table does not describe this group; build it with adapeft.pack_group");
  } else {
    // The table is a cache of the group's addresses: when they changed (a parameter was reallocated or
    // replaced, or the tensors are copies) the op stays correct with a table rebuilt for this call.
    TORCH_WARN_ONCE("adapeft.perturb_: the group's tensors are not those its table was built for (a parameter ",
                    "or direction was reallocated or replaced); using a table rebuilt for this call, which costs ",
                    "host work and a copy per call. Build a new table with adapeft.pack_group.");
    call.table = table_on(build_group_table(params, directions, states, layout), device);
  }
  call.num_tensors = num_tensors;
  call.num_chunks = num_chunks;
  call.capacity = ledger_out.numel() - kLedgerHeaderWords - num_chunks;
  call.report_row = report_row < 0 ? nullptr : report.data_ptr<double>() + report_row * kReportFields;
  return call;
}

}  // namespace adapeft
