// CPU kernels of GeM pooling: one fused pass over x forward, one fused pass backward.
// Handles contiguous (NCHW) and channels_last (NHWC) inputs without copying.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/gem_math.h"
#include "../common/check_inputs.h"

// Compile the hot loops for AVX-512, AVX2 and baseline x86-64 and pick one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define REID_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define REID_CLONES
#endif

namespace reid_ops {
namespace {

// ---- hot loops (float accumulation for float / bfloat16 / half inputs, double for double) ----

template <typename T, typename acc_t>
inline __attribute__((always_inline)) acc_t plane_sum(const T* x, int64_t n, acc_t p, acc_t eps) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += gem_power<acc_t>(static_cast<acc_t>(x[i]), p, eps);
  return sum;
}

template <typename T, typename acc_t>
inline __attribute__((always_inline)) acc_t plane_backward(const T* x, T* dx, int64_t n, acc_t p, acc_t eps,
                                                           acc_t coeff) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) {
    acc_t term;
    dx[i] = static_cast<T>(gem_backward_element<acc_t>(static_cast<acc_t>(x[i]), p, eps, coeff, term));
    t += term;
  }
  return t;
}

template <typename T, typename acc_t>
inline __attribute__((always_inline)) void channels_accumulate(const T* x, acc_t* acc, int64_t c, acc_t p,
                                                               acc_t eps) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) acc[i] += gem_power<acc_t>(static_cast<acc_t>(x[i]), p, eps);
}

template <typename T, typename acc_t>
inline __attribute__((always_inline)) void channels_backward(const T* x, T* dx, const acc_t* coeff, acc_t* t,
                                                             int64_t c, acc_t p, acc_t eps) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) {
    acc_t term;
    dx[i] = static_cast<T>(gem_backward_element<acc_t>(static_cast<acc_t>(x[i]), p, eps, coeff[i], term));
    t[i] += term;
  }
}

#define REID_GEM_LOOPS(T, ACC, SUFFIX)                                                                  \
  REID_CLONES ACC plane_sum_##SUFFIX(const T* x, int64_t n, ACC p, ACC eps) {                          \
    return plane_sum<T, ACC>(x, n, p, eps);                                                             \
  }                                                                                                     \
  REID_CLONES ACC plane_backward_##SUFFIX(const T* x, T* dx, int64_t n, ACC p, ACC eps, ACC coeff) {   \
    return plane_backward<T, ACC>(x, dx, n, p, eps, coeff);                                             \
  }                                                                                                     \
  REID_CLONES void channels_accumulate_##SUFFIX(const T* x, ACC* acc, int64_t c, ACC p, ACC eps) {     \
    channels_accumulate<T, ACC>(x, acc, c, p, eps);                                                     \
  }                                                                                                     \
  REID_CLONES void channels_backward_##SUFFIX(const T* x, T* dx, const ACC* coeff, ACC* t, int64_t c,  \
                                              ACC p, ACC eps) {                                         \
    channels_backward<T, ACC>(x, dx, coeff, t, c, p, eps);                                              \
  }

REID_GEM_LOOPS(float, float, f32)
REID_GEM_LOOPS(double, double, f64)
REID_GEM_LOOPS(c10::BFloat16, float, bf16)
REID_GEM_LOOPS(c10::Half, float, f16)

// Overloads so the templated drivers below can call the right instance.
#define REID_GEM_OVERLOADS(T, ACC, SUFFIX)                                                           \
  inline ACC loop_plane_sum(const T* x, int64_t n, ACC p, ACC eps) { return plane_sum_##SUFFIX(x, n, p, eps); } \
  inline ACC loop_plane_backward(const T* x, T* dx, int64_t n, ACC p, ACC eps, ACC coeff) {           \
    return plane_backward_##SUFFIX(x, dx, n, p, eps, coeff);                                          \
  }                                                                                                  \
  inline void loop_channels_accumulate(const T* x, ACC* acc, int64_t c, ACC p, ACC eps) {            \
    channels_accumulate_##SUFFIX(x, acc, c, p, eps);                                                  \
  }                                                                                                  \
  inline void loop_channels_backward(const T* x, T* dx, const ACC* coeff, ACC* t, int64_t c, ACC p,  \
                                     ACC eps) {                                                      \
    channels_backward_##SUFFIX(x, dx, coeff, t, c, p, eps);                                           \
  }

REID_GEM_OVERLOADS(float, float, f32)
REID_GEM_OVERLOADS(double, double, f64)
REID_GEM_OVERLOADS(c10::BFloat16, float, bf16)
REID_GEM_OVERLOADS(c10::Half, float, f16)

// ---- exact path (gem_math.h): planes read and written through a stride (1, or C for channels_last) ----

template <typename T>
struct StridedPlaneReader {
  const T* base;
  int64_t stride;
  double operator()(int64_t i) const { return static_cast<double>(base[i * stride]); }
};

template <typename T>
struct StridedPlaneWriter {
  T* base;
  int64_t stride;
  void operator()(int64_t i, double value) const {
    base[i * stride] = static_cast<T>(static_cast<at::opmath_type<T>>(value));
  }
};

template <typename T>
T exact_output(StridedPlaneReader<T> plane, int64_t num_elements, double p, double eps) {
  return static_cast<T>(static_cast<at::opmath_type<T>>(gem_plane_forward_exact(plane, num_elements, p, eps)));
}

// ---- drivers ----

at::Tensor layout_of(const at::Tensor& x, bool& channels_last) {
  if (x.is_contiguous()) {
    channels_last = false;
    return x;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    channels_last = true;
    return x;
  }
  channels_last = false;
  return x.contiguous();
}

std::tuple<at::Tensor, at::Tensor> gem_forward_cpu(const at::Tensor& x_in, const at::Tensor& p, double eps) {
  check_gem_inputs(x_in, p, eps);
  bool channels_last = false;
  const auto x = layout_of(x_in, channels_last);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const double p_value = p.item<double>();
  TORCH_CHECK(p_value > 0 && p_value < INFINITY, "gem: p must be a finite number > 0, got ", p_value);
  auto y = at::empty({N, C}, x.options());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sum_pow = at::empty({N, C}, x.options().dtype(acc_type));
  if (N * C == 0) return {y, sum_pow};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gem_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* sp = sum_pow.data_ptr<acc_t>();
    const acc_t pv = static_cast<acc_t>(p_value), ev = static_cast<acc_t>(eps);
    const acc_t count = static_cast<acc_t>(HW);
    if (!channels_last) {
      at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const acc_t s = loop_plane_sum(xp + plane * HW, HW, pv, ev);
          sp[plane] = s;
          yp[plane] = gem_sum_is_safe(s, count)
                          ? static_cast<scalar_t>(gem_output<acc_t>(s, count, pv))
                          : exact_output<scalar_t>({xp + plane * HW, 1}, HW, p_value, eps);
        }
      });
    } else {
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          acc_t* acc = sp + n * C;
          for (int64_t c = 0; c < C; ++c) acc[c] = 0;
          for (int64_t hw = 0; hw < HW; ++hw) loop_channels_accumulate(xp + (n * HW + hw) * C, acc, C, pv, ev);
          for (int64_t c = 0; c < C; ++c) {
            yp[n * C + c] = gem_sum_is_safe(acc[c], count)
                                ? static_cast<scalar_t>(gem_output<acc_t>(acc[c], count, pv))
                                : exact_output<scalar_t>({xp + n * HW * C + c, C}, HW, p_value, eps);
          }
        }
      });
    }
  });
  return {y, sum_pow};
}

at::Tensor gem_cpu(const at::Tensor& x, const at::Tensor& p, double eps) {
  return std::get<0>(gem_forward_cpu(x, p, eps));
}

std::tuple<at::Tensor, at::Tensor> gem_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                    const at::Tensor& p, const at::Tensor& y_in,
                                                    const at::Tensor& sum_pow_in, double eps) {
  check_gem_inputs(x_in, p, eps);
  bool channels_last = false;
  const auto x = layout_of(x_in, channels_last);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(grad_in.numel() == N * C, "gem backward: grad has ", grad_in.numel(), " elements, expected ", N * C);
  const double p_value = p.item<double>();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad = grad_in.to(acc_type).contiguous();
  const auto y = y_in.to(acc_type).contiguous();
  const auto sum_pow = sum_pow_in.to(acc_type).contiguous();
  auto grad_x = at::empty_like(x);  // keeps x's memory format
  std::vector<double> grad_p_planes(N * C, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gem_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const acc_t* yp = y.const_data_ptr<acc_t>();
    const acc_t* sp = sum_pow.const_data_ptr<acc_t>();
    const acc_t pv = static_cast<acc_t>(p_value), ev = static_cast<acc_t>(eps);
    const acc_t count = static_cast<acc_t>(HW);
    if (!channels_last) {
      at::parallel_for(0, N * C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          if (!gem_sum_is_safe(sp[plane], count)) {
            grad_p_planes[plane] = gem_plane_backward_exact(StridedPlaneReader<scalar_t>{xp + plane * HW, 1},
                                                            StridedPlaneWriter<scalar_t>{gxp + plane * HW, 1}, HW,
                                                            p_value, eps, static_cast<double>(gp[plane]));
            continue;
          }
          const acc_t coeff = gp[plane] * yp[plane] / sp[plane];
          const acc_t t = loop_plane_backward(xp + plane * HW, gxp + plane * HW, HW, pv, ev, coeff);
          grad_p_planes[plane] = gem_grad_p_plane<acc_t>(gp[plane], yp[plane], sp[plane], t, count, pv);
        }
      });
    } else {
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> coeff(C), t(C);
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t plane = n * C + c;
            coeff[c] = gem_sum_is_safe(sp[plane], count) ? gp[plane] * yp[plane] / sp[plane] : acc_t(0);
            t[c] = 0;
          }
          for (int64_t hw = 0; hw < HW; ++hw) {
            const int64_t offset = (n * HW + hw) * C;
            loop_channels_backward(xp + offset, gxp + offset, coeff.data(), t.data(), C, pv, ev);
          }
          for (int64_t c = 0; c < C; ++c) {
            const int64_t plane = n * C + c;
            if (gem_sum_is_safe(sp[plane], count)) {
              grad_p_planes[plane] = gem_grad_p_plane<acc_t>(gp[plane], yp[plane], sp[plane], t[c], count, pv);
            } else {  // the vectorised pass wrote placeholders for this channel: overwrite them
              const int64_t offset = n * HW * C + c;
              grad_p_planes[plane] =
                  gem_plane_backward_exact(StridedPlaneReader<scalar_t>{xp + offset, C},
                                           StridedPlaneWriter<scalar_t>{gxp + offset, C}, HW, p_value, eps,
                                           static_cast<double>(gp[plane]));
            }
          }
        }
      });
    }
  });
  double grad_p_total = 0.0;  // summed serially: deterministic
  for (double v : grad_p_planes) grad_p_total += v;
  auto grad_p = at::full_like(p, grad_p_total);
  return {grad_x, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::gem"), TORCH_FN(gem_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_gem_forward"), TORCH_FN(gem_forward_cpu));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_gem_backward"), TORCH_FN(gem_backward_cpu));
}

}  // namespace reid_ops
