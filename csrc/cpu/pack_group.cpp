#include <torch/library.h>

#include "group_table.h"

namespace adapeft {
namespace {

at::Tensor pack_group_cpu(at::TensorList params, at::TensorList directions, at::TensorList states,
                          at::IntArrayRef layout) {
  return build_group_table(params, directions, states, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CPU, m) { m.impl("pack_group", &pack_group_cpu); }

}  // namespace adapeft
