// CUDA kernel of adapeft::perturb_: one launch per step for the whole group, whatever its number
// of tensors or mix of dtypes. A persistent grid walks the group's chunks (described by the table
// built once by pack_group); step sizes are read from device memory and nothing waits for the host,
// so a captured CUDA graph replays the same launches for new step values.
//
// Determinism: every block writes its totals to its own slot and the last block to finish adds the
// slots in block order, so the report (the realized step above all) is the same bits on every run and
// on every rank of a data-parallel job; floating-point atomics would add in arrival order.
//
// The kernel itself is in move_chunk.cuh (with the PTX helpers of ptx.cuh), launched by move_launch.cuh and
// compiled once per instantiation in the move_*.cu files; this file holds the launch policy (which
// instantiation a group takes) and the op's entry point.
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "group_table.h"
#include "move_launch.h"

namespace adapeft {
namespace {

// How many blocks of an instantiation fit on `device` at once (and lets it use its shared memory).
template <bool kWithRules, int kParamBits, bool kStage>
int64_t resident_blocks(int device) {
  static int64_t cached[64] = {0};
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 64 && cached[device] > 0) return cached[device];
  const size_t bytes = move_shared_bytes<kWithRules, kParamBits, kStage>();
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  TORCH_CHECK(bytes <= props->sharedMemPerBlockOptin, "adapeft.perturb_: the CUDA move kernel needs ", bytes,
              " bytes of shared memory per block", kParamBits == 64 ? " for a group with float64" : "", ", and ",
              props->name, " allows ", props->sharedMemPerBlockOptin);
  int per_sm = 0;
  C10_CUDA_CHECK((move_blocks_per_sm<kWithRules, kParamBits, kStage>(&per_sm)));
  const int64_t blocks = static_cast<int64_t>(std::max(1, per_sm)) * props->multiProcessorCount;
  if (device < 64) cached[device] = blocks;
  return blocks;
}

template <bool kWithRules, int kParamBits, bool kStage>
void move(MoveArgs a, int device) {
  const int64_t blocks =
      std::max<int64_t>(1, std::min(a.num_chunks, resident_blocks<kWithRules, kParamBits, kStage>(device)));
  const at::Tensor block_totals =
      at::empty({blocks * kTotalWords}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device));
  a.block_totals = block_totals.data_ptr<int64_t>();
  C10_CUDA_CHECK((launch_move<kWithRules, kParamBits, kStage>(a, blocks, at::cuda::getCurrentCUDAStream())));
}

// Whether moves on `device` stage chunks in shared memory: on Hopper and later GPUs with room for the
// stage buffers, and not under ADAPEFT_CUDA_STAGE=0 (which launches as other GPUs do, for tests and
// benchmarks). Groups with float64 are not staged: with their 64-bit ledger values the buffers would
// take 206 KB a block.
template <bool kWithRules>
bool stages_chunks(int device) {
  static const bool allowed = [] {
    const char* setting = std::getenv("ADAPEFT_CUDA_STAGE");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  return allowed && props->major >= 9 && move_shared_bytes<kWithRules, 32, true>() <= props->sharedMemPerBlockOptin;
}

// Stage buffers pay where a block moves several chunks: the fetch of its next chunk overlaps the move
// of the current one. A group of no more chunks than resident blocks (one a block: norms, biases) has
// no fetch to overlap and goes unstaged, where the 16-bit kernel's element-strided chunks take two
// passes, not eight (faster on the biases of GPT-2-large shapes: benchmarks/HISTORY.md, 2026-11-24).
template <bool kWithRules, int kParamBits>
void move_staged_if_it_pays(MoveArgs a, int device) {
  if (stages_chunks<kWithRules>(device) && a.num_chunks > resident_blocks<kWithRules, kParamBits, true>(device)) {
    move<kWithRules, kParamBits, true>(a, device);
  } else {
    move<kWithRules, kParamBits, false>(a, device);
  }
}

// param_bits: the widest param of the group. Groups of 16-bit params have kernels of their own where
// they have no optimizer rules: with the rules' state in 64 registers they would spill. With rules they
// share the 32-bit kernels.
template <bool kWithRules>
void move_widest(MoveArgs a, int device, int64_t param_bits) {
  if (param_bits == 64) {
    move<kWithRules, 64, false>(a, device);
  } else if (kWithRules || param_bits == 32) {
    move_staged_if_it_pays<kWithRules, 32>(a, device);
  } else if constexpr (!kWithRules) {
    move_staged_if_it_pays<kWithRules, 16>(a, device);
  }
}

void perturb_cuda(at::TensorList params, at::TensorList directions, at::TensorList states, at::IntArrayRef layout,
                  const at::Tensor& table, int64_t fingerprint, const at::Tensor& hyper, const at::Tensor& steps,
                  int64_t from_step, int64_t to_step, const at::Tensor& ledger_in, const at::Tensor& ledger_out,
                  const at::Tensor& report, int64_t report_row) {
  const StepCall call = check_step_args(params, directions, states, layout, table, fingerprint, hyper, steps,
                                        from_step, to_step, ledger_in, ledger_out, report, report_row);
  const c10::cuda::CUDAGuard guard(table.device());
  MoveArgs a;
  a.table = call.table.data_ptr<int64_t>();
  a.num_tensors = call.num_tensors;
  a.num_chunks = call.num_chunks;
  a.steps = steps.data_ptr<float>();
  a.from_step = static_cast<int>(from_step);
  a.to_step = static_cast<int>(to_step);
  a.ledger_in = ledger_in.data_ptr<int64_t>();
  a.ledger_out = ledger_out.data_ptr<int64_t>();
  a.capacity = static_cast<unsigned long long>(call.capacity);
  a.report_row = call.report_row;
  a.hyper = call.hyper;
  const int device = table.get_device();
  int64_t param_bits = 16;
  for (const at::Tensor& p : params) param_bits = std::max<int64_t>(param_bits, 8 * p.element_size());
  call.hyper != nullptr ? move_widest<true>(a, device, param_bits) : move_widest<false>(a, device, param_bits);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CUDA, m) { m.impl("perturb_", &perturb_cuda); }

}  // namespace adapeft
