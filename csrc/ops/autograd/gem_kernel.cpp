// Autograd of GeM: saves x, p, y and the per-plane power sums, and calls the fused backward op.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../gem.h"

namespace reid_ops {
namespace {

class GemFunction : public torch::autograd::Function<GemFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::autograd::Variable& x,
                                                const torch::autograd::Variable& p, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, sum_pow] = detail::_gem_forward(x, p, eps);
    ctx->saved_data["eps"] = eps;
    ctx->save_for_backward({x, p, y, sum_pow});
    return {y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_p] = detail::_gem_backward(grad_output[0], saved[0], saved[1], saved[2], saved[3], eps);
    return {grad_x, grad_p, torch::autograd::Variable()};
  }
};

at::Tensor gem_autograd(const at::Tensor& x, const at::Tensor& p, double eps) {
  return GemFunction::apply(x, p, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ops, Autograd, m) {
  m.impl(TORCH_SELECTIVE_NAME("reid_ops::gem"), TORCH_FN(gem_autograd));
}

}  // namespace reid_ops
