// The move kernel of adapeft::perturb_ (see perturb.cpp): the pipeline that moves a group's chunks, its shared
// memory, and the reduction of its report. Included by move_launch.cuh only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "layout.h"
#include "move_launch.h"
#include "ptx.cuh"
#include "step_math.h"

namespace adapeft {
namespace {

// Pipeline. A block moves its chunks one after another with one block barrier between two chunks,
// and each round trip to memory a chunk needs starts a chunk ahead or ends a chunk later:
// - its table and ledger directory words arrive by cp.async two chunks ahead;
// - its param and direction bytes are copied into shared memory by the copy engine while the chunk
//   before it is moved (on Hopper and later; chunks that cannot be staged are prefetched into L2);
// - its entries from the previous step are copied to shared memory while the chunk before it is moved
//   and then flagged by position in a bitmap, beside the rank of each bitmap word's first entry (a
//   flagged element's entry is found by its rank: entries are stored in increasing position);
// - its new entries are reserved (one global atomic) when the chunk after it starts, and written
//   when that one ends, by four warps. Its next values are stored at once; a chunk whose entries
//   then do not fit is put back to w0, and each thread adds its share of a chunk's step to the
//   report only once the chunk is known to keep it.
constexpr int kWords = static_cast<int>(kChunkElements) / 32;
constexpr int kQuarters = 4;  // a chunk's entries are written by kQuarters warps, a bitmap word a lane
constexpr int kWriters = kQuarters * 32;
constexpr int kQuarterShift = kChunkShift - 2;
constexpr int kWordRing = 4;  // words of the previous, current, next and next-but-one chunk
static_assert(kWords == kWriters, "each writer owns one bitmap word");
static_assert((kChunkElements >> kQuarterShift) == kQuarters, "a quarter is a quarter of a chunk");

// A thread's counts stay below the number of elements its block sees, so 32 bits hold them (and
// keep registers free); a block's and the grid's are 64 bits.
using ThreadTotals = TotalsOf<uint32_t>;
using Totals = TotalsOf<unsigned long long>;

// A thread's part of one chunk's step, added to its totals once the chunk is known to keep its move.
struct ChunkShare {
  double dot_dir_step = 0.0;
  uint32_t changed = 0;
};

// A launch is compiled for the widest param dtype of its group, kParamBits (16, 32 or 64): its saved
// bits in shared memory are that wide, and its stage buffers hold a whole chunk of such params and of
// float32 directions (a direction is float32 or of its param's dtype).
template <int kParamBits>
using LedgerValue =
    std::conditional_t<kParamBits == 64, uint64_t, std::conditional_t<kParamBits == 32, uint32_t, uint16_t>>;

template <int kParamBits>
constexpr int kStageBytesOf = (kParamBits / 8 + 4) * static_cast<int>(kChunkElements);

// The param bytes, then the direction bytes, of the chunk being moved and of the next one: in the
// launches for GPUs with room for them (Hopper and later), first in shared memory.
template <int kBytes>
struct StageBuffers {
  alignas(128) unsigned char stage[2][kBytes];
};

template <>
struct StageBuffers<0> {};

// Blocks an SM a launch is compiled for. A second block hides the wait at the barrier that ends each of
// the other's rounds (a third of a float32 block's cycles when it ran alone: benchmarks/HISTORY.md,
// 2026-12-07). Blocks of 16-bit params, staged or not, and staged float32 blocks (107 KB) leave room
// for one; an unstaged float32 block gained nothing from a second (2026-11-24).
template <int kParamBits, bool kStage>
constexpr int kBlocksPerSm = kParamBits == 16 || (kParamBits == 32 && kStage) ? 2 : 1;

// Threads a block runs. Every thread repeats a round's bookkeeping (waiting for its data, the loop), so a
// block of two an SM runs 256 threads of 16 elements a chunk: half the bookkeeping an element, with 128
// registers a thread (faster on large and on medium groups). A block alone on its SM keeps 512 threads:
// 256 left it slower (benchmarks/HISTORY.md, 2026-11-24).
template <int kParamBits, bool kStage>
constexpr int kThreadsOf = kBlocksPerSm<kParamBits, kStage> == 2 ? 256 : 512;

// Where one chunk lives, decoded from the group table. `dir_in` is the chunk's ledger directory word;
// `packed` and `staged` say how its move reads it (packable, staged_in_shared), set by its fetching thread.
struct ChunkView {
  const int64_t* row;
  char* param;
  const char* direction;
  int64_t start;
  int len;
  int64_t param_code;
  int64_t direction_code;
  int64_t dir_in;
  bool packed = false;
  bool staged = false;
};

// Each buffer comes twice: one for the chunk being moved, one for the chunk before or after it.
template <int kParamBits, bool kStage>
struct MoveShared : StageBuffers<kStage ? kStageBytesOf<kParamBits> : 0> {
  using Value = LedgerValue<kParamBits>;
  static constexpr int kThreads = kThreadsOf<kParamBits, kStage>;
  static constexpr int kItems = static_cast<int>(kChunkElements) / kThreads;  // a thread's elements of a chunk
  static constexpr int kWarps = kThreads / 32;
  static constexpr bool kStaged = kStage;
  static constexpr int kStageBytes = kStage ? kStageBytesOf<kParamBits> : 0;
  uint64_t stage_landed[2];  // mbarriers: a stage buffer's fetch is complete
  // A chunk's entries from the previous step: its first kThreads entries (one or two words each), a bit
  // by position, and the rank of the first entry of each bitmap word that has one. Not a value by
  // position: that took 32 KB a float32 block, which kept its block alone on an SM.
  int64_t entries[2][kThreads * 2];
  uint32_t in_bits[2][kWords];
  uint16_t in_first[2][kWords];
  const int64_t* entries_in[2];  // where all of them are, in ledger_in (read from shared: rarely needed)
  // A chunk's elements whose step is not invertible, by position, and how many per quarter.
  Value out_value[2][kChunkElements];
  uint32_t out_bits[2][kWords];
  uint32_t out_quarter[2][kQuarters];
  int64_t chunk_words[kWordRing][2];     // a chunk's table word and ledger directory word
  // The same chunks decoded once, by the thread that fetches their data, for every thread to read (decoding
  // in every thread took a tenth of a round's instructions and waited on the table's loads).
  ChunkView views[kWordRing];
  int moved[2];
  unsigned long long out_offset;
  double dot_dir_step[kWarps];
  double dot_dir_dir[kWarps];
  unsigned long long counts[4][kWarps];
  int is_last;
};

__device__ __forceinline__ const int64_t* table_word_of(const MoveArgs& a, int64_t chunk) {
  return a.table + kTableHeaderWords + a.num_tensors * kTableTensorWords + chunk;
}

// A barrier of the kWriters threads alone (barrier 0 is __syncthreads).
__device__ __forceinline__ void sync_writers() { asm volatile("bar.sync 1, %0;\n" ::"n"(kWriters) : "memory"); }

__device__ void prefetch_chunk_words(const MoveArgs& a, int64_t chunk, int64_t* shared_words) {
  if (chunk >= a.num_chunks) return;
  copy_word_async(shared_words, table_word_of(a, chunk));
  if (a.from_step >= 0) copy_word_async(shared_words + 1, a.ledger_in + kLedgerHeaderWords + chunk);
}

__device__ ChunkView view_chunk(const MoveArgs& a, const int64_t* words) {
  const int64_t* rows = a.table + kTableHeaderWords;
  ChunkView v;
  v.row = rows + (words[0] >> kChunkTensorShift) * kTableTensorWords;
  v.start = (words[0] & kChunkIndexMask) << kChunkShift;
  v.len = static_cast<int>(min(kChunkElements, v.row[kTensorNumel] - v.start));
  const int64_t codes = v.row[kTensorDtypes];
  v.param_code = param_dtype_code(codes);
  v.direction_code = direction_dtype_code(codes);
  v.param = reinterpret_cast<char*>(v.row[kTensorParamPtr]) + v.start * dtype_bytes(v.param_code);
  v.direction = reinterpret_cast<const char*>(v.row[kTensorDirectionPtr]) + v.start * dtype_bytes(v.direction_code);
  v.dir_in = a.from_step >= 0 ? words[1] : 0;
  return v;
}

// A chunk whose packs are aligned: a whole chunk, its param 16-byte aligned and its direction aligned
// to a pack of as many elements (the vectorized move's loads and stores need no bounds checks).
__device__ bool packable(const ChunkView& v) {
  const int64_t vec = 16 / dtype_bytes(v.param_code);
  return v.len == kChunkElements && reinterpret_cast<uintptr_t>(v.param) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(v.direction) % (vec * dtype_bytes(v.direction_code)) == 0;
}

// A chunk whose bytes the copy engine puts in shared memory: packable (so also 16-byte aligned, as the
// engine needs) and within a stage buffer. Decided by the thread that starts the copy, for every thread
// that reads it a round later (ChunkView::staged).
template <typename Shared>
__device__ bool staged_in_shared(const ChunkView& v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return Shared::kStaged && packable(v) &&
         (dtype_bytes(v.param_code) + dtype_bytes(v.direction_code)) * kChunkElements <= Shared::kStageBytes;
#else
  return false;
#endif
}

// The thread that starts a chunk's data copies: lane 0 of a warp with no other work at a round's start
// (thread 0 reserves entries and prefetches words then).
constexpr int kFetcher = 32;

template <typename Shared>
__device__ void init_stage_barriers(Shared& sh) {
  if (threadIdx.x != kFetcher) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int b = 0; b < 2; ++b) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(&sh.stage_landed[b])) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Decodes the chunk of ring slot `slot` into sh.views[slot] and starts bringing its param and direction
// bytes closer a round before its move loads them: loaded when needed, each round waited a whole memory
// round trip. A staged chunk is copied into `buffer` and completes that buffer's barrier phase when it
// lands; any other chunk completes the phase at once and is prefetched into L2 where its runs are whole
// 16-byte units, 16-byte aligned. The view is read by the other threads after the round's barrier.
template <typename Shared>
__device__ void fetch_chunk_data(const MoveArgs& a, int slot, Shared& sh, int buffer) {
  if (threadIdx.x != kFetcher) return;
  ChunkView v = view_chunk(a, sh.chunk_words[slot]);
  v.packed = packable(v);
  v.staged = staged_in_shared<Shared>(v);
  sh.views[slot] = v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned landed = shared_address(&sh.stage_landed[buffer]);
  const auto param_bytes = static_cast<uint32_t>(v.len * dtype_bytes(v.param_code));
  const auto direction_bytes = static_cast<uint32_t>(v.len * dtype_bytes(v.direction_code));
  if constexpr (Shared::kStaged) {
    if (v.staged) {
      const unsigned to = shared_address(sh.stage[buffer]);
      // The buffer's last reads, a round ago, were the generic proxy's; the copy engine writes through the
      // async one.
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(landed),
                   "r"(param_bytes + direction_bytes)
                   : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
                       "r"(to), "l"(v.param), "r"(param_bytes), "r"(landed)
                   : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                       to + param_bytes),
                   "l"(v.direction), "r"(direction_bytes), "r"(landed)
                   : "memory");
      return;
    }
  }
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(landed) : "memory");
  const auto prefetch = [](const char* from, uint32_t bytes) {
    if (reinterpret_cast<uintptr_t>(from) % 16 != 0 || bytes % 16 != 0) return;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(from), "r"(bytes) : "memory");
  };
  prefetch(v.param, param_bytes);
  prefetch(v.direction, direction_bytes);
#endif
}

// Waits until the `chunk`-th chunk's fetch has completed its stage buffer's barrier phase (a buffer
// takes chunks of one parity, so its phases alternate with every second chunk).
template <typename Shared>
__device__ void wait_chunk_data(Shared& sh, int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned landed = shared_address(&sh.stage_landed[chunk & 1]);
  const auto parity = static_cast<uint32_t>((chunk >> 1) & 1);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(landed), "r"(parity)
        : "memory");
  }
#endif
}

// Ledger words an entry of a chunk takes.
template <bool kWithDouble>
__device__ __forceinline__ int entry_width(int64_t param_code) {
  return kWithDouble && param_code == kFloat64 ? 2 : 1;
}

// The previous step's entries of a chunk (none where it saved none or was left unmoved).
struct EntriesIn {
  const int64_t* first = nullptr;
  int count = 0;
  int width = 1;
};

template <bool kWithDouble>
__device__ EntriesIn entries_in_of(const MoveArgs& a, const int64_t* words) {
  EntriesIn e;
  const int count = static_cast<int>(words[1] & kDirectoryCountMask);
  if (a.from_step < 0 || count == kChunkUnmoved || count == 0) return e;
  e.first = a.ledger_in + kLedgerHeaderWords + a.num_chunks + (words[1] >> kDirectoryOffsetShift);
  e.count = count;
  if constexpr (kWithDouble) {
    const int64_t* row = a.table + kTableHeaderWords + (words[0] >> kChunkTensorShift) * kTableTensorWords;
    e.width = entry_width<kWithDouble>(param_dtype_code(row[kTensorDtypes]));
  }
  return e;
}

// Starts copying a chunk's first Shared::kThreads entries to entries buffer `buffer`, one a thread.
template <typename Shared>
__device__ void stage_entries(const EntriesIn& e, Shared& sh, int buffer) {
  const int tid = threadIdx.x;
  if (tid >= e.count) return;
  for (int j = 0; j < e.width; ++j) copy_word_async(&sh.entries[buffer][tid * 2 + j], e.first + tid * e.width + j);
}

// Flags a chunk's entries by position in the bitmap its move reads, and records the rank of each word's
// first entry; each thread's staged entry has landed (its own copy, waited for). Entries past the staged
// ones are read from memory: only chunks with more than Shared::kThreads entries have them.
template <typename Shared>
__device__ void file_entries(const EntriesIn& e, Shared& sh, int buffer) {
  const int lane = threadIdx.x % 32;
  const auto position = [](int64_t word) { return static_cast<int>(word >> kEntryPositionShift); };
  if (threadIdx.x == 0) sh.entries_in[buffer] = e.first;
  // Whole warps go round together, so that an entry's predecessor comes from the lane before.
  for (int i = threadIdx.x; i - lane < e.count; i += Shared::kThreads) {
    const bool here = i < e.count;
    int pos = 0;
    if (here) {
      pos = position(i < Shared::kThreads ? sh.entries[buffer][i * 2] : e.first[i * e.width]);
      atomicOr(&sh.in_bits[buffer][pos >> 5], 1u << (pos & 31));
    }
    int before = __shfl_up_sync(0xffffffffu, pos, 1);
    if (lane == 0 && here && i > 0) before = position(e.first[(i - 1) * e.width]);
    if (here && (i == 0 || before >> 5 != pos >> 5)) sh.in_first[buffer][pos >> 5] = static_cast<uint16_t>(i);
  }
}

// The saved bits of the flagged element at `pos` of a chunk whose entries were filed in `buffer`: its entry's
// rank is the word's first plus the flags below it in the word. Rarely called, and kept out of line so that
// the move's registers do not hold what it needs.
template <typename Bits, typename Shared>
__device__ __noinline__ Bits saved_bits(const Shared& sh, int buffer, int pos) {
  constexpr int kWidth = sizeof(Bits) == 8 ? 2 : 1;
  const int rank = sh.in_first[buffer][pos >> 5] + __popc(sh.in_bits[buffer][pos >> 5] & ((1u << (pos & 31)) - 1u));
  const int64_t word = rank < Shared::kThreads ? sh.entries[buffer][rank * 2 + kWidth - 1]
                                               : sh.entries_in[buffer][rank * kWidth + kWidth - 1];
  return static_cast<Bits>(word);
}

// A tensor's direction rule and step sizes in its arithmetic type.
template <typename A>
struct StepOf {
  DirectionRule<A> rule;
  A eta_from = 0, eta_to = 0, c_from = 1, c_to = 1;
};

// kWithRules: the group has directions formed from an optimizer's state. A group of given directions
// runs an instantiation where the rule is the constant identity and costs nothing.
template <typename A, bool kWithRules>
__device__ StepOf<A> step_of(const MoveArgs& a, const ChunkView& v, float eta_from, float eta_to) {
  StepOf<A> st;
  if constexpr (kWithRules) {
    const int64_t tensor = (v.row - (a.table + kTableHeaderWords)) / kTableTensorWords;
    st.rule = DirectionRule<A>::load(v.row, a.hyper + tensor * kHyperWords);
  }
  st.eta_from = static_cast<A>(eta_from);
  st.eta_to = static_cast<A>(eta_to);
  st.c_from = st.rule.scale(st.eta_from);
  st.c_to = st.rule.scale(st.eta_to);
  return st;
}

// Calls fn(param, direction) with the chunk's pointers typed (a direction is float32 or of the
// parameter's dtype).
template <typename T, typename Fn>
__device__ __forceinline__ void with_direction_type(const ChunkView& v, Fn& fn) {
  T* param = reinterpret_cast<T*>(v.param);
  if (v.direction_code == kFloat32 || std::is_same_v<T, float>) {
    fn(param, reinterpret_cast<const float*>(v.direction));
  } else {
    fn(param, reinterpret_cast<const T*>(v.direction));
  }
}

// Chunks wider than kParamBits are compiled only into the kernels that need them, since a kernel's
// register budget is set by the widest path it contains.
template <int kParamBits, typename Fn>
__device__ __forceinline__ void with_chunk_types(const ChunkView& v, Fn&& fn) {
  switch (v.param_code) {
    case kFloat32:
      if constexpr (kParamBits >= 32) with_direction_type<float>(v, fn);
      break;
    case kBFloat16:
      with_direction_type<c10::BFloat16>(v, fn);
      break;
    case kFloat16:
      with_direction_type<c10::Half>(v, fn);
      break;
    case kFloat64:
      if constexpr (kParamBits == 64) with_direction_type<double>(v, fn);
      break;
  }
}

// A thread's values are handled a 32-bit word at a time (64 bits for float64): a word of two 16-bit
// values is rounded by one paired conversion (cvt.rn.bf16x2.f32, cvt.rn.f16x2.f32) where one value
// alone takes a conversion and a pack, and its lanes are compared, stored and widened as one word.
template <typename T, int Vec>
struct Lanes {
  using S = Storage<T>;
  using A = typename S::Arith;
  using Word = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static constexpr int kCount = sizeof(T) == 2 && Vec % 2 == 0 ? 2 : 1;

  __device__ static typename S::Bits bits(Word w, int lane) {
    if constexpr (kCount == 1) return static_cast<typename S::Bits>(w);
    return lane == 0 ? w & 0xffffu : w >> 16;
  }
  __device__ static A value(Word w, int lane) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // A bfloat16 is the high half of its float32: a shift for the low lane, a mask for the high one.
      return __uint_as_float(lane == 0 ? w << 16 : w & 0xffff0000u);
    }
    return S::to_float(S::from_bits(bits(w, lane)));
  }
  __device__ static Word with_lane(Word w, int lane, typename S::Bits b) {
    if constexpr (kCount == 1) return b;
    return lane == 0 ? (w & 0xffff0000u) | b : (w & 0xffffu) | (b << 16);
  }
  __device__ static Word round(const A (&v)[kCount]) {
    if constexpr (kCount == 2 && std::is_same_v<T, c10::BFloat16>) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(v[0], v[1]);
      return *reinterpret_cast<const uint32_t*>(&pair);
    } else if constexpr (kCount == 2) {
      const __half2 pair = __floats2half2_rn(v[0], v[1]);
      return *reinterpret_cast<const uint32_t*>(&pair);
    } else {
      return S::bits(S::from_float(v[0]));
    }
  }
};

// One step for one chunk: rebuild w0 (from the filed entries where the previous step was not
// invertible), store the next point, and file the elements whose step is not invertible. kStaged: the
// current values and directions are read from stage buffer `buffer`; the next values still go to param.
// kRebase: the chunk goes from one point to another (the previous step moved it and this one moves it
// again), the common case, compiled without the tests the others need.
// kPasses: the thread's packs are loaded and moved in that many passes (a loop not unrolled), each
// pass's loads in flight together. One pass keeps the most loads in flight; in the 16-bit kernels (two
// blocks an SM) element-strided chunks take more passes, as their unrolled code spilled at 512 threads and
// 64 registers: two passes unstaged (where groups of small tensors go, see
// launch_move_staged_if_it_pays), and one element a pass staged, where two passes cost large groups time
// and such chunks are few (benchmarks/HISTORY.md, 2026-11-24).
template <typename T, typename D, int Vec, bool kStaged, bool kRebase, int kPasses = 1, typename Shared>
__device__ void move_chunk(T* param, const D* direction, const ChunkView& v, const StepOf<typename Storage<T>::Arith>& st,
                           bool has_from, bool has_to, Shared& sh, int buffer, ThreadTotals& totals,
                           ChunkShare& share) {
  using S = Storage<T>;
  using A = typename S::Arith;
  using L = Lanes<T, Vec>;
  using Word = typename L::Word;
  constexpr bool kWhole = Vec > 1;  // the chunk has kChunkElements elements: no bounds checks
  constexpr int kPacks = Shared::kItems / Vec;
  constexpr int kPassPacks = kPacks / kPasses;
  constexpr int kLanes = L::kCount;
  constexpr int kPackWords = Vec / kLanes;
  constexpr uint32_t kPackMask = (1u << Vec) - 1u;
  static_assert(Shared::kItems % Vec == 0 && 32 % Vec == 0, "a pack lies within one bitmap word");
  static_assert(kPacks % kPasses == 0, "passes of whole packs");
  static_assert(!kWhole || sizeof(Pack<T, Vec>) == kPackWords * sizeof(Word), "a pack is whole words");
  const int len = v.len;
  const int tid = threadIdx.x;
  // w0 is the current value stepped back, except where the previous step saved it or left the chunk.
  const int count_in = static_cast<int>(v.dir_in & kDirectoryCountMask);
  const bool rebuild = kRebase || (has_from && count_in != kChunkUnmoved);
  const bool moves = kRebase || has_to;
  const bool lookup = rebuild && count_in > 0;

#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    A d[kPassPacks * Vec];
    Word current[kPassPacks * kPackWords];
#pragma unroll
    for (int q = 0; q < kPassPacks; ++q) {
      const int p = pass * kPassPacks + q;
      const int base = pack_start<Shared::kThreads, Vec>(p, tid);
      if constexpr (kWhole) {
        Pack<T, Vec> wp;
        Pack<D, Vec> gp;
        if constexpr (kStaged) {
          wp = load_staged_pack<T, Vec>(sh.stage[buffer], base);
          gp = load_staged_pack<D, Vec>(sh.stage[buffer] + kChunkElements * sizeof(T), base);
        } else {
          wp = load_pack<T, Vec>(param + base);
          gp = load_pack<D, Vec>(direction + base);
        }
        memcpy(&current[q * kPackWords], &wp, sizeof(wp));
#pragma unroll
        for (int u = 0; u < Vec; ++u) d[q * Vec + u] = st.rule.term(static_cast<A>(gp.v[u]), v.start + base + u);
      } else if (base < len) {
        current[q] = S::bits(param[base]);
        d[q] = st.rule.term(static_cast<A>(direction[base]), v.start + base);
      }
    }

#pragma unroll
    for (int q = 0; q < kPassPacks; ++q) {
      const int base = pack_start<Shared::kThreads, Vec>(pass * kPassPacks + q, tid);
      if (!kWhole && base >= len) continue;
      const int word = base >> 5;
      const uint32_t in_pack = lookup ? (sh.in_bits[buffer][word] >> (base & 31)) & kPackMask : 0u;
      uint32_t out_pack = 0, changed_pack = 0;
      bool pack_changed = false;
      // The pack's sums are their own short chains, so that a thread's packs overlap.
      double pack_dot_dir_dir = 0.0, pack_dot_dir_step = 0.0;
      Word w0[kPackWords], out[kPackWords];
#pragma unroll
      for (int j = 0; j < kPackWords; ++j) {
        const int first = j * kLanes;  // the word's first lane, counted within the pack
        const A* dj = &d[q * Vec + first];
        const Word now = current[q * kPackWords + j];
        w0[j] = now;
        if (rebuild) {
          A back[kLanes];
#pragma unroll
          for (int l = 0; l < kLanes; ++l) {
            back[l] = back_value(L::value(now, l), mul_rn(st.eta_from, dj[l]), st.c_from);
          }
          w0[j] = L::round(back);
          const uint32_t saved = (in_pack >> first) & ((1u << kLanes) - 1u);
          if (saved != 0) {
#pragma unroll
            for (int l = 0; l < kLanes; ++l) {
              if ((saved >> l) & 1u) {
                w0[j] = L::with_lane(w0[j], l, saved_bits<typename S::Bits>(sh, buffer, base + first + l));
              }
            }
          }
        }
        A w0_value[kLanes], full[kLanes];
#pragma unroll
        for (int l = 0; l < kLanes; ++l) {
          w0_value[l] = L::value(w0[j], l);
          full[l] = st.rule.full(dj[l], w0_value[l]);
          pack_dot_dir_dir = add_product(pack_dot_dir_dir, full[l], full[l]);
        }
        out[j] = w0[j];
        if (moves) {
          A s[kLanes], away[kLanes], back[kLanes], next_value[kLanes];
#pragma unroll
          for (int l = 0; l < kLanes; ++l) {
            s[l] = mul_rn(st.eta_to, dj[l]);
            away[l] = away_value(w0_value[l], s[l], st.c_to);
          }
          out[j] = L::round(away);
#pragma unroll
          for (int l = 0; l < kLanes; ++l) {
            next_value[l] = L::value(out[j], l);
            back[l] = back_value(next_value[l], s[l], st.c_to);
          }
          const Word returned = L::round(back);
          if (returned != w0[j]) {
#pragma unroll
            for (int l = 0; l < kLanes; ++l) {
              if (L::bits(returned, l) != L::bits(w0[j], l)) {
                out_pack |= 1u << (first + l);
                sh.out_value[buffer][base + first + l] = static_cast<typename Shared::Value>(L::bits(w0[j], l));
              }
            }
          }
#pragma unroll
          for (int l = 0; l < kLanes; ++l) {
            changed_pack |= static_cast<uint32_t>(L::bits(out[j], l) != L::bits(w0[j], l)) << (first + l);
            const double dw = static_cast<double>(next_value[l]) - static_cast<double>(w0_value[l]);
            pack_dot_dir_step = add_product(pack_dot_dir_step, full[l], dw);
          }
        }
        pack_changed |= out[j] != now;
      }
      share.changed += __popc(changed_pack);
      // A non-finite factor makes the pack's sum of squares non-finite, so only such packs are counted.
      if (!is_finite(pack_dot_dir_dir)) {
#pragma unroll
        for (int u = 0; u < Vec; ++u) {
          totals.nonfinite += !is_finite(st.rule.full(d[q * Vec + u], L::value(w0[u / kLanes], u % kLanes)));
        }
      }
      totals.dot_dir_dir += pack_dot_dir_dir;
      share.dot_dir_step += pack_dot_dir_step;
      if (out_pack != 0) {
        atomicOr(&sh.out_bits[buffer][word], out_pack << (base & 31));
        atomicAdd(&sh.out_quarter[buffer][base >> kQuarterShift], static_cast<uint32_t>(__popc(out_pack)));
      }
      // Unchanged packs are not written back (a restore writes only what the step changed); a pack
      // with any change is written whole, its unchanged elements with their own bits.
      if (pack_changed) {
        if constexpr (kWhole) {
          Pack<T, Vec> pack;
          memcpy(&pack, out, sizeof(pack));
          store_pack(param + base, pack);
        } else {
          param[base] = S::from_bits(static_cast<typename S::Bits>(out[0]));
        }
      }
    }
  }
  // The bitmap is cleared for the chunk after next, which files into this buffer: a word by the thread of
  // its first pack, once the word's threads (one warp) have all read it.
  if (lookup) {
    __syncwarp();
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int base = pack_start<Shared::kThreads, Vec>(p, tid);
      if (base % 32 == 0) sh.in_bits[buffer][base >> 5] = 0;
    }
  }
}

// Puts a chunk whose entries did not fit back to w0, from its stored next values and its filed
// entries. Run by the writers; rare, as it takes a full ledger.
template <typename T, typename D, typename Shared>
__device__ void put_back_chunk(T* param, const D* direction, const ChunkView& v,
                               const StepOf<typename Storage<T>::Arith>& st, const Shared& sh, int buffer) {
  using S = Storage<T>;
  using A = typename S::Arith;
  for (int i = threadIdx.x; i < v.len; i += kWriters) {
    const T next = param[i];
    const A d = st.rule.term(static_cast<A>(direction[i]), v.start + i);
    const bool saved = (sh.out_bits[buffer][i >> 5] >> (i & 31)) & 1u;
    const T w0 = saved ? S::from_bits(static_cast<typename S::Bits>(sh.out_value[buffer][i]))
                       : step_back(next, mul_rn(st.eta_to, d), st.c_to);
    if (!same_bits(w0, next)) param[i] = w0;
  }
}

// Ends a chunk moved one barrier ago, on the kWriters threads: thread 0 has reserved `count` entries
// at `offset`. Writes the chunk's directory word and entries (in increasing position), or puts the
// chunk back to w0 where they do not fit, and clears the chunk's bitmap.
template <bool kWithRules, int kParamBits, typename Shared>
__device__ void finish_chunk(const MoveArgs& a, int64_t chunk, int slot, float eta_to, uint32_t count,
                             unsigned long long offset, Shared& sh, int buffer, ThreadTotals& totals) {
  const int tid = threadIdx.x;
  const int quarter = tid / 32, lane = tid % 32;
  uint32_t before = 0;  // entries of the quarters before this thread's
  for (int q = 0; q < quarter; ++q) before += sh.out_quarter[buffer][q];
  const ChunkView v = sh.views[slot];
  const int width = entry_width<kParamBits == 64>(v.param_code);
  if (tid == 0) {
    // A chunk whose entries do not fit stays exactly at w0: a full ledger costs coverage, never bits.
    const bool moved = offset + static_cast<unsigned long long>(count) * width <= a.capacity;
    totals.saved += count;
    if (!moved) totals.unmoved += v.len;
    a.ledger_out[kLedgerHeaderWords + chunk] =
        moved ? static_cast<int64_t>(offset << kDirectoryOffsetShift) | count : kChunkUnmoved;
    sh.moved[buffer] = moved;
    sh.out_offset = offset;
  }
  sync_writers();
  if (tid == 0) {
    for (int q = 0; q < kQuarters; ++q) sh.out_quarter[buffer][q] = 0;
  }
  const uint32_t bits = sh.out_bits[buffer][tid];
  if (sh.moved[buffer]) {
    const uint32_t here = __popc(bits);
    uint32_t inclusive = here;
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const uint32_t other = __shfl_up_sync(0xffffffffu, inclusive, delta);
      if (lane >= delta) inclusive += other;
    }
    uint32_t rank = before + inclusive - here;
    int64_t* entries = a.ledger_out + kLedgerHeaderWords + a.num_chunks + sh.out_offset;
    for (uint32_t left = bits; left != 0; left &= left - 1, ++rank) {
      const int pos = tid * 32 + __ffs(left) - 1;
      const auto saved = static_cast<int64_t>(sh.out_value[buffer][pos]);
      if (width == 1) {
        entries[rank] = (static_cast<int64_t>(pos) << kEntryPositionShift) | saved;
      } else {
        entries[2 * rank] = static_cast<int64_t>(pos) << kEntryPositionShift;
        entries[2 * rank + 1] = saved;
      }
    }
  } else {
    with_chunk_types<kParamBits>(v, [&](auto* param, const auto* direction) {
      using T = std::remove_pointer_t<decltype(param)>;
      const auto st = step_of<typename Storage<T>::Arith, kWithRules>(a, v, 0.0f, eta_to);
      put_back_chunk(param, direction, v, st, sh, buffer);
    });
    sync_writers();  // every writer has read the bitmap before it is cleared
  }
  sh.out_bits[buffer][tid] = 0;
}

// The block's totals, complete in thread 0, added in a fixed order.
template <typename Count, typename Shared>
__device__ Totals block_sum(TotalsOf<Count> thread, Shared& sh) {
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  Totals totals;
  totals.dot_dir_step = warp_sum(thread.dot_dir_step);
  totals.dot_dir_dir = warp_sum(thread.dot_dir_dir);
  totals.changed = warp_sum(static_cast<unsigned long long>(thread.changed));
  totals.unmoved = warp_sum(static_cast<unsigned long long>(thread.unmoved));
  totals.nonfinite = warp_sum(static_cast<unsigned long long>(thread.nonfinite));
  totals.saved = warp_sum(static_cast<unsigned long long>(thread.saved));
  if (lane == 0) {
    sh.dot_dir_step[warp] = totals.dot_dir_step;
    sh.dot_dir_dir[warp] = totals.dot_dir_dir;
    sh.counts[0][warp] = totals.changed;
    sh.counts[1][warp] = totals.unmoved;
    sh.counts[2][warp] = totals.nonfinite;
    sh.counts[3][warp] = totals.saved;
  }
  __syncthreads();
  Totals block;
  if (tid == 0) {
    for (int w = 0; w < Shared::kWarps; ++w) {
      block.dot_dir_step += sh.dot_dir_step[w];
      block.dot_dir_dir += sh.dot_dir_dir[w];
      block.changed += sh.counts[0][w];
      block.unmoved += sh.counts[1][w];
      block.nonfinite += sh.counts[2][w];
      block.saved += sh.counts[3][w];
    }
  }
  __syncthreads();  // sh may be reused at once
  return block;
}

// Writes the block's totals to its slot; the last block to finish adds the slots in block order,
// writes the report row and zeroes the header, so the ledger is ready for its next use without a host
// round trip.
template <typename Shared>
__device__ void finish_step(const MoveArgs& a, ThreadTotals totals, Shared& sh) {
  const int tid = threadIdx.x;
  int64_t* header = a.ledger_out;
  const Totals block = block_sum(totals, sh);
  if (tid == 0) {
    int64_t* slot = a.block_totals + static_cast<int64_t>(blockIdx.x) * kTotalWords;
    slot[kTotalDotDirStep] = __double_as_longlong(block.dot_dir_step);
    slot[kTotalDotDirDir] = __double_as_longlong(block.dot_dir_dir);
    slot[kTotalChanged] = static_cast<int64_t>(block.changed);
    slot[kTotalUnmoved] = static_cast<int64_t>(block.unmoved);
    slot[kTotalNonfinite] = static_cast<int64_t>(block.nonfinite);
    slot[kTotalSaved] = static_cast<int64_t>(block.saved);
    __threadfence();
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(header + kLedgerBlocksDone), 1ull);
    sh.is_last = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!sh.is_last) return;
  __threadfence();
  Totals all;
  for (unsigned b = tid; b < gridDim.x; b += Shared::kThreads) {
    const int64_t* slot = a.block_totals + static_cast<int64_t>(b) * kTotalWords;
    all.dot_dir_step += __longlong_as_double(__ldcg(reinterpret_cast<const long long*>(slot) + kTotalDotDirStep));
    all.dot_dir_dir += __longlong_as_double(__ldcg(reinterpret_cast<const long long*>(slot) + kTotalDotDirDir));
    all.changed += static_cast<unsigned long long>(__ldcg(reinterpret_cast<const long long*>(slot) + kTotalChanged));
    all.unmoved += static_cast<unsigned long long>(__ldcg(reinterpret_cast<const long long*>(slot) + kTotalUnmoved));
    all.nonfinite += static_cast<unsigned long long>(__ldcg(reinterpret_cast<const long long*>(slot) + kTotalNonfinite));
    all.saved += static_cast<unsigned long long>(__ldcg(reinterpret_cast<const long long*>(slot) + kTotalSaved));
  }
  all = block_sum(all, sh);
  if (tid == 0) {
    if (a.report_row != nullptr) {
      a.report_row[kReportStep] = -all.dot_dir_step / all.dot_dir_dir;
      a.report_row[kReportChanged] = static_cast<double>(all.changed);
      a.report_row[kReportUnmoved] = static_cast<double>(all.unmoved);
      a.report_row[kReportSaved] = static_cast<double>(all.saved);
      a.report_row[kReportNonfinite] = static_cast<double>(all.nonfinite);
    }
    for (int f = 0; f < kLedgerHeaderWords; ++f) header[f] = 0;
  }
}

// kStage: the launch has the stage buffers (Hopper and later GPUs with room for them).
template <bool kWithRules, int kParamBits, bool kStage>
__global__ void __launch_bounds__(kThreadsOf<kParamBits, kStage>, kBlocksPerSm<kParamBits, kStage>) move_kernel(MoveArgs a) {
  using Shared = MoveShared<kParamBits, kStage>;
  constexpr bool kWithDouble = kParamBits == 64;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  auto& sh = *reinterpret_cast<Shared*>(shared_bytes);
  const int tid = threadIdx.x;
  const bool has_from = a.from_step >= 0;
  const bool has_to = a.to_step >= 0;
  const float eta_from = has_from ? a.steps[a.from_step] : 0.0f;
  const float eta_to = has_to ? a.steps[a.to_step] : 0.0f;
  // This block moves chunks first, first + stride, ...: n of them.
  const int64_t first = blockIdx.x;
  const int64_t stride = gridDim.x;
  const int64_t n = first < a.num_chunks ? (a.num_chunks - 1 - first) / stride + 1 : 0;

  for (int i = tid; i < 2 * kWords; i += Shared::kThreads) {
    sh.in_bits[i / kWords][i % kWords] = 0;
    sh.out_bits[i / kWords][i % kWords] = 0;
  }
  if (tid < 2 * kQuarters) sh.out_quarter[tid / kQuarters][tid % kQuarters] = 0;
  if (tid == 0) {
    prefetch_chunk_words(a, first, sh.chunk_words[0]);
    prefetch_chunk_words(a, first + stride, sh.chunk_words[1]);
    wait_async_copies();
  }
  init_stage_barriers(sh);
  __syncthreads();
  if (n > 0) {
    fetch_chunk_data(a, 0, sh, 0);
    const EntriesIn entries = entries_in_of<kWithDouble>(a, sh.chunk_words[0]);
    stage_entries(entries, sh, 0);
    wait_async_copies();
    file_entries(entries, sh, 0);
  }
  __syncthreads();

  ThreadTotals totals;
  ChunkShare younger, older;  // this thread's part of the steps of the chunks one and two before
  for (int64_t k = 0; k <= n; ++k) {
    const int buffer = k & 1, other = buffer ^ 1;
    // Chunk k - 2's fate was settled at the end of the last round.
    if (has_to && k >= 2 && sh.moved[buffer]) {
      totals.dot_dir_step += older.dot_dir_step;
      totals.changed += older.changed;
    }
    older = younger;
    younger = ChunkShare{};
    // Thread 0 reserves chunk k - 1's entries; the atomic's round trip overlaps chunk k's move.
    uint32_t count = 0;
    unsigned long long offset = 0;
    if (has_to && k >= 1 && tid == 0) {
      for (int q = 0; q < kQuarters; ++q) count += sh.out_quarter[other][q];
      if (count > 0) {
        const int width =
            kWithDouble ? entry_width<kWithDouble>(sh.views[(k - 1) % kWordRing].param_code) : 1;
        offset = atomicAdd(reinterpret_cast<unsigned long long*>(a.ledger_out + kLedgerDemand),
                           static_cast<unsigned long long>(count) * width);
      }
    }
    if (tid == 0 && k + 2 < n) prefetch_chunk_words(a, first + (k + 2) * stride, sh.chunk_words[(k + 2) % kWordRing]);
    EntriesIn next_entries;
    if (k + 1 < n) {
      fetch_chunk_data(a, (k + 1) % kWordRing, sh, other);
      next_entries = entries_in_of<kWithDouble>(a, sh.chunk_words[(k + 1) % kWordRing]);
      stage_entries(next_entries, sh, other);
    }
    if (k < n) {
      const ChunkView v = sh.views[k % kWordRing];
      wait_chunk_data(sh, k);
      with_chunk_types<kParamBits>(v, [&](auto* param, const auto* direction) {
        using T = std::remove_pointer_t<decltype(param)>;
        using D = std::remove_cv_t<std::remove_pointer_t<decltype(direction)>>;
        constexpr int kVec = 16 / sizeof(T);
        const auto st = step_of<typename Storage<T>::Arith, kWithRules>(a, v, eta_from, eta_to);
        constexpr bool kCanStage = kStage && (sizeof(T) + sizeof(D)) * kChunkElements <= Shared::kStageBytes;
        const bool rebase = has_from && has_to && (v.dir_in & kDirectoryCountMask) != kChunkUnmoved;
        // The rebase case gets its own code on the launch's main path alone (staged chunks in a staged launch,
        // aligned whole ones otherwise), for given directions up to 32 bits: a copy on every path, or in the
        // kernels with direction rules or float64, spilled registers.
        const auto move_packs = [&](auto staged) {
          constexpr bool kStagedPath = decltype(staged)::value;
          if constexpr (kStagedPath == kStage && !kWithRules && kParamBits != 64) {
            if (rebase) {
              move_chunk<T, D, kVec, kStagedPath, true>(param, direction, v, st, has_from, has_to, sh, buffer, totals,
                                                        younger);
              return;
            }
          }
          move_chunk<T, D, kVec, kStagedPath, false>(param, direction, v, st, has_from, has_to, sh, buffer, totals,
                                                     younger);
        };
        if (kCanStage && v.staged) {
          if constexpr (kCanStage) move_packs(std::true_type{});
        } else if (v.packed) {
          move_packs(std::false_type{});
        } else {
          constexpr int kPasses = kBlocksPerSm<kParamBits, kStage> == 1 ? 1 : kStage ? Shared::kItems : 2;
          move_chunk<T, D, 1, false, false, kPasses>(param, direction, v, st, has_from, has_to, sh, buffer, totals,
                                                     younger);
        }
      });
    }
    if (k + 1 < n) {
      wait_async_copies();
      file_entries(next_entries, sh, other);
    }
    if (has_to && k >= 1 && tid < kWriters) {
      finish_chunk<kWithRules, kParamBits>(a, first + (k - 1) * stride, (k - 1) % kWordRing, eta_to, count, offset,
                                            sh, other, totals);
    }
    if (tid == 0) wait_async_copies();
    __syncthreads();
  }
  if (has_to && n >= 1 && sh.moved[(n - 1) & 1]) {
    totals.dot_dir_step += older.dot_dir_step;
    totals.changed += older.changed;
  }
  finish_step(a, totals, sh);
}

}  // namespace
}  // namespace adapeft
