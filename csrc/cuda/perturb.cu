// CUDA kernel of adapeft::perturb_: one launch per step for the whole group, whatever its number
// of tensors or mix of dtypes. A persistent grid walks the group's chunks (described by the table
// built once by pack_group); step sizes are read from device memory and nothing waits for the host,
// so a captured CUDA graph replays the same launches for new step values.
//
// Determinism: every block writes its totals to its own slot and the last block to finish adds the
// slots in block order, so the report (the realized step above all) is the same bits on every run and
// on every rank of a data-parallel job; floating-point atomics would add in arrival order.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "group_table.h"
#include "step_math.h"

namespace adapeft {
namespace {

constexpr int kThreads = 512;
constexpr int kItems = static_cast<int>(kChunkElements) / kThreads;
constexpr int kWords = static_cast<int>(kChunkElements) / 32;
constexpr int kWarps = kThreads / 32;
static_assert(kWords == 4 * 32, "the bitmap scan gives each lane of one warp four words");
enum TotalWord { kTotalDotDirStep, kTotalDotDirDir, kTotalChanged, kTotalUnmoved, kTotalNonfinite, kTotalSaved,
                 kTotalWords };

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

// A thread's counts stay below the number of elements its block sees, so 32 bits hold them (and
// keep registers free); a block's and the grid's are 64 bits.
template <typename Count>
struct TotalsOf {
  double dot_dir_step = 0.0;
  double dot_dir_dir = 0.0;
  Count changed = 0;
  Count unmoved = 0;
  Count nonfinite = 0;
  Count saved = 0;
};
using ThreadTotals = TotalsOf<uint32_t>;
using Totals = TotalsOf<unsigned long long>;

struct MoveShared {
  // One bit per element of the chunk: in = has a ledger entry to read, out = needs one written.
  uint32_t in_bits[kWords];
  uint32_t in_prefix[kWords];
  uint32_t out_bits[kWords];
  uint32_t out_prefix[kWords];
  int moved;
  unsigned long long out_offset;
  double dot_dir_step[kWarps];
  double dot_dir_dir[kWarps];
  unsigned long long counts[4][kWarps];
  int is_last;
  int64_t chunk_words[2][2];  // ChunkWords of this chunk and the next, alternating
};

// Where one chunk lives, decoded from the group table. `dir_in` is the chunk's ledger directory word.
struct ChunkView {
  const int64_t* row;
  char* param;
  const char* direction;
  int64_t start;
  int len;
  int64_t param_code;
  int64_t direction_code;
  int64_t dir_in;
};

// The two words a chunk's view starts from: the chunk's table word and its ledger directory word.
struct ChunkWords {
  int64_t table_word = 0;
  int64_t dir_in = 0;
};

__device__ __forceinline__ const int64_t* table_word_of(const MoveArgs& a, int64_t chunk) {
  return a.table + kTableHeaderWords + a.num_tensors * kTableTensorWords + chunk;
}

// The next chunk's words are copied to shared memory while the current chunk is moved: asynchronous
// copies hold no register (a register prefetch was spilled at once, stalling on its own load).
__device__ __forceinline__ void copy_word_async(int64_t* shared_word, const int64_t* global_word) {
  const auto to = static_cast<unsigned>(__cvta_generic_to_shared(shared_word));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(to), "l"(global_word) : "memory");
}

__device__ __forceinline__ void wait_async_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ void prefetch_chunk_words(const MoveArgs& a, int64_t chunk, int64_t* shared_words) {
  if (chunk >= a.num_chunks) return;
  copy_word_async(shared_words, table_word_of(a, chunk));
  if (a.from_step >= 0) copy_word_async(shared_words + 1, a.ledger_in + kLedgerHeaderWords + chunk);
}

__device__ ChunkView view_chunk(const MoveArgs& a, const ChunkWords& words) {
  const int64_t* rows = a.table + kTableHeaderWords;
  ChunkView v;
  v.row = rows + (words.table_word >> kChunkTensorShift) * kTableTensorWords;
  v.start = (words.table_word & kChunkIndexMask) << kChunkShift;
  v.len = static_cast<int>(min(kChunkElements, v.row[kTensorNumel] - v.start));
  const int64_t codes = v.row[kTensorDtypes];
  v.param_code = param_dtype_code(codes);
  v.direction_code = direction_dtype_code(codes);
  v.param = reinterpret_cast<char*>(v.row[kTensorParamPtr]) + v.start * dtype_bytes(v.param_code);
  v.direction = reinterpret_cast<const char*>(v.row[kTensorDirectionPtr]) + v.start * dtype_bytes(v.direction_code);
  v.dir_in = words.dir_in;
  return v;
}

// Exclusive prefix of the set bits before each word (so an element's entry index is its rank among
// the flagged positions of its chunk); run by warp 0. Returns the total to every lane.
__device__ uint32_t scan_bitmap(const uint32_t* bits, uint32_t* prefix) {
  const int lane = threadIdx.x;
  uint32_t c[4];
  uint32_t sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    c[j] = __popc(bits[4 * lane + j]);
    sum += c[j];
  }
  uint32_t inclusive = sum;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const uint32_t other = __shfl_up_sync(0xffffffffu, inclusive, delta);
    if (lane >= delta) inclusive += other;
  }
  uint32_t running = inclusive - sum;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    prefix[4 * lane + j] = running;
    running += c[j];
  }
  return __shfl_sync(0xffffffffu, inclusive, 31);
}

__device__ __forceinline__ uint32_t rank_of(const uint32_t* bits, const uint32_t* prefix, int i) {
  const uint32_t word = bits[i >> 5];
  return prefix[i >> 5] + __popc(word & ((1u << (i & 31)) - 1u));
}

// Vec elements of X moved by one load or store instruction (two for 32-byte packs).
template <typename X, int Vec>
struct alignas(sizeof(X) * Vec) Pack {
  X v[Vec];
};

// How a thread's kItems elements sit in its chunk: in packs of Vec consecutive elements, the packs
// of a warp adjacent, so every load and store is coalesced. Vec = 1 is the element-strided layout
// any chunk can use; wider packs need a whole chunk with aligned pointers.
template <int Vec>
__device__ __forceinline__ int pack_start(int pack, int tid) {
  return pack * (kThreads * Vec) + tid * Vec;
}

// A pack read from global memory with 16- or 8-byte loads (a plain dereference of the reinterpreted
// pointer compiles to generic loads).
template <typename X, int Vec>
__device__ __forceinline__ Pack<X, Vec> load_pack(const X* p) {
  using Word = std::conditional_t<sizeof(Pack<X, Vec>) % sizeof(uint4) == 0, uint4, uint2>;
  static_assert(sizeof(Pack<X, Vec>) % sizeof(Word) == 0, "packs are whole 8-byte words");
  constexpr int kLoads = sizeof(Pack<X, Vec>) / sizeof(Word);
  Word words[kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) words[j] = __ldcg(reinterpret_cast<const Word*>(p) + j);
  Pack<X, Vec> pack;
  memcpy(&pack, words, sizeof(pack));
  return pack;
}

template <typename X, int Vec>
__device__ __forceinline__ bool pack_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<X, Vec>) == 0;
}

// One step for one chunk: rebuild w0 (from the ledger where the previous step was not invertible),
// write the next point and record the elements whose step is not invertible.
template <typename T, typename D, int Vec>
__device__ void move_chunk(T* param, const D* direction, const ChunkView& v, int64_t chunk,
                           const DirectionRule<typename Storage<T>::Arith>& rule, const MoveArgs& a,
                           float eta_from_f, float eta_to_f, MoveShared& sh, ThreadTotals& totals) {
  using S = Storage<T>;
  using A = typename S::Arith;
  constexpr int width = S::entry_words;
  constexpr bool kWhole = Vec > 1;  // the chunk has kChunkElements elements: no bounds checks
  constexpr int kPacks = kItems / Vec;
  static_assert(kItems % Vec == 0 && 32 % Vec == 0, "a pack lies within one bitmap word");
  const int len = v.len;
  const A eta_from = static_cast<A>(eta_from_f);
  const A eta_to = static_cast<A>(eta_to_f);
  const A c_from = rule.scale(eta_from);
  const A c_to = rule.scale(eta_to);
  const int tid = threadIdx.x;
  const bool has_from = a.from_step >= 0;
  const bool has_to = a.to_step >= 0;

  // The loads go first: they are in flight while the ledger is read and the bitmaps are built.
  // Registers hold only the direction and w0 of each element (the current value is read into w0 and
  // rebuilt in place; the next value is recomputed where needed).
  A d[kItems];
  T w0[kItems];
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int base = pack_start<Vec>(p, tid);
    if constexpr (kWhole) {
      const auto w = load_pack<T, Vec>(param + base);
      const auto g = load_pack<D, Vec>(direction + base);
#pragma unroll
      for (int u = 0; u < Vec; ++u) {
        w0[p * Vec + u] = w.v[u];
        d[p * Vec + u] = rule.term(static_cast<A>(g.v[u]), v.start + base + u);
      }
    } else if (base < len) {
      w0[p] = param[base];
      d[p] = rule.term(static_cast<A>(direction[base]), v.start + base);
    }
  }

  const int count_in = static_cast<int>(v.dir_in & kDirectoryCountMask);
  const bool unmoved_in = has_from && count_in == kChunkUnmoved;
  const bool lookup = has_from && !unmoved_in && count_in > 0;
  const int64_t* entries_in = a.ledger_in + kLedgerHeaderWords + a.num_chunks + (v.dir_in >> kDirectoryOffsetShift);
  for (int w = tid; w < kWords; w += kThreads) {
    sh.in_bits[w] = 0;
    sh.out_bits[w] = 0;
  }
  __syncthreads();
  if (lookup) {
    for (int e = tid; e < count_in; e += kThreads) {
      const int pos = static_cast<int>(entries_in[e * width] >> kEntryPositionShift);
      atomicOr(&sh.in_bits[pos >> 5], 1u << (pos & 31));
    }
    __syncthreads();
    if (tid < 32) scan_bitmap(sh.in_bits, sh.in_prefix);
    __syncthreads();
  }

  uint32_t flagged = 0;    // the step of element k is not invertible
  uint32_t same_base = 0;  // w0 of element k equals its current value
  uint32_t same_next = 0;  // its next value equals its current value
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int base = pack_start<Vec>(p, tid);
    if (!kWhole && base >= len) continue;
    const uint32_t in_pack = lookup ? sh.in_bits[base >> 5] >> (base & 31) : 0u;
    uint32_t out_pack = 0;
#pragma unroll
    for (int u = 0; u < Vec; ++u) {
      const int k = p * Vec + u;
      const T current = w0[k];
      if (has_from && !unmoved_in) {
        if ((in_pack >> u) & 1u) {
          const uint32_t rank = rank_of(sh.in_bits, sh.in_prefix, base + u);
          w0[k] = S::from_bits(static_cast<typename S::Bits>(entries_in[rank * width + width - 1]));
        } else {
          w0[k] = step_back(current, mul_rn(eta_from, d[k]), c_from);
        }
      }
      same_base |= static_cast<uint32_t>(S::bits(w0[k]) == S::bits(current)) << k;
      if (has_to) {
        const A s = mul_rn(eta_to, d[k]);
        const T next = step_away(w0[k], s, c_to);
        same_next |= static_cast<uint32_t>(S::bits(next) == S::bits(current)) << k;
        if (S::bits(step_back(next, s, c_to)) != S::bits(w0[k])) out_pack |= 1u << u;
      }
    }
    if (out_pack != 0) {
      flagged |= out_pack << (p * Vec);
      atomicOr(&sh.out_bits[base >> 5], out_pack << (base & 31));
    }
  }

  // Chunks where every step inverts (all of a restore, many chunks at small steps) skip the ledger
  // bookkeeping. Otherwise thread 0 reserves the chunk's entries; the reservation's round trip to
  // memory overlaps the sums below, which do not depend on it.
  const bool any_flagged = has_to && __syncthreads_or(flagged != 0);
  uint32_t count_out = 0;
  unsigned long long offset = 0;
  if (any_flagged && tid < 32) {
    count_out = scan_bitmap(sh.out_bits, sh.out_prefix);
    if (tid == 0) {
      offset = atomicAdd(reinterpret_cast<unsigned long long*>(a.ledger_out + kLedgerDemand), count_out * width);
    }
  }
  double chunk_dot_dir_step = 0.0;  // added to the totals only if the chunk moves
  uint32_t chunk_changed = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int i = pack_start<Vec>(k / Vec, tid) + k % Vec;
    if (!kWhole && i >= len) continue;
    const A full = rule.full(d[k], S::to_float(w0[k]));
    totals.dot_dir_dir += static_cast<double>(full) * static_cast<double>(full);
    totals.nonfinite += !is_finite(full);
    if (has_to) {
      const T next = step_away(w0[k], mul_rn(eta_to, d[k]), c_to);
      chunk_changed += S::bits(next) != S::bits(w0[k]);
      const double dw = static_cast<double>(S::to_float(next)) - static_cast<double>(S::to_float(w0[k]));
      chunk_dot_dir_step += static_cast<double>(full) * dw;
    }
  }
  if (has_to && tid == 0) {
    // A chunk whose entries do not fit stays exactly at w0: a full ledger costs coverage, never bits.
    const int moved = offset + count_out * width <= a.capacity;
    totals.saved += count_out;
    a.ledger_out[kLedgerHeaderWords + chunk] =
        moved ? static_cast<int64_t>(offset << kDirectoryOffsetShift) | count_out : kChunkUnmoved;
    sh.moved = moved;
    sh.out_offset = offset;
  }
  if (has_to) __syncthreads();
  const bool moved = has_to && sh.moved;
  if (moved) {
    totals.dot_dir_step += chunk_dot_dir_step;
    totals.changed += chunk_changed;
  } else if (has_to && tid == 0) {
    totals.unmoved += len;
  }

  const uint32_t same = moved ? same_next : same_base;
  int64_t* entries_out = a.ledger_out + kLedgerHeaderWords + a.num_chunks + sh.out_offset;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int base = pack_start<Vec>(p, tid);
    if (!kWhole && base >= len) continue;
    Pack<T, Vec> out;
#pragma unroll
    for (int u = 0; u < Vec; ++u) {
      const int k = p * Vec + u;
      out.v[u] = moved ? step_away(w0[k], mul_rn(eta_to, d[k]), c_to) : w0[k];
      if (moved && ((flagged >> k) & 1u)) {
        const uint32_t rank = rank_of(sh.out_bits, sh.out_prefix, base + u);
        const auto bits = static_cast<int64_t>(S::bits(w0[k]));
        if (width == 1) {
          entries_out[rank] = (static_cast<int64_t>(base + u) << kEntryPositionShift) | bits;
        } else {
          entries_out[rank * width] = static_cast<int64_t>(base + u) << kEntryPositionShift;
          entries_out[rank * width + 1] = bits;
        }
      }
    }
    // Unchanged elements are not written back (a restore writes only what the step changed); a pack
    // with any change is written whole, its unchanged elements with their own bits.
    constexpr uint32_t kPackMask = (1u << Vec) - 1u;
    if (((same >> (p * Vec)) & kPackMask) != kPackMask) *reinterpret_cast<Pack<T, Vec>*>(param + base) = out;
  }
}

// kWithRules: the group has directions formed from an optimizer's state. A group of given directions
// runs an instantiation where the rule is the constant identity and costs nothing.
template <typename T, bool kWithRules>
__device__ void move_chunk_of(const ChunkView& v, int64_t chunk, const MoveArgs& a, float eta_from, float eta_to,
                              MoveShared& sh, ThreadTotals& totals) {
  DirectionRule<typename Storage<T>::Arith> rule;
  if constexpr (kWithRules) {
    const int64_t tensor = (v.row - (a.table + kTableHeaderWords)) / kTableTensorWords;
    rule = DirectionRule<typename Storage<T>::Arith>::load(v.row, a.hyper + tensor * kHyperWords);
  }
  constexpr int kVec = 16 / sizeof(T);
  T* param = reinterpret_cast<T*>(v.param);
  const bool whole = v.len == kChunkElements && pack_aligned<T, kVec>(param);
  if (v.direction_code == kFloat32) {
    const float* direction = reinterpret_cast<const float*>(v.direction);
    if (whole && pack_aligned<float, kVec>(direction)) {
      move_chunk<T, float, kVec>(param, direction, v, chunk, rule, a, eta_from, eta_to, sh, totals);
    } else {
      move_chunk<T, float, 1>(param, direction, v, chunk, rule, a, eta_from, eta_to, sh, totals);
    }
  } else {
    const T* direction = reinterpret_cast<const T*>(v.direction);
    if (whole && pack_aligned<T, kVec>(direction)) {
      move_chunk<T, T, kVec>(param, direction, v, chunk, rule, a, eta_from, eta_to, sh, totals);
    } else {
      move_chunk<T, T, 1>(param, direction, v, chunk, rule, a, eta_from, eta_to, sh, totals);
    }
  }
}

template <typename V>
__device__ V warp_sum(V v) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  return v;
}

// The block's totals, complete in thread 0, added in a fixed order.
template <typename Count>
__device__ Totals block_sum(TotalsOf<Count> thread, MoveShared& sh) {
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
    for (int w = 0; w < kWarps; ++w) {
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
__device__ void finish_step(const MoveArgs& a, ThreadTotals totals, MoveShared& sh) {
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
  for (unsigned b = tid; b < gridDim.x; b += kThreads) {
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

// Instantiated per need, since the register budget is set by the widest path a kernel contains:
// kWithRules for optimizer directions, kWithDouble for float64 tensors.
template <bool kWithRules, bool kWithDouble>
__global__ void __launch_bounds__(kThreads, 1) move_kernel(MoveArgs a) {
  __shared__ MoveShared sh;
  ThreadTotals totals;
  const float eta_from = a.from_step >= 0 ? a.steps[a.from_step] : 0.0f;
  const float eta_to = a.to_step >= 0 ? a.steps[a.to_step] : 0.0f;
  if (threadIdx.x == 0) {
    prefetch_chunk_words(a, blockIdx.x, sh.chunk_words[0]);
    wait_async_copies();
  }
  __syncthreads();
  for (int64_t chunk = blockIdx.x, slot = 0; chunk < a.num_chunks; chunk += gridDim.x, slot ^= 1) {
    const ChunkWords words{sh.chunk_words[slot][0], a.from_step >= 0 ? sh.chunk_words[slot][1] : 0};
    if (threadIdx.x == 0) prefetch_chunk_words(a, chunk + gridDim.x, sh.chunk_words[slot ^ 1]);
    const ChunkView v = view_chunk(a, words);
    switch (v.param_code) {
      case kFloat32:
        move_chunk_of<float, kWithRules>(v, chunk, a, eta_from, eta_to, sh, totals);
        break;
      case kBFloat16:
        move_chunk_of<c10::BFloat16, kWithRules>(v, chunk, a, eta_from, eta_to, sh, totals);
        break;
      case kFloat16:
        move_chunk_of<c10::Half, kWithRules>(v, chunk, a, eta_from, eta_to, sh, totals);
        break;
      case kFloat64:
        if constexpr (kWithDouble) {
          move_chunk_of<double, kWithRules>(v, chunk, a, eta_from, eta_to, sh, totals);
        }
        break;
    }
    // The next chunk reuses the shared bitmaps and reads the words copied for it.
    if (threadIdx.x == 0) wait_async_copies();
    __syncthreads();
  }
  finish_step(a, totals, sh);
}

// How many blocks of an instantiation fit on `device` at once.
template <bool kWithRules, bool kWithDouble>
int64_t resident_blocks(int device) {
  static int64_t cached[64] = {0};
  if (device < 64 && cached[device] > 0) return cached[device];
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, move_kernel<kWithRules, kWithDouble>, kThreads,
                                                               0));
  const int64_t blocks = static_cast<int64_t>(std::max(1, per_sm)) *
                         at::cuda::getDeviceProperties(device)->multiProcessorCount;
  if (device < 64) cached[device] = blocks;
  return blocks;
}

template <bool kWithRules, bool kWithDouble>
void launch_move(MoveArgs a, int device) {
  const int64_t blocks = std::max<int64_t>(1, std::min(a.num_chunks, resident_blocks<kWithRules, kWithDouble>(device)));
  const at::Tensor block_totals =
      at::empty({blocks * kTotalWords}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device));
  a.block_totals = block_totals.data_ptr<int64_t>();
  move_kernel<kWithRules, kWithDouble>
      <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const bool with_double =
      std::any_of(params.begin(), params.end(), [](const at::Tensor& p) { return p.scalar_type() == at::kDouble; });
  if (call.hyper != nullptr) {
    with_double ? launch_move<true, true>(a, device) : launch_move<true, false>(a, device);
  } else {
    with_double ? launch_move<false, true>(a, device) : launch_move<false, false>(a, device);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(adapeft, CUDA, m) { m.impl("perturb_", &perturb_cuda); }

}  // namespace adapeft
