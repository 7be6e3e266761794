// The arithmetic of one perturbation step, shared by the CPU and CUDA kernels so that both
// produce the same bits. Every operation is a single IEEE operation (float32, or float64 for float64
// storage) with round-to-nearest-even, never contracted into a fused multiply-add: the invertibility test below is only exact if
// the restore repeats precisely the rounding of the perturbation.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layout.h"

namespace adapeft {

// Each operation rounded once: on the device the intrinsic, which nvcc never fuses with a neighbour; on the host the
// operator (the CPU build does not contract either).
#ifdef __CUDA_ARCH__
#define ADAPEFT_ROUNDED(device_form, host_form) return device_form;
#else
#define ADAPEFT_ROUNDED(device_form, host_form) return host_form;
#endif

C10_HOST_DEVICE inline float mul_rn(float a, float b) { ADAPEFT_ROUNDED(__fmul_rn(a, b), a * b) }
C10_HOST_DEVICE inline float add_rn(float a, float b) { ADAPEFT_ROUNDED(__fadd_rn(a, b), a + b) }
C10_HOST_DEVICE inline float sub_rn(float a, float b) { ADAPEFT_ROUNDED(__fsub_rn(a, b), a - b) }
C10_HOST_DEVICE inline float div_rn(float a, float b) { ADAPEFT_ROUNDED(__fdiv_rn(a, b), a / b) }
C10_HOST_DEVICE inline float sqrt_rn(float a) { ADAPEFT_ROUNDED(__fsqrt_rn(a), std::sqrt(a)) }
C10_HOST_DEVICE inline double div_rn(double a, double b) { ADAPEFT_ROUNDED(__ddiv_rn(a, b), a / b) }
C10_HOST_DEVICE inline double sqrt_rn(double a) { ADAPEFT_ROUNDED(__dsqrt_rn(a), std::sqrt(a)) }
C10_HOST_DEVICE inline double mul_rn(double a, double b) { ADAPEFT_ROUNDED(__dmul_rn(a, b), a * b) }
C10_HOST_DEVICE inline double add_rn(double a, double b) { ADAPEFT_ROUNDED(__dadd_rn(a, b), a + b) }
C10_HOST_DEVICE inline double sub_rn(double a, double b) { ADAPEFT_ROUNDED(__dsub_rn(a, b), a - b) }

#undef ADAPEFT_ROUNDED

// What a move adds up for its report (adapeft.REPORT_FIELDS): d.dw and d.d in float64, and counts of elements in
// `Count`, as wide as the elements they count may be many.
template <typename Count>
struct TotalsOf {
  double dot_dir_step = 0.0;
  double dot_dir_dir = 0.0;
  Count changed = 0;
  Count unmoved = 0;
  Count nonfinite = 0;
  Count saved = 0;
};

template <typename T>
struct Storage;

// Per storage dtype: its code, the type its arithmetic runs in (float32 for every dtype of 32 bits
// or fewer, float64 for float64), its raw bits, and how many ledger words an entry takes.
// float32 and float64: their own arithmetic; a float64 entry takes two ledger words.
template <typename T, typename B, int64_t kCode>
struct NativeStorage {
  using Arith = T;
  using Bits = B;
  static constexpr int entry_words = sizeof(T) / 4;
  static constexpr int64_t code = kCode;
  C10_HOST_DEVICE static T to_float(T v) { return v; }
  C10_HOST_DEVICE static T from_float(T v) { return v; }
  C10_HOST_DEVICE static B bits(T v) {
#ifdef __CUDA_ARCH__
    if constexpr (sizeof(T) == 4) {
      return __float_as_uint(v);
    } else {
      return static_cast<uint64_t>(__double_as_longlong(v));
    }
#else
    B out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
#endif
  }
  C10_HOST_DEVICE static T from_bits(B b) {
#ifdef __CUDA_ARCH__
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(b);
    } else {
      return __longlong_as_double(static_cast<long long>(b));
    }
#else
    T out;
    std::memcpy(&out, &b, sizeof(out));
    return out;
#endif
  }
};

template <>
struct Storage<float> : NativeStorage<float, uint32_t, kFloat32> {};

template <>
struct Storage<double> : NativeStorage<double, uint64_t, kFloat64> {};

// bfloat16 and float16: float32 arithmetic, their 16 bits widened to a 32-bit word.
template <typename T, int64_t kCode>
struct SixteenBitStorage {
  using Arith = float;
  using Bits = uint32_t;
  static constexpr int entry_words = 1;
  static constexpr int64_t code = kCode;
  C10_HOST_DEVICE static float to_float(T v) { return static_cast<float>(v); }
  C10_HOST_DEVICE static T from_float(float v) { return T(v); }
  C10_HOST_DEVICE static uint32_t bits(T v) { return v.x; }
  C10_HOST_DEVICE static T from_bits(uint32_t b) { return T(static_cast<uint16_t>(b), T::from_bits()); }
};

template <>
struct Storage<c10::BFloat16> : SixteenBitStorage<c10::BFloat16, kBFloat16> {};

template <>
struct Storage<c10::Half> : SixteenBitStorage<c10::Half, kFloat16> {};

// Whether two values have the same bits. bfloat16 values are compared widened to float32, which is
// a shift of their bits (so one to one), and spares extracting 16-bit halves on the GPU.
template <typename T>
C10_HOST_DEVICE inline bool same_bits(T a, T b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return Storage<float>::bits(Storage<T>::to_float(a)) == Storage<float>::bits(Storage<T>::to_float(b));
  } else {
    return Storage<T>::bits(a) == Storage<T>::bits(b);
  }
}

// w0 moved by a step: round_T(w0 * c - s) with s = eta * a and c = 1 - eta * lambda (each rounded
// once in the arithmetic type); c is exactly 1 when the direction has no weight-decay term. The value
// before the rounding to T is its own function, so that the GPU can round two 16-bit values at once.
template <typename A>
C10_HOST_DEVICE inline A away_value(A w0, A s, A c) {
  return sub_rn(c == 1 ? w0 : mul_rn(w0, c), s);
}

template <typename T>
C10_HOST_DEVICE inline T step_away(T w0, typename Storage<T>::Arith s, typename Storage<T>::Arith c) {
  return Storage<T>::from_float(away_value(Storage<T>::to_float(w0), s, c));
}

// The inverse attempt: round_T((w + s) / c). Equal to w0 for most elements, but not where the step
// landed on a coarser grid (it crossed a power of two), on ties, or where |w0| is small next to |s|.
template <typename A>
C10_HOST_DEVICE inline A back_value(A w, A s, A c) {
  const A back = add_rn(w, s);
  return c == 1 ? back : div_rn(back, c);
}

template <typename T>
C10_HOST_DEVICE inline T step_back(T w, typename Storage<T>::Arith s, typename Storage<T>::Arith c) {
  return Storage<T>::from_float(back_value(Storage<T>::to_float(w), s, c));
}

// One element of a dtype known only at run time, in the arithmetic type A (optimizer states).
template <typename A>
C10_HOST_DEVICE inline A load_as(const void* base, int64_t i, int64_t code) {
  switch (code) {
    case kFloat32:
      return static_cast<A>(static_cast<const float*>(base)[i]);
    case kBFloat16:
      return static_cast<A>(static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]));
    case kFloat16:
      return static_cast<A>(static_cast<float>(static_cast<const c10::Half*>(base)[i]));
    default:
      return static_cast<A>(static_cast<const double*>(base)[i]);
  }
}

// How one tensor's direction is formed (see DirectionKind), with its hyperparameters in the
// arithmetic type.
template <typename A>
struct DirectionRule {
  int64_t kind = kDirectionTensor;
  A lambda = 0, sign = 1, h2 = 0, h3 = 0, h4 = 0, h5 = 1, h6 = 1;
  const void* state[kStatesPerTensor] = {nullptr, nullptr, nullptr};
  int64_t state_code = kFloat32;

  C10_HOST_DEVICE static DirectionRule load(const int64_t* row, const double* hyper_row) {
    DirectionRule r;
    r.kind = tensor_code(row[kTensorDtypes], kDirectionKindShift);
    r.state_code = tensor_code(row[kTensorDtypes], kStateDtypeShift);
    for (int j = 0; j < kStatesPerTensor; ++j) r.state[j] = reinterpret_cast<const void*>(row[kTensorStatePtr + j]);
    if (r.kind != kDirectionTensor) {
      r.lambda = static_cast<A>(hyper_row[kHyperLambda]);
      r.sign = static_cast<A>(hyper_row[kHyperSign]);
      r.h2 = static_cast<A>(hyper_row[2]);
      r.h3 = static_cast<A>(hyper_row[3]);
      r.h4 = static_cast<A>(hyper_row[4]);
      r.h5 = static_cast<A>(hyper_row[5]);
      r.h6 = static_cast<A>(hyper_row[6]);
    }
    return r;
  }

  C10_HOST_DEVICE A state_at(int j, int64_t i) const {
    return state[j] == nullptr ? A(0) : load_as<A>(state[j], i, state_code);
  }

  // The part of d that does not depend on w0, from the gradient (or given direction) g of element i.
  C10_HOST_DEVICE A term(A g, int64_t i) const {
    if (kind == kDirectionTensor) return g;
    g = mul_rn(sign, g);
    if (kind == kDirectionSgd) return add_rn(mul_rn(h2, g), mul_rn(h3, state_at(0, i)));
    // Adam: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2 (max with the running max under amsgrad),
    // a = (m' / bc1) / (sqrt(v') / sqrt(bc2) + eps).
    const A m = add_rn(mul_rn(h2, state_at(0, i)), mul_rn(sub_rn(A(1), h2), g));
    A v = add_rn(mul_rn(h3, state_at(1, i)), mul_rn(sub_rn(A(1), h3), mul_rn(g, g)));
    if (state[2] != nullptr) {
      const A running = state_at(2, i);
      v = running > v ? running : v;
    }
    return div_rn(div_rn(m, h5), add_rn(div_rn(sqrt_rn(v), h6), h4));
  }

  // c = 1 - eta * lambda for a step of size eta.
  C10_HOST_DEVICE A scale(A eta) const { return lambda == 0 ? A(1) : sub_rn(A(1), mul_rn(eta, lambda)); }

  // The whole direction of an element, d = a + lambda * w0, for the report.
  C10_HOST_DEVICE A full(A a, A w0) const { return lambda == 0 ? a : add_rn(a, mul_rn(lambda, w0)); }
};

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

// One tensor's param and direction dtype codes, from its codes word in the group table.
C10_HOST_DEVICE inline int64_t param_dtype_code(int64_t word) { return tensor_code(word, kParamDtypeShift); }
C10_HOST_DEVICE inline int64_t direction_dtype_code(int64_t word) { return tensor_code(word, kDirectionDtypeShift); }

}  // namespace adapeft
