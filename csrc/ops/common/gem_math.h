// Arithmetic of generalized-mean (GeM) pooling, shared by the CPU and CUDA kernels.
//
// GeM (Radenovic et al., TPAMI 2019, eq. 3):  y = ( (1/HW) * sum_hw max(x, eps)^p )^(1/p).
// With s = sum_hw max(x, eps)^p and m = s / HW the gradients are
//   dy/dx_hw = (y / s) * max(x, eps)^(p-1)                        (zero where x < eps)
//   dy/dp    = y * ( t / (s * p) - ln(m) / p^2 ),   t = sum_hw max(x, eps)^p * ln(max(x, eps)).
//
// Two paths per (n, c) plane:
// - the fast path sums the powers in the accumulation type (float for float/bf16/half inputs) in one vectorised
//   pass; it is used when that sum is trustworthy (gem_sum_is_safe: finite, no term lost to underflow, and room
//   for the backward pass's t);
// - every other plane is recomputed by the exact path (gem_plane_forward_exact / gem_plane_backward_exact), in
//   double and scaled by the plane's largest clamped value M: y = M * (mean (max(x, eps) / M)^p)^(1/p). For finite
//   inputs this is the definition's value (between eps and M, so always representable) even where x^p overflows
//   or underflows (e.g. bf16 1e30 with p = 3, or an all-zero plane with p = 6.5, whose eps^p is below float32's
//   range). A plane holding NaN or +Inf gives what the plain PyTorch expression
//   x.clamp(min=eps).pow(p).mean((-2, -1)).pow(1 / p) gives, forward and backward (autograd), see below.
#pragma once

#include <cmath>
#include <cstdint>

#include "fast_math.h"

namespace reid_ops {

REID_HOST_DEVICE float gem_log2(float x) { return fast_log2(x); }
REID_HOST_DEVICE double gem_log2(double x) { return ::log2(x); }
REID_HOST_DEVICE float gem_exp2(float y) { return fast_exp2(y); }
REID_HOST_DEVICE double gem_exp2(double y) { return ::exp2(y); }

// max(x, eps); NaN stays NaN (the comparison is false), as in torch.clamp.
template <typename acc_t>
REID_HOST_DEVICE acc_t gem_clamp(acc_t x, acc_t eps) {
  return x < eps ? eps : x;
}

// max(x, eps)^p
template <typename acc_t>
REID_HOST_DEVICE acc_t gem_power(acc_t x, acc_t p, acc_t eps) {
  return gem_exp2(p * gem_log2(gem_clamp(x, eps)));
}

// Whether the fast path's plane sum can be used (false for NaN, +Inf, overflow and underflow). The forward and
// backward passes evaluate it on the same saved sum, so they always take the same path for a plane.
// Below the lower bound, terms flushed to zero by the exponential (< 2^-126 in float, gradual below 2^-1022 in
// double) could matter (num_elements * bound keeps their share under 2^-26); the upper bound leaves room for
// t = sum max(x, eps)^p * ln(max(x, eps)) in the backward pass (|ln| < 89 in float, < 745 in double).
REID_HOST_DEVICE bool gem_sum_is_safe(float sum_pow, float num_elements) {
  return sum_pow >= num_elements * 0x1p-100f && sum_pow <= 0x1p121f;
}
REID_HOST_DEVICE bool gem_sum_is_safe(double sum_pow, double num_elements) {
  return sum_pow >= num_elements * 0x1p-967 && sum_pow <= 0x1p1014;
}

// y from the plane sum s of powers (fast path).
template <typename acc_t>
REID_HOST_DEVICE acc_t gem_output(acc_t sum_pow, acc_t num_elements, acc_t p) {
  return gem_exp2(gem_log2(sum_pow / num_elements) / p);
}

// One element of the backward pass: returns dL/dx for this element and sets `t_term` to the
// element's max(x, eps)^p * ln(max(x, eps)) (summed over the plane for dL/dp).
// `coeff` = dL/dy * y / s.
template <typename acc_t>
REID_HOST_DEVICE acc_t gem_backward_element(acc_t x, acc_t p, acc_t eps, acc_t coeff, acc_t& t_term) {
  const acc_t xc = gem_clamp(x, eps);
  const acc_t log2x = gem_log2(xc);
  const acc_t pow_pm1 = gem_exp2((p - acc_t(1)) * log2x);  // xc^(p-1)
  t_term = pow_pm1 * xc * log2x * acc_t(0.69314718055994530942);
  return x < eps ? acc_t(0) : coeff * pow_pm1;
}

// Contribution of one (n, c) plane to dL/dp.
template <typename acc_t>
REID_HOST_DEVICE acc_t gem_grad_p_plane(acc_t grad_y, acc_t y, acc_t sum_pow, acc_t t, acc_t num_elements,
                                        acc_t p) {
  if (!(sum_pow > acc_t(0))) return acc_t(0);
  const acc_t log_mean = gem_log2(sum_pow / num_elements) * acc_t(0.69314718055994530942);
  return grad_y * y * (t / (sum_pow * p) - log_mean / (p * p));
}

// ---- exact path (planes whose fast sum is not safe) ----
// `read(i)` returns element i of the plane as a double, `write(i, value)` stores dL/dx of element i; both are small
// function objects, so the CPU (contiguous or channels_last) and CUDA (strided) kernels share this code.

// Largest max(x, eps) of the plane; NaN if the plane holds a NaN (once NaN, it stays NaN).
template <typename Reader>
REID_HOST_DEVICE double gem_plane_max(const Reader& read, int64_t num_elements, double eps) {
  double largest = eps;
  for (int64_t i = 0; i < num_elements; ++i) {
    const double v = read(i);
    largest = (v > largest || v != v) ? v : largest;
  }
  return largest;
}

// y of one plane, exactly (see the top of this file). NaN in the plane gives NaN and +Inf gives +Inf, as the plain
// expression does (Inf^p = Inf for p > 0; -Inf is clamped to eps like any other value below it).
template <typename Reader>
REID_HOST_DEVICE double gem_plane_forward_exact(const Reader& read, int64_t num_elements, double p, double eps) {
  const double largest = gem_plane_max(read, num_elements, eps);
  if (!(largest <= 1.7976931348623157e308)) return largest;  // NaN or +Inf
  const double log2_largest = ::log2(largest);
  double scaled_sum = 0;  // sum (max(x, eps) / M)^p, in [1, num_elements]: no overflow, no relevant underflow
  for (int64_t i = 0; i < num_elements; ++i) {
    scaled_sum += ::exp2(p * (::log2(gem_clamp(read(i), eps)) - log2_largest));
  }
  return largest * ::exp2(::log2(scaled_sum / static_cast<double>(num_elements)) / p);
}

// Backward pass of one plane by the exact path: writes dL/dx of each element and returns the plane's share of dL/dp.
template <typename Reader, typename Writer>
REID_HOST_DEVICE double gem_plane_backward_exact(const Reader& read, const Writer& write, int64_t num_elements,
                                                 double p, double eps, double grad_y) {
  const double count = static_cast<double>(num_elements);
  const double largest = gem_plane_max(read, num_elements, eps);
  if (!(largest <= 1.7976931348623157e308)) {
    // NaN or +Inf plane: the mean m is NaN or +Inf; autograd through the plain expression gives
    //   dL/dx = dL/dy * (1/p) m^(1/p - 1) * (1/HW) * p max(x, eps)^(p - 1)   where x >= eps, else 0,
    // with IEEE pow on the special values (Inf^negative = 0, Inf^0 = NaN^0 = 1): for p = 1 the gradient stays
    // finite, for p > 1 it is 0 except NaN at +Inf elements, for p < 1 it is +-Inf except NaN at +Inf elements.
    // Its dL/dp mixes +Inf and -Inf (or 0 * Inf) terms: always NaN.
    const double coeff = grad_y * ::pow(largest, 1.0 / p - 1.0) / count;
    for (int64_t i = 0; i < num_elements; ++i) {
      const double x = read(i);
      write(i, x >= eps ? coeff * ::pow(x, p - 1.0) : 0.0);  // NaN elements are clamped: zero gradient
    }
    return largest - largest;  // NaN
  }
  // Finite plane, scaled by M: with l = log2(max(x, eps) / M), s' = sum 2^(p l), t' = sum 2^(p l) l ln 2,
  //   y = M (s' / HW)^(1/p),   dy/dx = (y / M) / s' * 2^((p - 1) l),   dy/dp = y (t' / (s' p) - ln(s' / HW) / p^2)
  // (the ln M terms of t / (s p) and ln(m) / p^2 cancel).
  const double log2_largest = ::log2(largest);
  double scaled_sum = 0, scaled_t = 0;
  for (int64_t i = 0; i < num_elements; ++i) {
    const double l = ::log2(gem_clamp(read(i), eps)) - log2_largest;
    const double term = ::exp2(p * l);
    scaled_sum += term;
    scaled_t += term * l * 0.69314718055994530942;
  }
  const double log_scaled_mean = ::log(scaled_sum / count);
  const double y = largest * ::exp(log_scaled_mean / p);
  const double coeff = grad_y * (y / largest) / scaled_sum;
  for (int64_t i = 0; i < num_elements; ++i) {
    const double x = read(i);
    write(i, x >= eps ? coeff * ::exp2((p - 1.0) * (::log2(x) - log2_largest)) : 0.0);
  }
  return grad_y * y * (scaled_t / (scaled_sum * p) - log_scaled_mean / (p * p));
}

}  // namespace reid_ops
