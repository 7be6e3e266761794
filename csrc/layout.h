// Memory layouts shared by the CPU and CUDA kernels and mirrored by adapeft/ops/layout.py
// (tests/test_build.py, test_layout_matches_extension, checks that the two agree).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace adapeft {

// A group is cut into chunks of at most kChunkElements elements; a chunk never straddles two
// tensors, so one chunk has one pointer, one dtype and contiguous memory.
constexpr int kChunkShift = 12;
constexpr int64_t kChunkElements = int64_t{1} << kChunkShift;

// Group table, int64 words: header, then kTableTensorWords per tensor, then one word per chunk.
enum TableHeader : int64_t {
  kTableNumTensors = 0,
  kTableNumChunks = 1,
  kTableNumElements = 2,
  kTableVersion = 3,
  kTableHeaderWords = 4,
};
enum TableTensorField : int64_t {
  kTensorParamPtr = 0,
  kTensorDirectionPtr = 1,  // the direction, or the gradient for an optimizer's direction
  kTensorNumel = 2,
  kTensorDtypes = 3,  // the tensor's codes word, below
  kTensorStatePtr = 4,  // up to three optimizer state tensors (0 when absent), see DirectionKind
  kTableTensorWords = 8,
};
constexpr int kStatesPerTensor = 3;
constexpr int64_t kTableLayoutVersion = 2;

// How a tensor's direction d is formed. With an optimizer's direction, d = a + lambda * w0 where a is
// computed per element from the gradient g and the optimizer's state, and lambda * w0 is its weight
// decay; the step to w0 - eta * d is then written as round(w0 * (1 - eta*lambda) - eta * a).
enum DirectionKind : int64_t {
  kDirectionTensor = 0,  // d given
  kDirectionAdam = 1,    // states: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad); a = Adam's next update / lr
  kDirectionSgd = 2,     // states: momentum_buffer; a = c_g * g + c_buf * buffer
};
// Per tensor, a row of kHyperWords float64 values (the `hyper` tensor) for the optimizer kinds.
enum HyperField : int64_t {
  kHyperLambda = 0,  // coefficient of w0 in d (decoupled or L2 weight decay)
  kHyperSign = 1,    // +1, or -1 for a maximizing optimizer
  kHyperBeta1 = 2,   // Adam: beta1, beta2, eps, 1 - beta1^t, sqrt(1 - beta2^t) (t: the coming step)
  kHyperBeta2 = 3,
  kHyperEps = 4,
  kHyperBiasCorrection1 = 5,
  kHyperBiasCorrection2Sqrt = 6,
  kHyperGradCoefficient = 2,    // SGD: a = c_g * g + c_buf * buffer
  kHyperBufferCoefficient = 3,
  kHyperWords = 8,
};
// Chunk word: tensor index << kChunkTensorShift | index of the chunk within its tensor.
constexpr int kChunkTensorShift = 40;
constexpr int64_t kChunkIndexMask = (int64_t{1} << kChunkTensorShift) - 1;

enum DtypeCode : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// A tensor's codes word (kTensorDtypes), a byte each: its param's DtypeCode, its direction's, its DirectionKind and
// its optimizer states' DtypeCode.
enum TensorCodeShift : int {
  kParamDtypeShift = 0,
  kDirectionDtypeShift = 8,
  kDirectionKindShift = 16,
  kStateDtypeShift = 24,
};
constexpr int64_t kTensorCodeMask = 0xff;
C10_HOST_DEVICE constexpr int64_t tensor_codes(int64_t param, int64_t direction, int64_t kind, int64_t state) {
  return param << kParamDtypeShift | direction << kDirectionDtypeShift | kind << kDirectionKindShift |
         state << kStateDtypeShift;
}
C10_HOST_DEVICE constexpr int64_t tensor_code(int64_t word, TensorCodeShift shift) {
  return (word >> shift) & kTensorCodeMask;
}

// Ledger, int64 words: header, then a directory word per chunk of the group, then entries.
// A ledger records the original bits of the elements whose step is not exactly invertible, so
// that a restore (or a rebase to the next step) rebuilds w0 bit for bit.
enum LedgerHeader : int64_t {
  kLedgerDemand = 0,       // entry words requested during the step (may exceed the capacity)
  kLedgerBlocksDone = 1,   // CUDA: blocks finished, so the last one can finalise the report
  kLedgerHeaderWords = 2,
};
// Directory word: entry offset << kDirectoryOffsetShift | entry count. A count of kChunkUnmoved
// marks a chunk that could not reserve its entries and was therefore left exactly at w0.
constexpr int kDirectoryOffsetShift = 16;
constexpr int64_t kDirectoryCountMask = 0xFFFF;
constexpr int64_t kChunkUnmoved = 0xFFFF;
// Entry: one word, position within the chunk << 32 | original bits (zero-extended), for dtypes of
// 32 bits or fewer; two words, position << 32 then the 64 original bits, for float64. Entries of a
// chunk are stored in increasing position, so an element's entry is found by counting flagged
// positions before it. Directory offsets, the demand and the capacity count words.
constexpr int kEntryPositionShift = 32;

// Report: one row of kReportFields float64 values per step written.
enum ReportField : int64_t {
  kReportStep = 0,       // realized step t = -(d . dw) / (d . d)
  kReportChanged = 1,    // elements whose bits differ from w0
  kReportUnmoved = 2,    // elements left at w0 because the ledger was full (0 = no overflow)
  kReportSaved = 3,      // ledger entries this step needed (its non-invertible elements)
  kReportNonfinite = 4,  // non-finite direction elements
  kReportFields = 5,
};

}  // namespace adapeft
