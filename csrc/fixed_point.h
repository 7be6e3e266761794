// Exact integers of N 64-bit words, two's complement, least significant word first: the knapsack's
// values. Every finite double is an integer multiple of 2^-1074, so a set of them, scaled by the power of
// two of their lowest set bit, becomes integers whose sums and comparisons are exact; N words hold the
// widest sum with room for its sign, and a product by a count (< 2^63) takes one word more.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace adapeft {

template <int N>
struct Fixed {
  std::array<uint64_t, N> word{};

  static Fixed of(int64_t x) {
    Fixed f;
    f.word[0] = static_cast<uint64_t>(x);
    for (int i = 1; i < N; ++i) f.word[i] = x < 0 ? ~uint64_t{0} : 0;
    return f;
  }
  bool negative() const { return static_cast<int64_t>(word[N - 1]) < 0; }
  bool is_zero() const {
    for (int i = 0; i < N; ++i) {
      if (word[i] != 0) return false;
    }
    return true;
  }
  // `count` (<= 64) bits from bit `lowest` (>= 0) up.
  uint64_t bits(int64_t lowest, int count) const {
    const int64_t index = lowest / 64, offset = lowest % 64;
    if (index >= N) return 0;
    uint64_t value = word[index] >> offset;
    if (offset > 0 && index + 1 < N) value |= word[index + 1] << (64 - offset);
    return count == 64 ? value : value & ((uint64_t{1} << count) - 1);
  }
  // Whether any bit below `position` is set.
  bool any_below(int64_t position) const {
    const int64_t index = std::min<int64_t>(position / 64, N);
    for (int64_t i = 0; i < index; ++i) {
      if (word[i] != 0) return true;
    }
    return index < N && position % 64 != 0 && (word[index] & ((uint64_t{1} << (position % 64)) - 1)) != 0;
  }
  Fixed& operator+=(const Fixed& other) {
    uint64_t carry = 0;
    for (int i = 0; i < N; ++i) {
      const unsigned __int128 sum = static_cast<unsigned __int128>(word[i]) + other.word[i] + carry;
      word[i] = static_cast<uint64_t>(sum);
      carry = static_cast<uint64_t>(sum >> 64);
    }
    return *this;
  }
  Fixed& operator-=(const Fixed& other) {
    uint64_t borrow = 0;
    for (int i = 0; i < N; ++i) {
      const unsigned __int128 difference =
          static_cast<unsigned __int128>(word[i]) - other.word[i] - borrow;
      word[i] = static_cast<uint64_t>(difference);
      borrow = static_cast<uint64_t>(difference >> 64) & 1;
    }
    return *this;
  }
  Fixed operator-() const {
    Fixed zero;
    return zero -= *this;
  }
  friend Fixed operator+(Fixed a, const Fixed& b) { return a += b; }
  friend Fixed operator-(Fixed a, const Fixed& b) { return a -= b; }
};

template <int N>
int compare(const Fixed<N>& a, const Fixed<N>& b) {
  if (a.word[N - 1] != b.word[N - 1]) {
    return static_cast<int64_t>(a.word[N - 1]) < static_cast<int64_t>(b.word[N - 1]) ? -1 : 1;
  }
  for (int i = N - 2; i >= 0; --i) {
    if (a.word[i] != b.word[i]) return a.word[i] < b.word[i] ? -1 : 1;
  }
  return 0;
}
template <int N> bool operator<(const Fixed<N>& a, const Fixed<N>& b) { return compare(a, b) < 0; }
template <int N> bool operator<=(const Fixed<N>& a, const Fixed<N>& b) { return compare(a, b) <= 0; }
template <int N> bool operator>(const Fixed<N>& a, const Fixed<N>& b) { return compare(a, b) > 0; }
template <int N> bool operator>=(const Fixed<N>& a, const Fixed<N>& b) { return compare(a, b) >= 0; }
template <int N> bool operator==(const Fixed<N>& a, const Fixed<N>& b) { return compare(a, b) == 0; }
template <int N> bool operator!=(const Fixed<N>& a, const Fixed<N>& b) { return compare(a, b) != 0; }

// a * m for |m| < 2^63, one word wider: exact, since |a| < 2^(64N-1) gives |a m| < 2^(64N+62).
template <int N>
Fixed<N + 1> times(const Fixed<N>& a, int64_t m) {
  if (m < 0) return -times(a, -m);
  Fixed<N + 1> product;
  const uint64_t extension = a.negative() ? ~uint64_t{0} : 0;
  uint64_t carry = 0;
  for (int i = 0; i <= N; ++i) {
    const unsigned __int128 partial =
        static_cast<unsigned __int128>(i < N ? a.word[i] : extension) * static_cast<uint64_t>(m) + carry;
    product.word[i] = static_cast<uint64_t>(partial);
    carry = static_cast<uint64_t>(partial >> 64);
  }
  return product;
}

// A finite double v >= 0 as mantissa * 2^exponent, the mantissa odd (or zero): read from its bits, which is
// several times faster than frexp.
struct Decomposed {
  uint64_t mantissa;
  int64_t exponent;
};
inline Decomposed decompose(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const int64_t field = static_cast<int64_t>(bits >> 52);
  uint64_t mantissa = bits & ((uint64_t{1} << 52) - 1);
  int64_t exponent = -1074;  // subnormals: mantissa * 2^-1074
  if (field != 0) {
    mantissa |= uint64_t{1} << 52;
    exponent = field - 1075;
  }
  if (mantissa == 0) return {0, 0};
  const int trailing = __builtin_ctzll(mantissa);
  return {mantissa >> trailing, exponent + trailing};
}

// mantissa * 2^scale, a mantissa of at most 53 bits (2^53 included) whose value a double holds: exact.
inline double compose(uint64_t mantissa, int64_t scale) {
  if (mantissa == 0) return 0.0;
  const int lead = 63 - __builtin_clzll(mantissa);
  const int64_t magnitude = scale + lead;
  if (magnitude > 1023) return std::numeric_limits<double>::infinity();
  if (magnitude < -1022) return std::ldexp(static_cast<double>(mantissa), static_cast<int>(scale));  // subnormal
  const uint64_t aligned = lead <= 52 ? mantissa << (52 - lead) : mantissa >> (lead - 52);
  const uint64_t bits = static_cast<uint64_t>(magnitude + 1023) << 52 | (aligned & ((uint64_t{1} << 52) - 1));
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// a * 2^exponent for a >= 0, rounded once to the nearest double (ties to even), subnormals included:
// the exactly rounded sum of the values a stands for (what Python's math.fsum returns).
template <int N>
double to_double(const Fixed<N>& a, int64_t exponent) {
  int top = N - 1;
  while (top >= 0 && a.word[top] == 0) --top;
  if (top < 0) return 0.0;
  const int lead = __builtin_clzll(a.word[top]);
  const int64_t highest = 64 * top + 63 - lead;
  const int64_t magnitude = highest + exponent;  // the value lies in [2^magnitude, 2^(magnitude+1))
  if (magnitude >= -1022) {  // a normal double (or too large): 53 bits from the top two words, and a sticky bit
    const unsigned __int128 window =
        (static_cast<unsigned __int128>(a.word[top]) << 64 | (top > 0 ? a.word[top - 1] : 0)) << lead;
    const uint64_t head = static_cast<uint64_t>(window >> 64);
    bool below = static_cast<uint64_t>(window) != 0 || (head & 0x3ff) != 0;
    for (int i = 0; i < top - 1 && !below; ++i) below = a.word[i] != 0;
    const uint64_t mantissa = (head >> 11) + ((head >> 10 & 1) && (below || (head >> 11 & 1)));
    return compose(mantissa, highest - 52 + exponent);
  }
  const int64_t significant = magnitude >= -1022 ? 53 : magnitude + 1075;  // fewer bits below 2^-1022
  const int64_t lowest_kept = highest - significant + 1;
  if (lowest_kept <= 0) return compose(a.bits(0, static_cast<int>(highest + 1)), exponent);
  uint64_t mantissa = a.bits(lowest_kept, static_cast<int>(significant));
  if (a.bits(lowest_kept - 1, 1) && (a.any_below(lowest_kept - 1) || (mantissa & 1))) ++mantissa;
  return compose(mantissa, lowest_kept + exponent);
}

// Calls f(std::integral_constant<int, N>{}) for the narrowest instantiated N >= words (at most 34: the
// whole range of doubles, 2^-1074 to 2^1024, with 2^63 terms and a sign).
template <typename F>
decltype(auto) with_words(int words, F&& f) {
  if (words <= 1) return f(std::integral_constant<int, 1>{});
  if (words <= 2) return f(std::integral_constant<int, 2>{});
  if (words <= 4) return f(std::integral_constant<int, 4>{});
  if (words <= 8) return f(std::integral_constant<int, 8>{});
  if (words <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 34>{});
}

}  // namespace adapeft
