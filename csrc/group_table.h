// Host-side description of a parameter group: validation, the group table and its fingerprint.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "layout.h"

namespace adapeft {

// Validates a group (params and directions) and returns its table as a CPU int64 tensor.
at::Tensor build_group_table(at::TensorList params, at::TensorList directions);

// A host-built table on `device`, copied without waiting for the device.
at::Tensor table_on(const at::Tensor& host_table, const c10::Device& device);

// FNV-1a over (pointer, numel, dtype, contiguity) of every tensor; adapeft/_layout.py mirrors it.
int64_t group_fingerprint(at::TensorList params, at::TensorList directions);

// Number of chunks of a group, from the sizes alone.
int64_t count_chunks(at::TensorList params);

// What a perturbation kernel needs once the arguments have been checked.
struct StepCall {
  at::Tensor table;     // the table given, or one rebuilt when it describes other tensors
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t capacity;     // ledger_out entries
  double* report_row;   // nullptr when no report row is asked for
};

StepCall check_step_args(
    at::TensorList params,
    at::TensorList directions,
    const at::Tensor& table,
    int64_t fingerprint,
    const at::Tensor& steps,
    int64_t from_step,
    int64_t to_step,
    const at::Tensor& ledger_in,
    const at::Tensor& ledger_out,
    const at::Tensor& report,
    int64_t report_row);

}  // namespace adapeft
