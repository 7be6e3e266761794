// One instantiation's launch of the move kernel (move_chunk.cuh). Included by the move_*.cu files, each of
// which instantiates one with ADAPEFT_INSTANTIATE_MOVE.
#pragma once

#include "move_chunk.cuh"
#include "move_launch.h"

namespace adapeft {

template <bool kWithRules, int kParamBits, bool kStage>
size_t move_shared_bytes() {
  return sizeof(MoveShared<kParamBits, kStage>);
}

template <bool kWithRules, int kParamBits, bool kStage>
cudaError_t move_blocks_per_sm(int* blocks) {
  const auto kernel = move_kernel<kWithRules, kParamBits, kStage>;
  constexpr int bytes = static_cast<int>(sizeof(MoveShared<kParamBits, kStage>));
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (error != cudaSuccess) return error;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreadsOf<kParamBits, kStage>, bytes);
}

template <bool kWithRules, int kParamBits, bool kStage>
cudaError_t launch_move(const MoveArgs& a, int64_t blocks, cudaStream_t stream) {
  move_kernel<kWithRules, kParamBits, kStage>
      <<<static_cast<unsigned>(blocks), kThreadsOf<kParamBits, kStage>, sizeof(MoveShared<kParamBits, kStage>), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace adapeft

#define ADAPEFT_INSTANTIATE_MOVE(kWithRules, kParamBits, kStage) \
  namespace adapeft {                                            \
  ADAPEFT_MOVE_FUNCTIONS(template, kWithRules, kParamBits, kStage) \
  }
