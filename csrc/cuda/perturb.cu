// CUDA kernel of adapeft::perturb_: one launch per step for the whole group, whatever its number
// of tensors or mix of dtypes. A persistent grid walks the group's chunks (described by the table
// built once by pack_group); step sizes are read from device memory and nothing waits for the host,
// so a captured CUDA graph replays the same launches for new step values.
//
// Determinism: every block writes its totals to its own slot and the last block to finish adds the
// slots in block order, so the report (the realized step above all) is the same bits on every run and
// on every rank of a data-parallel job; floating-point atomics would add in arrival order.
//
// The kernel itself is in move_chunk.cuh (with the PTX helpers of ptx.cuh); this file holds the launch policy:
// which instantiation a group takes, how many blocks it runs, and the op's entry point.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "group_table.h"
#include "move_chunk.cuh"
#include "step_math.h"

namespace adapeft {
namespace {

// The dynamic shared memory a block of an instantiation is launched with.
template <int kParamBits, bool kStage>
constexpr size_t kSharedBytes = sizeof(MoveShared<kParamBits, kStage>);

// How many blocks of an instantiation fit on `device` at once (and lets it use its shared memory).
template <bool kWithRules, int kParamBits, bool kStage>
int64_t resident_blocks(int device) {
  static int64_t cached[64] = {0};
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 64 && cached[device] > 0) return cached[device];
  constexpr size_t bytes = kSharedBytes<kParamBits, kStage>;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  TORCH_CHECK(bytes <= props->sharedMemPerBlockOptin, "adapeft.perturb_: the CUDA move kernel needs ", bytes,
              " bytes of shared memory per block", kParamBits == 64 ? " for a group with float64" : "", ", and ",
              props->name, " allows ", props->sharedMemPerBlockOptin);
  const auto kernel = move_kernel<kWithRules, kParamBits, kStage>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreadsOf<kParamBits>, bytes));
  const int64_t blocks = static_cast<int64_t>(std::max(1, per_sm)) * props->multiProcessorCount;
  if (device < 64) cached[device] = blocks;
  return blocks;
}

// Whether moves on `device` stage chunks in shared memory: on Hopper and later GPUs with room for the
// stage buffers, and not under ADAPEFT_CUDA_STAGE=0 (which launches as other GPUs do, for tests and
// benchmarks). Groups with float64 are not staged: with their 64-bit ledger values the buffers would
// take 206 KB a block.
bool stages_chunks(int device) {
  static const bool allowed = [] {
    const char* setting = std::getenv("ADAPEFT_CUDA_STAGE");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  return allowed && props->major >= 9 && kSharedBytes<32, true> <= props->sharedMemPerBlockOptin;
}

template <bool kWithRules, int kParamBits, bool kStage>
void launch_move(MoveArgs a, int device) {
  const int64_t blocks =
      std::max<int64_t>(1, std::min(a.num_chunks, resident_blocks<kWithRules, kParamBits, kStage>(device)));
  const at::Tensor block_totals =
      at::empty({blocks * kTotalWords}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device));
  a.block_totals = block_totals.data_ptr<int64_t>();
  move_kernel<kWithRules, kParamBits, kStage><<<static_cast<unsigned>(blocks), kThreadsOf<kParamBits>,
                                                kSharedBytes<kParamBits, kStage>, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stage buffers pay where a block moves several chunks: the fetch of its next chunk overlaps the move
// of the current one. A group of no more chunks than resident blocks (one a block: norms, biases) has
// no fetch to overlap and goes unstaged, where the 16-bit kernel's element-strided chunks take two
// passes, not eight (faster on the biases of GPT-2-large shapes: benchmarks/HISTORY.md, 2026-11-24).
template <bool kWithRules, int kParamBits>
void launch_move_staged_if_it_pays(MoveArgs a, int device) {
  if (stages_chunks(device) && a.num_chunks > resident_blocks<kWithRules, kParamBits, true>(device)) {
    launch_move<kWithRules, kParamBits, true>(a, device);
  } else {
    launch_move<kWithRules, kParamBits, false>(a, device);
  }
}

// param_bits: the widest param of the group. Groups of 16-bit params have kernels of their own where
// they have no optimizer rules: with the rules' state in 64 registers they would spill. With rules they
// share the 32-bit kernels.
template <bool kWithRules>
void launch_move(MoveArgs a, int device, int64_t param_bits) {
  if (param_bits == 64) {
    launch_move<kWithRules, 64, false>(a, device);
  } else if (kWithRules || param_bits == 32) {
    launch_move_staged_if_it_pays<kWithRules, 32>(a, device);
  } else if constexpr (!kWithRules) {
    launch_move_staged_if_it_pays<kWithRules, 16>(a, device);
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
  call.hyper != nullptr ? launch_move<true>(a, device, param_bits) : launch_move<false>(a, device, param_bits);
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CUDA, m) { m.impl("perturb_", &perturb_cuda); }

}  // namespace adapeft
