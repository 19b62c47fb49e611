// Small vectorisable math shared by the kernels (header-only).
#ifndef VDMREP_KERNELS_VEC_MATH_H_
#define VDMREP_KERNELS_VEC_MATH_H_

#include <cstdint>
#include <cstring>

namespace vdmrep {

// exp(x) for x <= 0 (Cody-Waite reduction to |r| <= ln2/2, degree-6 Taylor polynomial
// in Horner form): relative error <= 2.3e-7 over [-87, 0] against double-precision exp
// (every 16th float checked; f32 round-off is 6e-8). Written so that GCC vectorises it
// inside `omp simd` loops without -ffast-math: libm's expf, std::floor and std::max
// each kept those loops scalar. Adding 1.5 * 2^23 rounds x log2(e) to
// the nearest integer n and leaves n in the low mantissa bits. Inputs below -87.3
// give ~2^-126 instead of a denormal.
inline float ExpNonPositive(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float shifter = 12582912.f;
  const float kf = x * 1.44269504088896341f + shifter;
  const float n = kf - shifter;
  int32_t ki;
  std::memcpy(&ki, &kf, sizeof(ki));
  float r = x - n * 0.693145751953125f;  // ln2 = hi + lo; n * hi is exact
  r -= n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (ki - 0x4B400000 + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// The logistic sigmoid 1 / (1 + exp(-z)) from exp(-|z|) (no overflow for any z).
inline float Sigmoid(float z) {
  const float e = ExpNonPositive(z < 0.f ? z : -z);
  const float s = 1.f / (1.f + e);
  return z < 0.f ? e * s : s;
}

}  // namespace vdmrep

#endif  // VDMREP_KERNELS_VEC_MATH_H_
