// Op schemas of the adapeft library and the small Python module that loads them.
// Kernels live one op per file per backend in cpu/ and cuda/; adapeft/ops/reference.py holds the
// pure-PyTorch twin of every op and adapeft/ops/fake.py the fake (meta) implementations.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "group_table.h"
#include "layout.h"

TORCH_LIBRARY(adapeft, m) {
  // Validates a parameter group and returns its table (pointers, sizes, dtypes, chunk map) on the
  // group's device. Built once per group; every later step reads it on the device. Each tensor's
  // direction is given in `directions`, or (per `layout`: a kind and three indices into `states` per
  // tensor) formed from a gradient there and an optimizer's state tensors.
  m.def("pack_group(Tensor[] params, Tensor[] directions, Tensor[] states, int[] layout) -> Tensor");
  // Moves the group in place from step `from_step` (-1: the unperturbed weights w0) to step
  // `to_step` (-1: restore w0), i.e. to w0 - steps[to_step] * d, rebuilding w0 bit for bit from the
  // current values and `ledger_in`; records in `ledger_out` what the next move needs, and writes
  // the realized step and element counts to row `report_row` of `report` (-1: no row). `hyper`
  // holds the optimizer's hyperparameters per tensor when `layout` names optimizer directions.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] directions, Tensor[] states, int[] layout, Tensor table, "
      "int fingerprint, Tensor hyper, Tensor steps, int from_step, int to_step, Tensor ledger_in, "
      "Tensor(b!) ledger_out, Tensor(c!) report, int report_row) -> ()");
  // One least-squares fit of dL(x) = -x*b + x^2/2*A per row of `losses` (K x M, M odd, the middle
  // column the unperturbed loss) at the realized steps `steps` (K x M), with R^2, the acceptance
  // filter, PPI = b^2/(A*n), eta* = b/A, and PPI accumulated into `appi` for accepted rows.
  m.def(
      "quadratic_fit(Tensor losses, Tensor steps, Tensor counts, Tensor(a!)? appi, float r2_threshold=0.99) "
      "-> (Tensor b, Tensor A, Tensor r2, Tensor accepted, Tensor ppi, Tensor eta_star)");
  // Knapsack over groups (CPU): values are loss reductions (>= 0), counts parameters (> 0), rank breaks
  // ties among equally efficient groups of equal size. Values are compared exactly, as the real numbers
  // their doubles stand for (csrc/knapsack.h), so that every sum and tie is exact.
  // The paper's greedy order: groups by value per parameter, descending (then fewer parameters, then
  // rank), and the value of the first i + 1 groups of it at i (the exact sum rounded once to a double).
  m.def("knapsack_greedy(Tensor values, Tensor counts, Tensor rank) -> (Tensor order, Tensor nested_values)");
  // The refined optimum for one capacity: the most value, and among those sets the fewest parameters;
  // info = (proven optimal, core size, states stored). Past max_states (fewer for values spanning more
  // than about 2^60, so that memory stays bounded) it returns the greedy solution with proven = 0.
  m.def(
      "knapsack_exact(Tensor values, Tensor counts, Tensor rank, int capacity, int max_states) "
      "-> (Tensor mask, Tensor info)");
  // Every non-dominated (parameters, value) subset for K <= 64, in increasing parameters, with its value
  // (the exact sum rounded once to a double) and bit mask; empty if the frontier grows past max_points.
  m.def(
      "knapsack_pareto(Tensor values, Tensor counts, Tensor rank, int max_points) "
      "-> (Tensor counts, Tensor values, Tensor masks)");
  // (parameters, value rounded once from the exact sum) of all 2^K subsets for K <= 24, subset s at index s.
  m.def("knapsack_exhaustive(Tensor values, Tensor counts, Tensor rank) -> (Tensor counts, Tensor values)");
}

namespace {

int64_t fingerprint(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& directions,
                    const std::vector<at::Tensor>& states, const std::vector<int64_t>& layout) {
  return adapeft::group_fingerprint(params, directions, states, layout);
}

// How many distinct threads at::parallel_for used for n items: with the extension built without
// OpenMP it runs serially even when torch has several threads.
int64_t parallel_threads_used(int64_t n) {
  std::mutex lock;
  std::set<std::thread::id> seen;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef ADAPEFT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

pybind11::dict layout() {
  using namespace adapeft;
  pybind11::dict out;
  out["chunk_elements"] = kChunkElements;
  out["table_header_words"] = static_cast<int64_t>(kTableHeaderWords);
  out["table_tensor_words"] = static_cast<int64_t>(kTableTensorWords);
  out["states_per_tensor"] = static_cast<int64_t>(kStatesPerTensor);
  out["hyper_words"] = static_cast<int64_t>(kHyperWords);
  out["table_layout_version"] = kTableLayoutVersion;
  out["chunk_tensor_shift"] = kChunkTensorShift;
  out["ledger_header_words"] = static_cast<int64_t>(kLedgerHeaderWords);
  out["directory_offset_shift"] = kDirectoryOffsetShift;
  out["chunk_unmoved"] = kChunkUnmoved;
  out["entry_position_shift"] = kEntryPositionShift;
  out["report_fields"] = static_cast<int64_t>(kReportFields);
  out["tensor_code_shifts"] = std::vector<int64_t>{kParamDtypeShift, kDirectionDtypeShift, kDirectionKindShift,
                                                   kStateDtypeShift};
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "adapeft compiled kernels; the ops are under torch.ops.adapeft";
  module.def("group_fingerprint", &fingerprint, "Fingerprint of a group (its layout and its tensors' pointers, sizes, "
             "dtypes)");
  module.def("parallel_threads_used", &parallel_threads_used);
  module.def("build_info", &build_info);
  module.def("layout", &layout);
}
