// The arithmetic of one perturbation step, shared by the CPU and CUDA kernels so that both
// produce the same bits. Every operation is a single IEEE operation (float32, or float64 for float64
// storage) with round-to-nearest-even, never contracted into a fused multiply-add: the invertibility test below is only exact if
// the restore repeats precisely the rounding of the perturbation.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "layout.h"

namespace adapeft {

C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

template <typename T>
struct Storage;

// Per storage dtype: its code, the type its arithmetic runs in (float32 for every dtype of 32 bits
// or fewer, float64 for float64), its raw bits, and how many ledger words an entry takes.
template <>
struct Storage<float> {
  using Arith = float;
  using Bits = uint32_t;
  static constexpr int entry_words = 1;
  static constexpr int64_t code = kFloat32;
  C10_HOST_DEVICE static float to_float(float v) { return v; }
  C10_HOST_DEVICE static float from_float(float v) { return v; }
  C10_HOST_DEVICE static uint32_t bits(float v) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(v);
#else
    uint32_t out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
#endif
  }
  C10_HOST_DEVICE static float from_bits(uint32_t b) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(b);
#else
    float out;
    std::memcpy(&out, &b, sizeof(out));
    return out;
#endif
  }
};

template <>
struct Storage<c10::BFloat16> {
  using Arith = float;
  using Bits = uint32_t;
  static constexpr int entry_words = 1;
  static constexpr int64_t code = kBFloat16;
  C10_HOST_DEVICE static float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
  C10_HOST_DEVICE static c10::BFloat16 from_float(float v) { return c10::BFloat16(v); }
  C10_HOST_DEVICE static uint32_t bits(c10::BFloat16 v) { return v.x; }
  C10_HOST_DEVICE static c10::BFloat16 from_bits(uint32_t b) {
    return c10::BFloat16(static_cast<uint16_t>(b), c10::BFloat16::from_bits());
  }
};

template <>
struct Storage<c10::Half> {
  using Arith = float;
  using Bits = uint32_t;
  static constexpr int entry_words = 1;
  static constexpr int64_t code = kFloat16;
  C10_HOST_DEVICE static float to_float(c10::Half v) { return static_cast<float>(v); }
  C10_HOST_DEVICE static c10::Half from_float(float v) { return c10::Half(v); }
  C10_HOST_DEVICE static uint32_t bits(c10::Half v) { return v.x; }
  C10_HOST_DEVICE static c10::Half from_bits(uint32_t b) {
    return c10::Half(static_cast<uint16_t>(b), c10::Half::from_bits());
  }
};

template <>
struct Storage<double> {
  using Arith = double;
  using Bits = uint64_t;
  static constexpr int entry_words = 2;
  static constexpr int64_t code = kFloat64;
  C10_HOST_DEVICE static double to_float(double v) { return v; }
  C10_HOST_DEVICE static double from_float(double v) { return v; }
  C10_HOST_DEVICE static uint64_t bits(double v) {
#ifdef __CUDA_ARCH__
    return static_cast<uint64_t>(__double_as_longlong(v));
#else
    uint64_t out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
#endif
  }
  C10_HOST_DEVICE static double from_bits(uint64_t b) {
#ifdef __CUDA_ARCH__
    return __longlong_as_double(static_cast<long long>(b));
#else
    double out;
    std::memcpy(&out, &b, sizeof(out));
    return out;
#endif
  }
};

// w0 moved by a step s (= eta * d, rounded once in the arithmetic type): round_T(w0 - s).
template <typename T>
C10_HOST_DEVICE inline T step_away(T w0, typename Storage<T>::Arith s) {
  return Storage<T>::from_float(sub_rn(Storage<T>::to_float(w0), s));
}

// The inverse attempt: round_T(w + s). Equal to w0 for most elements, but not where w0 - s landed
// on a coarser grid (it crossed a power of two), on ties, or where |w0| is small next to |s|.
template <typename T>
C10_HOST_DEVICE inline T step_back(T w, typename Storage<T>::Arith s) {
  return Storage<T>::from_float(add_rn(Storage<T>::to_float(w), s));
}

// Exponent bits all ones means inf or nan; written on the bits so fast-math cannot fold it away.
C10_HOST_DEVICE inline bool is_finite(float v) {
  return (Storage<float>::bits(v) & 0x7f800000u) != 0x7f800000u;
}

C10_HOST_DEVICE inline bool is_finite(double v) {
  return (Storage<double>::bits(v) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

C10_HOST_DEVICE inline int64_t dtype_bytes(int64_t code) {
  return code == kFloat32 ? 4 : code == kFloat64 ? 8 : 2;
}

// Decode one tensor's dtype word of the group table.
C10_HOST_DEVICE inline int64_t param_dtype_code(int64_t word) { return word & 0xff; }
C10_HOST_DEVICE inline int64_t direction_dtype_code(int64_t word) { return (word >> 8) & 0xff; }

}  // namespace adapeft
