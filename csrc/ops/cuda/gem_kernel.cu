// CUDA kernels of GeM pooling (the CPU twins live in ../cpu/gem_kernel.cpp). One thread per
// (n, c) plane, reading the plane through its strides, so contiguous and channels_last inputs are
// both handled without a copy (channels_last gives coalesced reads across channels).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/gem_math.h"
#include "../common/check_inputs.h"
#include "cuda_helpers.cuh"

namespace reid_ops {
namespace {

struct PlaneStrides {
  int64_t n, c, h, w, C, W, HW;
  __host__ __device__ int64_t offset(int64_t plane, int64_t hw) const {
    const int64_t ni = plane / C, ci = plane % C;
    return ni * n + ci * c + (hw / W) * h + (hw % W) * w;
  }
};

// Element access for the exact path of gem_math.h (planes whose fast sum is not safe).
template <typename scalar_t>
struct PlaneReader {
  const scalar_t* x;
  PlaneStrides s;
  int64_t plane;
  __host__ __device__ double operator()(int64_t hw) const { return static_cast<double>(x[s.offset(plane, hw)]); }
};

template <typename scalar_t>
struct PlaneWriter {
  scalar_t* grad_x;
  PlaneStrides s;
  int64_t plane;
  __host__ __device__ void operator()(int64_t hw, double value) const {
    grad_x[s.offset(plane, hw)] = static_cast<scalar_t>(static_cast<at::opmath_type<scalar_t>>(value));
  }
};

template <typename scalar_t, typename acc_t>
__global__ void gem_forward_kernel(const scalar_t* x, PlaneStrides s, int64_t planes, acc_t p, acc_t eps,
                                   scalar_t* y, acc_t* sum_pow) {
  const int64_t plane = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (plane >= planes) return;
  acc_t sum = 0;
  for (int64_t hw = 0; hw < s.HW; ++hw) sum += gem_power<acc_t>(static_cast<acc_t>(x[s.offset(plane, hw)]), p, eps);
  sum_pow[plane] = sum;
  const acc_t count = static_cast<acc_t>(s.HW);
  y[plane] = gem_sum_is_safe(sum, count)
                 ? static_cast<scalar_t>(gem_output<acc_t>(sum, count, p))
                 : static_cast<scalar_t>(static_cast<acc_t>(gem_plane_forward_exact(
                       PlaneReader<scalar_t>{x, s, plane}, s.HW, static_cast<double>(p), static_cast<double>(eps))));
}

template <typename scalar_t, typename acc_t>
__global__ void gem_backward_kernel(const acc_t* grad, const scalar_t* x, PlaneStrides s, int64_t planes, acc_t p,
                                    acc_t eps, const acc_t* y, const acc_t* sum_pow, scalar_t* grad_x,
                                    acc_t* grad_p_planes) {
  const int64_t plane = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (plane >= planes) return;
  if (!gem_sum_is_safe(sum_pow[plane], static_cast<acc_t>(s.HW))) {
    grad_p_planes[plane] = static_cast<acc_t>(gem_plane_backward_exact(
        PlaneReader<scalar_t>{x, s, plane}, PlaneWriter<scalar_t>{grad_x, s, plane}, s.HW, static_cast<double>(p),
        static_cast<double>(eps), static_cast<double>(grad[plane])));
    return;
  }
  const acc_t coeff = grad[plane] * y[plane] / sum_pow[plane];
  acc_t t = 0;
  for (int64_t hw = 0; hw < s.HW; ++hw) {
    const int64_t o = s.offset(plane, hw);
    acc_t term;
    grad_x[o] = static_cast<scalar_t>(gem_backward_element<acc_t>(static_cast<acc_t>(x[o]), p, eps, coeff, term));
    t += term;
  }
  grad_p_planes[plane] =
      gem_grad_p_plane<acc_t>(grad[plane], y[plane], sum_pow[plane], t, static_cast<acc_t>(s.HW), p);
}

PlaneStrides strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.size(1), x.size(3), x.size(2) * x.size(3)};
}

std::tuple<at::Tensor, at::Tensor> gem_forward_cuda(const at::Tensor& x, const at::Tensor& p, double eps) {
  check_gem_inputs(x, p, eps);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t planes = x.size(0) * x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = at::empty({x.size(0), x.size(1)}, x.options());
  auto sum_pow = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type));
  if (planes == 0) return {y, sum_pow};
  const double p_value = p.item<double>();
  TORCH_CHECK(p_value > 0 && p_value < INFINITY, "gem: p must be a finite number > 0, got ", p_value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gem_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gem_forward_kernel<scalar_t, acc_t><<<blocks_for(planes), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), planes, static_cast<acc_t>(p_value), static_cast<acc_t>(eps),
        y.data_ptr<scalar_t>(), sum_pow.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, sum_pow};
}

at::Tensor gem_cuda(const at::Tensor& x, const at::Tensor& p, double eps) {
  return std::get<0>(gem_forward_cuda(x, p, eps));
}

std::tuple<at::Tensor, at::Tensor> gem_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x,
                                                     const at::Tensor& p, const at::Tensor& y_in,
                                                     const at::Tensor& sum_pow_in, double eps) {
  check_gem_inputs(x, p, eps);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t planes = x.size(0) * x.size(1);
  TORCH_CHECK(grad_in.numel() == planes, "gem backward: grad has ", grad_in.numel(), " elements, expected ", planes);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad = grad_in.to(acc_type).contiguous();
  const auto y = y_in.to(acc_type).contiguous();
  const auto sum_pow = sum_pow_in.to(acc_type).contiguous();
  auto grad_x = at::empty_like(x);
  auto grad_p_planes = at::zeros({planes}, x.options().dtype(acc_type));
  const double p_value = p.item<double>();
  if (planes > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gem_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gem_backward_kernel<scalar_t, acc_t><<<blocks_for(planes), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), strides_of(x), planes,
          static_cast<acc_t>(p_value), static_cast<acc_t>(eps), y.const_data_ptr<acc_t>(),
          sum_pow.const_data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), grad_p_planes.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto grad_p = grad_p_planes.sum().reshape(p.sizes()).to(p.scalar_type());
  return {grad_x, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, CUDA, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::gem"), TORCH_FN(gem_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_gem_forward"), TORCH_FN(gem_forward_cuda));
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::_gem_backward"), TORCH_FN(gem_backward_cuda));
}

}  // namespace reid_ops
