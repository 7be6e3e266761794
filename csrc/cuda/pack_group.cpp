#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "group_table.h"

namespace adapeft {
namespace {

// The table is built on the host once per group and sent to the device without waiting for it.
at::Tensor pack_group_cuda(at::TensorList params, at::TensorList directions, at::TensorList states,
                           at::IntArrayRef layout) {
  return table_on(build_group_table(params, directions, states, layout), params[0].device());
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CUDA, m) { m.impl("pack_group", &pack_group_cuda); }

}  // namespace adapeft
