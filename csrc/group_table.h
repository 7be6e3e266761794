// Host-side description of a parameter group: validation, the group table and its fingerprint.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "layout.h"

namespace adapeft {

// Validates a group and returns its table as a CPU int64 tensor. `layout` has kStatesPerTensor + 1
// integers per tensor (empty: every direction given): the direction kind, then the indices into
// `states` of its optimizer state tensors (-1 when absent).
at::Tensor build_group_table(at::TensorList params, at::TensorList directions, at::TensorList states,
                             at::IntArrayRef layout);

// A host-built table on `device`, copied without waiting for the device.
at::Tensor table_on(const at::Tensor& host_table, const c10::Device& device);

// FNV-1a over the layout and (pointer, numel, dtype, contiguity) of every tensor; adapeft/ops/layout.py
// mirrors it.
int64_t group_fingerprint(at::TensorList params, at::TensorList directions, at::TensorList states,
                          at::IntArrayRef layout);

// Number of chunks of a group, from the sizes alone.
int64_t count_chunks(at::TensorList params);

// What a perturbation kernel needs once the arguments have been checked.
struct StepCall {
  at::Tensor table;     // the table given, or one rebuilt when it describes other tensors
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t capacity;     // ledger_out entries
  double* report_row;   // nullptr when no report row is asked for
  const double* hyper;  // kHyperWords per tensor, or nullptr when every direction is given
};

StepCall check_step_args(at::TensorList params, at::TensorList directions, at::TensorList states,
                         at::IntArrayRef layout, const at::Tensor& table, int64_t fingerprint, const at::Tensor& hyper,
                         const at::Tensor& steps, int64_t from_step, int64_t to_step, const at::Tensor& ledger_in,
                         const at::Tensor& ledger_out, const at::Tensor& report, int64_t report_row);

}  // namespace adapeft
