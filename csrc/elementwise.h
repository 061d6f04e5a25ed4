// The per-element arithmetic of the native engine (csrc/fused_loss.cpp): exp, the soft-cap and
// its slope, the mixture. Written branch-free and inline so that the row loops over a logit block
// vectorise; float32 and float64 overloads (float64 uses the C library, for 1e-12 accuracy).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define WMSS_INLINE inline __attribute__((always_inline))

namespace wmss_native {

// Same finite stand-in for -inf as wmss_kernels.config.MASKED_LOGIT: the running maximum starts
// there; exp of (it - anything finite) is exactly 0, and 0 times it is 0 (not NaN, as with -inf).
constexpr double MASKED_LOGIT = -1e30;

// Below this |a / c| the soft-cap uses the odd polynomial (Cephes' single-precision tanhf, as
// wmss_kernels/logit_tiles.py: soft_cap): the exp form (1 - e) / (1 + e) cancels for small x.
constexpr float SOFTCAP_POLY_LIMIT = 0.625f;

// expf's range: below EXP_LO the result is subnormal or 0 and is returned as exactly 0 (a sum of
// exponentials relative to its maximum loses nothing by it); EXP_HI keeps 2^n a normal float.
constexpr float EXP_LO = -87.3365447505531f;  // log(FLT_MIN)
constexpr float EXP_HI = 88.0f;

WMSS_INLINE float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// e^x to ~1 ulp (Cephes expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial in r,
// times 2^n built in the exponent bits). No branches, so loops over it vectorise.
WMSS_INLINE float exp_(float x) {
  const float xc = std::min(std::max(x, EXP_LO), EXP_HI);
  // Round x / ln2 to the nearest integer by the 1.5 * 2^23 trick (exact for |n| < 2^22).
  const float magic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;  // ln2 split in two (Cody-Waite): exact product n * hi
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return x < EXP_LO ? 0.0f : p * scale;
}

WMSS_INLINE double exp_(double x) { return std::exp(x); }

// cap * tanh(a / cap) to float32 precision for every positive cap: small x = a / cap as
// a + a x^2 P(x^2) (cap never multiplies a tiny quantity: a cap of 1e30 gives back a), large |x| as
// (1 - e) / (1 + e) with e = exp(-2|x|), exact at the tails.
WMSS_INLINE float soft_cap(float a, float cap) {
  const float x = a / cap;
  const float x2 = x * x;
  const float poly = (((-5.70498872745e-3f * x2 + 2.06390887954e-2f) * x2 - 5.37397155531e-2f) * x2
                      + 1.33314422036e-1f) * x2 - 3.33332819422e-1f;
  const float near_zero = a + a * (x2 * poly);
  const float e = exp_(-2.0f * std::fabs(x));
  float tail = cap * ((1.0f - e) / (1.0f + e));
  tail = x < 0.0f ? -tail : tail;
  return std::fabs(x) < SOFTCAP_POLY_LIMIT ? near_zero : tail;
}

WMSS_INLINE double soft_cap(double a, double cap) { return cap * std::tanh(a / cap); }

// d/da cap * tanh(a / cap) = sech^2(a / cap) = 4 e / (1 + e)^2 with e = exp(-2|a / cap|): full
// relative precision where the cap saturates (1 - tanh^2 would cancel there).
template <typename T>
WMSS_INLINE T soft_cap_slope(T a, T cap) {
  const T e = exp_(T(-2) * std::fabs(a / cap));
  return T(4) * e / ((T(1) + e) * (T(1) + e));
}

// The mixed logit. The forward and the backward both call this, so the backward's softmax sees
// exactly the logits whose log-sum-exp the forward saved.
template <typename T>
WMSS_INLINE T mix(T z_strong, T z_weak, T lam, T one_minus_lam) {
  return lam * z_strong + one_minus_lam * z_weak;
}

// Online statistics of one distribution over a set of logits, relative to its maximum m:
// s = sum e^(z - m), t = sum e^(z - m) (z - m) (docs/design.md section 2.1).
template <typename T>
struct Online {
  T m = T(MASKED_LOGIT);
  T s = T(0);
  T t = T(0);

  // Fold in another set's (m2, s2, t2); the rescaling exps are scalar, in full precision.
  void merge(T m2, T s2, T t2) {
    const T top = std::max(m, m2);
    const T a1 = std::exp(m - top), a2 = std::exp(m2 - top);
    t = a1 * (t + (m - top) * s) + a2 * (t2 + (m2 - top) * s2);
    s = a1 * s + a2 * s2;
    m = top;
  }
};

}  // namespace wmss_native
