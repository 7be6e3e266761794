// CPU kernel of adapeft::perturb_: chunks in parallel (at::parallel_reduce), each chunk in order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "group_table.h"
#include "step_math.h"

namespace adapeft {
namespace {

using StepTotals = TotalsOf<int64_t>;

StepTotals operator+(const StepTotals& a, const StepTotals& b) {
  return {a.dot_dir_step + b.dot_dir_step, a.dot_dir_dir + b.dot_dir_dir, a.changed + b.changed,
          a.unmoved + b.unmoved, a.nonfinite + b.nonfinite, a.saved + b.saved};
}

struct Move {
  bool has_from;
  bool has_to;
  float eta_from;
  float eta_to;
  const int64_t* ledger_in;    // header of the ledger read (only when has_from)
  int64_t* ledger_out;         // header of the ledger written
  int64_t num_chunks;
  int64_t capacity;
};

template <typename T, typename D>
StepTotals move_chunk(T* param, const D* direction, int64_t len, int64_t chunk, int64_t start,
                      const DirectionRule<typename Storage<T>::Arith>& rule, const Move& m) {
  using S = Storage<T>;
  using A = typename S::Arith;
  constexpr int width = S::entry_words;
  T w0[kChunkElements];
  T next[kChunkElements];
  A a[kChunkElements];
  bool flagged[kChunkElements];
  const A eta_from = static_cast<A>(m.eta_from);
  const A eta_to = static_cast<A>(m.eta_to);
  const A c_from = rule.scale(eta_from);
  const A c_to = rule.scale(eta_to);
  for (int64_t i = 0; i < len; ++i) a[i] = rule.term(static_cast<A>(direction[i]), start + i);

  // Rebuild w0 from the current values: unmoved chunks hold it already, ledger entries hold the
  // elements whose step was not invertible (in increasing position), the rest step back exactly.
  const int64_t dir_in = m.has_from ? m.ledger_in[kLedgerHeaderWords + chunk] : 0;
  const int64_t count_in = dir_in & kDirectoryCountMask;
  if (!m.has_from || count_in == kChunkUnmoved) {
    for (int64_t i = 0; i < len; ++i) w0[i] = param[i];
  } else {
    const int64_t* entries = m.ledger_in + kLedgerHeaderWords + m.num_chunks + (dir_in >> kDirectoryOffsetShift);
    int64_t e = 0;
    for (int64_t i = 0; i < len; ++i) {
      if (e < count_in && (entries[e * width] >> kEntryPositionShift) == i) {
        w0[i] = S::from_bits(static_cast<typename S::Bits>(entries[e * width + width - 1]));
        ++e;
      } else {
        w0[i] = step_back(param[i], mul_rn(eta_from, a[i]), c_from);
      }
    }
  }

  int64_t count_out = 0;
  if (m.has_to) {
    for (int64_t i = 0; i < len; ++i) {
      const A s = mul_rn(eta_to, a[i]);
      next[i] = step_away(w0[i], s, c_to);
      flagged[i] = !same_bits(step_back(next[i], s, c_to), w0[i]);
      count_out += flagged[i];
    }
  }

  // A chunk whose entries do not fit stays exactly at w0: a full ledger costs coverage, never bits.
  bool moved = m.has_to;
  int64_t offset = 0;
  if (m.has_to) {
    if (count_out > 0) {
      offset = __atomic_fetch_add(&m.ledger_out[kLedgerDemand], count_out * width, __ATOMIC_RELAXED);
      moved = offset + count_out * width <= m.capacity;
    }
    m.ledger_out[kLedgerHeaderWords + chunk] =
        moved ? (offset << kDirectoryOffsetShift) | count_out : kChunkUnmoved;
  }

  StepTotals totals;
  totals.saved = count_out;
  int64_t* entries_out = m.ledger_out + kLedgerHeaderWords + m.num_chunks + offset;
  int64_t rank = 0;
  for (int64_t i = 0; i < len; ++i) {
    const T out = moved ? next[i] : w0[i];
    param[i] = out;
    if (moved && flagged[i]) {
      const auto bits = static_cast<int64_t>(S::bits(w0[i]));
      if (width == 1) {
        entries_out[rank] = (i << kEntryPositionShift) | bits;
      } else {
        entries_out[rank * width] = i << kEntryPositionShift;
        entries_out[rank * width + 1] = bits;
      }
      ++rank;
    }
    const A d = rule.full(a[i], S::to_float(w0[i]));
    totals.dot_dir_dir += static_cast<double>(d) * static_cast<double>(d);
    totals.nonfinite += !is_finite(d);
    if (moved) {
      totals.changed += !same_bits(out, w0[i]);
      const double dw = static_cast<double>(S::to_float(out)) - static_cast<double>(S::to_float(w0[i]));
      totals.dot_dir_step += static_cast<double>(d) * dw;
    }
  }
  if (m.has_to && !moved) totals.unmoved += len;
  return totals;
}

template <typename T>
StepTotals move_chunk_dispatch_direction(char* param, const char* direction, int64_t direction_code, int64_t len,
                                         int64_t chunk, int64_t start, const int64_t* row, const double* hyper_row,
                                         const Move& m) {
  const auto rule = DirectionRule<typename Storage<T>::Arith>::load(row, hyper_row);
  if (direction_code == kFloat32) {
    return move_chunk<T, float>(reinterpret_cast<T*>(param), reinterpret_cast<const float*>(direction), len, chunk,
                                start, rule, m);
  }
  return move_chunk<T, T>(reinterpret_cast<T*>(param), reinterpret_cast<const T*>(direction), len, chunk, start,
                          rule, m);
}

void perturb_cpu(at::TensorList params, at::TensorList directions, at::TensorList states, at::IntArrayRef layout,
                 const at::Tensor& table, int64_t fingerprint, const at::Tensor& hyper, const at::Tensor& steps,
                 int64_t from_step, int64_t to_step, const at::Tensor& ledger_in, const at::Tensor& ledger_out,
                 const at::Tensor& report, int64_t report_row) {
  const StepCall call = check_step_args(params, directions, states, layout, table, fingerprint, hyper, steps,
                                        from_step, to_step, ledger_in, ledger_out, report, report_row);
  const float* step_values = steps.data_ptr<float>();
  int64_t* out = ledger_out.data_ptr<int64_t>();
  Move m;
  m.has_from = from_step >= 0;
  m.has_to = to_step >= 0;
  m.eta_from = m.has_from ? step_values[from_step] : 0.0f;
  m.eta_to = m.has_to ? step_values[to_step] : 0.0f;
  m.ledger_in = ledger_in.data_ptr<int64_t>();
  m.ledger_out = out;
  m.num_chunks = call.num_chunks;
  m.capacity = call.capacity;
  out[kLedgerDemand] = 0;

  const int64_t* words = call.table.data_ptr<int64_t>();
  const int64_t* rows = words + kTableHeaderWords;
  const int64_t* chunk_words = rows + call.num_tensors * kTableTensorWords;
  constexpr int64_t kChunksPerTask = 16;
  const StepTotals totals = at::parallel_reduce(
      0, call.num_chunks, kChunksPerTask, StepTotals{},
      [&](int64_t begin, int64_t end, StepTotals acc) {
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t word = chunk_words[chunk];
          const int64_t tensor = word >> kChunkTensorShift;
          const int64_t* row = rows + tensor * kTableTensorWords;
          const double* hyper_row = call.hyper == nullptr ? nullptr : call.hyper + tensor * kHyperWords;
          const int64_t start = (word & kChunkIndexMask) << kChunkShift;
          const int64_t len = std::min(kChunkElements, row[kTensorNumel] - start);
          const int64_t codes = row[kTensorDtypes];
          const int64_t direction_code = direction_dtype_code(codes);
          const int64_t param_code = param_dtype_code(codes);
          char* param = reinterpret_cast<char*>(row[kTensorParamPtr]) + start * dtype_bytes(param_code);
          const char* direction =
              reinterpret_cast<const char*>(row[kTensorDirectionPtr]) + start * dtype_bytes(direction_code);
          switch (param_code) {
            case kFloat32:
              acc = acc + move_chunk_dispatch_direction<float>(param, direction, direction_code, len, chunk, start, row,
                                                               hyper_row, m);
              break;
            case kBFloat16:
              acc = acc + move_chunk_dispatch_direction<c10::BFloat16>(param, direction, direction_code, len, chunk,
                                                                       start, row, hyper_row, m);
              break;
            case kFloat16:
              acc = acc + move_chunk_dispatch_direction<c10::Half>(param, direction, direction_code, len, chunk, start,
                                                                   row, hyper_row, m);
              break;
            case kFloat64:
              acc = acc + move_chunk_dispatch_direction<double>(param, direction, direction_code, len, chunk, start,
                                                                row, hyper_row, m);
              break;
          }
        }
        return acc;
      },
      [](const StepTotals& a, const StepTotals& b) { return a + b; });

  if (call.report_row != nullptr) {
    double* row = call.report_row;
    row[kReportStep] = -totals.dot_dir_step / totals.dot_dir_dir;
    row[kReportChanged] = static_cast<double>(totals.changed);
    row[kReportUnmoved] = static_cast<double>(totals.unmoved);
    row[kReportSaved] = static_cast<double>(totals.saved);
    row[kReportNonfinite] = static_cast<double>(totals.nonfinite);
  }
  out[kLedgerDemand] = 0;
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("perturb_", &perturb_cpu); }

}  // namespace adapeft
