// The move kernel's launches as perturb.cpp calls them. Each instantiation is compiled in a file of its own
// (move_*.cu, through move_launch.cuh), so that a parallel build compiles them side by side; this header and
// those files need no torch header, which keeps each compile short.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace adapeft {

struct MoveArgs {
  const int64_t* table;
  int64_t num_tensors;
  int64_t num_chunks;
  const float* steps;
  int from_step;
  int to_step;
  const int64_t* ledger_in;
  int64_t* ledger_out;
  unsigned long long capacity;
  double* report_row;
  const double* hyper;
  int64_t* block_totals;  // kTotalWords per block
};

// The words of a block's totals in MoveArgs::block_totals.
enum TotalWord { kTotalDotDirStep, kTotalDotDirDir, kTotalChanged, kTotalUnmoved, kTotalNonfinite, kTotalSaved,
                 kTotalWords };

// kWithRules: the group's directions are formed from optimizer state; kParamBits: its widest param (16, 32 or
// 64); kStage: the launch stages chunks in shared memory (Hopper and later).

// The dynamic shared memory a block is launched with.
template <bool kWithRules, int kParamBits, bool kStage>
size_t move_shared_bytes();

// Allows that shared memory on the current device and returns how many blocks an SM holds at once.
template <bool kWithRules, int kParamBits, bool kStage>
cudaError_t move_blocks_per_sm(int* blocks);

// Launches `blocks` blocks on `stream`; the launch's error, if any.
template <bool kWithRules, int kParamBits, bool kStage>
cudaError_t launch_move(const MoveArgs& a, int64_t blocks, cudaStream_t stream);

// Every instantiation (16-bit params have no rules: with the rules' state they share the 32-bit kernels).
#define ADAPEFT_MOVE_INSTANTIATIONS(X) \
  X(false, 16, false)                  \
  X(false, 16, true)                   \
  X(false, 32, false)                  \
  X(false, 32, true)                   \
  X(false, 64, false)                  \
  X(true, 32, false)                   \
  X(true, 32, true)                    \
  X(true, 64, false)

#define ADAPEFT_MOVE_FUNCTIONS(prefix, kWithRules, kParamBits, kStage)                                      \
  prefix size_t move_shared_bytes<kWithRules, kParamBits, kStage>();                                        \
  prefix cudaError_t move_blocks_per_sm<kWithRules, kParamBits, kStage>(int*);                              \
  prefix cudaError_t launch_move<kWithRules, kParamBits, kStage>(const MoveArgs&, int64_t, cudaStream_t);

#define ADAPEFT_DECLARE_MOVE(kWithRules, kParamBits, kStage) \
  ADAPEFT_MOVE_FUNCTIONS(extern template, kWithRules, kParamBits, kStage)
ADAPEFT_MOVE_INSTANTIATIONS(ADAPEFT_DECLARE_MOVE)
#undef ADAPEFT_DECLARE_MOVE

}  // namespace adapeft
