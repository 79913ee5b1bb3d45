// Arithmetic of generalized-mean (GeM) pooling, shared by the CPU and CUDA kernels.
//
// GeM (Radenovic et al., TPAMI 2019, eq. 3):  y = ( (1/HW) * sum_hw max(x, eps)^p )^(1/p).
// With s = sum_hw max(x, eps)^p and m = s / HW the gradients are
//   dy/dx_hw = (y / s) * max(x, eps)^(p-1)                        (zero where x < eps)
//   dy/dp    = y * ( t / (s * p) - ln(m) / p^2 ),   t = sum_hw max(x, eps)^p * ln(max(x, eps)).
#pragma once

#include <cmath>

#include "fast_math.h"

namespace reid_ops {

REID_HOST_DEVICE float gem_log2(float x) { return fast_log2(x); }
REID_HOST_DEVICE double gem_log2(double x) { return ::log2(x); }
REID_HOST_DEVICE float gem_exp2(float y) { return fast_exp2(y); }
REID_HOST_DEVICE double gem_exp2(double y) { return ::exp2(y); }

template <typename acc_t>
REID_HOST_DEVICE acc_t gem_clamp(acc_t x, acc_t eps) {
  return x < eps ? eps : x;
}

// max(x, eps)^p
template <typename acc_t>
REID_HOST_DEVICE acc_t gem_power(acc_t x, acc_t p, acc_t eps) {
  return gem_exp2(p * gem_log2(gem_clamp(x, eps)));
}

// y from the plane sum s of powers.
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

}  // namespace reid_ops
