// Device helpers of the move kernel that speak PTX or move bytes in packs: shared-memory addresses, asynchronous
// word copies, vectorized global loads and stores, fused float64 products, warp sums. Included by move_chunk.cuh only.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace adapeft {
namespace {

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Asynchronous copies hold no register while in flight (a register prefetch was spilled at once,
// stalling on its own load).
__device__ __forceinline__ void copy_word_async(int64_t* shared_word, const int64_t* global_word) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(shared_word)), "l"(global_word)
               : "memory");
}

__device__ __forceinline__ void wait_async_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Vec elements of X moved by one load or store instruction (two for 32-byte packs).
template <typename X, int Vec>
struct alignas(sizeof(X) * Vec) Pack {
  X v[Vec];
};

// How a thread's kItems elements sit in its chunk: in packs of Vec consecutive elements, the packs
// of a warp adjacent, so every load and store is coalesced. Vec = 1 is the element-strided layout
// any chunk can use; wider packs need a whole chunk with aligned pointers.
template <int kThreads, int Vec>
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

// The pack at element `at` of a staged array (the stage buffers are aligned for every pack).
template <typename X, int Vec>
__device__ __forceinline__ Pack<X, Vec> load_staged_pack(const unsigned char* bytes, int at) {
  return *reinterpret_cast<const Pack<X, Vec>*>(reinterpret_cast<const X*>(bytes) + at);
}

// A pack written with one 16-byte store where it is one (a plain assignment compiles to a generic store).
template <typename X, int Vec>
__device__ __forceinline__ void store_pack(X* p, const Pack<X, Vec>& pack) {
  if constexpr (sizeof(Pack<X, Vec>) == sizeof(uint4)) {
    uint4 word;
    memcpy(&word, &pack, sizeof(word));
    __stcg(reinterpret_cast<uint4*>(p), word);
  } else {
    *reinterpret_cast<Pack<X, Vec>*>(p) = pack;
  }
}

// acc + a * b in one rounding: float64 sums are exempt from -fmad=false, which exists for the step
// arithmetic, and the fused form halves their instructions.
__device__ __forceinline__ double add_product(double acc, double a, double b) { return __fma_rn(a, b, acc); }
template <typename V>
__device__ V warp_sum(V v) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  return v;
}

}  // namespace
}  // namespace adapeft
