"""GeM pooling (reid_ops.gem and its PyTorch twin reid.gem_pytorch) on NaN, +-Inf and values whose powers overflow or
underflow, forward and backward, against a float64 reference written from the definition.

What is correct, case by case (the reference, `gem_definition`):
- a plane holding NaN or +Inf: what the plain expression x.clamp(min=eps).pow(p).mean((-2, -1)).pow(1 / p) gives in
  float64, and autograd's gradients through it (NaN -> NaN, +Inf -> +Inf; -Inf is clamped to eps like any value below
  it). Autograd is followed to the letter, e.g. with p = 1 a NaN plane's gradient is finite (NaN^0 = 1), and dL/dp is
  NaN as soon as one plane is NaN or +Inf;
- a finite plane: the definition's value, which lies between eps and the plane's largest value, so it is always
  representable, also where x^p overflows or underflows an intermediate (bf16/float32 1e30 with p >= 3 overflows
  float32; float64 1e200 with p >= 2 overflows float64 itself, so the plain float64 expression is Inf there and is NOT
  the reference; an all-zero plane with p = 6.5 has eps^p = 1e-39, below float32's normal range). The reference
  computes it in the log domain, log y = (logsumexp(p log max(x, eps)) - log HW) / p, in float64; the test
  `test_reference_is_the_plain_float64_expression_where_that_is_representable` checks that this is the plain float64
  expression wherever that expression neither overflows nor underflows.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import reid
import reid_ops

EPS = 1e-6


def gem_definition(x: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """GeM in float64 from its definition (module docstring): (N, C, H, W) -> (N, C), differentiable in x and p."""
    x, p = x.double(), p.double()
    clamped = x.clamp(min=eps)
    finite = torch.isfinite(clamped).all(dim=(-2, -1), keepdim=True)
    # each branch sees the value 1 where it is not selected, so its backward pass cannot leak NaN through torch.where
    log_values = torch.where(finite, clamped, 1.0).log().flatten(-2)
    log_mean = torch.logsumexp(p * log_values, dim=-1) - math.log(log_values.shape[-1])
    from_logs = (log_mean / p).exp()
    plain = torch.where(finite, 1.0, clamped).pow(p).mean((-2, -1)).pow(1.0 / p)
    return torch.where(finite.flatten(-3), from_logs, plain)


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


HUGE = {torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e200}
# half the largest bf16 / float32 value; for float64 1e300, which leaves the float64 reference's autograd room (its
# intermediate dL/dy * y * HW / p would overflow closer to float64's largest value)
NEAR_MAX = {torch.bfloat16: 1.69e38, torch.float32: 1.70e38, torch.float64: 1e300}
CASES = ["finite", "one_nan", "all_nan", "pos_inf", "neg_inf", "inf_and_nan", "huge", "near_max", "zero_plane", "tiny"]
P_VALUES = [0.5, 1.0, 3.0, 6.5]
DTYPES = [torch.bfloat16, torch.float32, torch.float64]


def make_input(case: str, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """(3, 4, 5, 6) float64 values (about half below eps: clamped); the case changes some planes, the others stay
    ordinary, so ordinary and special planes meet in one call."""
    x = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
    nan, inf = float("nan"), float("inf")
    if case == "one_nan":
        x[1, 2, 3, 4] = nan
    elif case == "all_nan":
        x[0, 1] = nan
    elif case == "pos_inf":
        x[1, 2, 3, 4] = inf
        x[2, 0, 0, 0] = inf
        x[2, 0, 1, 1] = inf
    elif case == "neg_inf":
        x[1, 2, 3, 4] = -inf
        x[2, 3] = -inf
    elif case == "inf_and_nan":
        x[1, 2, 3, 4] = inf
        x[1, 2, 0, 0] = nan
        x[0, 3, 2, 2] = inf
    elif case == "huge":
        x[1] *= HUGE[dtype]
        x[2, 0, 0, 0] = HUGE[dtype]
    elif case == "near_max":
        x[0, :2] = torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) * NEAR_MAX[dtype]
    elif case == "zero_plane":  # an all-zero plane (common after ReLU): y = eps; eps^6.5 underflows float32
        x[1, 1] = 0.0
        x[2, 3] = -1.0
    elif case == "tiny":  # positive values just above eps: x^6.5 underflows float32
        x[0, 2] = EPS * (1 + 4 * torch.rand(5, 6, generator=generator, dtype=torch.float64))
    return x.to(dtype)


def run(function, x: torch.Tensor, p_value: float, grad_y: torch.Tensor):
    """Output, dL/dx and dL/dp for L = sum(grad_y * y)."""
    x = x.detach().clone().requires_grad_(True)
    p_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = torch.tensor([p_value], dtype=p_dtype, device=x.device, requires_grad=True)
    y = function(x, p, EPS)
    (y.double() * grad_y).sum().backward()
    return y.detach(), x.grad, p.grad


TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.mark.parametrize("function", ["reid_ops.gem", "reid.gem_pytorch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("p_value", P_VALUES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gem_matches_the_definition_nan_inf_and_overflow_included(dtype, case, p_value, channels_last, function):
    generator = seeded("gem", str(dtype), case, p_value, channels_last)
    x = make_input(case, dtype, generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    y, grad_x, grad_p = run(reid_ops.gem if function == "reid_ops.gem" else reid.gem_pytorch, x, p_value, grad_y)
    y_ref, grad_x_ref, grad_p_ref = run(gem_definition, x.double(), p_value, grad_y)
    tol = max(TOLERANCE[dtype], TOLERANCE[y.dtype])  # gem_pytorch rounds its output and dL/dy to float32

    # forward: NaN exactly where the reference has NaN, Inf exactly where it has Inf (of the same sign), the rest
    # within the dtype's tolerance of the reference rounded to the output's dtype (gem_pytorch outputs float32)
    expected_y = y_ref.to(y.dtype).double()
    torch.testing.assert_close(y.double(), expected_y, rtol=tol, atol=0, equal_nan=True)
    if case in ("finite", "neg_inf", "huge", "near_max", "zero_plane", "tiny"):
        assert torch.isfinite(y_ref).all()  # finite inputs: a finite result, whatever x^p does (module docstring)

    # backward: dL/dx elementwise (NaN / Inf positions included); dL/dp NaN exactly when the reference's is
    assert grad_x.dtype == x.dtype
    if case == "near_max" and function == "reid.gem_pytorch" and dtype != torch.float64:
        return  # autograd's intermediate dL/dy * y * HW / p exceeds float32's range (reid_ops uses float64 there)
    scale = grad_x_ref[torch.isfinite(grad_x_ref)].abs().max()
    torch.testing.assert_close(grad_x.double(), grad_x_ref, rtol=tol, atol=tol * float(scale), equal_nan=True)
    assert torch.isnan(grad_p).item() == torch.isnan(grad_p_ref).item()
    if not torch.isnan(grad_p_ref):
        # dL/dp sums one term per plane: tolerance relative to the size of those terms
        size = float((grad_y.abs() * y_ref.abs()).sum()) * (1.0 + abs(math.log(EPS)))
        torch.testing.assert_close(grad_p.double(), grad_p_ref, rtol=tol, atol=tol * size)


def test_reference_is_the_plain_float64_expression_where_that_is_representable():
    """The log-domain reference equals x.clamp(min=eps).pow(p).mean().pow(1/p) in float64, output and gradients, on
    inputs where that expression neither overflows nor underflows (and on NaN / Inf planes, where it is the rule)."""
    for seed, p_value in enumerate(P_VALUES):
        generator = seeded("reference", seed)
        x = torch.randn(4, 3, 6, 5, generator=generator, dtype=torch.float64) * 10
        x[1, 1, 2, 2] = float("nan")
        x[2, 0, 1, 3] = float("inf")
        grad_y = torch.randn(4, 3, generator=generator, dtype=torch.float64)

        def plain(values, p, eps):
            return values.clamp(min=eps).pow(p).mean((-2, -1)).pow(1.0 / p)

        for got, expected in zip(run(gem_definition, x, p_value, grad_y), run(plain, x, p_value, grad_y), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck in float64 where the result is finite, ordinary, huge and tiny planes together


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("p_value", [0.5, 3.0, 8.5])
def test_gem_gradcheck_with_overflowing_and_underflowing_planes(p_value, channels_last):
    """Finite differences need perturbations relative to the values, so the function checked is
    z -> gem(z * s) / s with a per-channel scale s: 1 (ordinary plane), 1e200 (x^p overflows float64 for p >= 2) and
    1e-36 with eps = 1e-37 (x^8.5 = 1e-306 is below float64's normal range); z stays away from the clamp's kink."""
    generator = seeded("gradcheck", p_value, channels_last)
    z = (torch.rand(2, 3, 4, 3, generator=generator, dtype=torch.float64) + 0.2).requires_grad_()
    p = torch.tensor([p_value], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 1e200, 1e-36], dtype=torch.float64)

    def scaled_gem(z, p):
        x = z * scale[:, None, None]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return reid_ops.gem(x, p, 1e-37) / scale

    assert torch.isfinite(scaled_gem(z, p)).all()
    assert torch.autograd.gradcheck(scaled_gem, (z, p))


def test_gem_refuses_an_eps_below_float32_normal_range_and_a_non_finite_p():
    x = torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="eps"):
        reid_ops.gem(x, torch.tensor([3.0]), 1e-40)
    reid_ops.gem(x, torch.tensor([3.0]), float(torch.finfo(torch.float32).tiny))  # the smallest accepted
    for p_value in (float("inf"), float("nan"), -1.0):
        with pytest.raises(RuntimeError, match="p must be a finite number > 0"):
            reid_ops.gem(x, torch.tensor([p_value]))


@pytest.mark.skipif(not (torch.cuda.is_available() and reid_ops.compiled_with_cuda()), reason="needs the CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gem_cuda_matches_the_definition_on_the_same_cases(dtype):
    """The CUDA kernel shares gem_math.h with the CPU one: same reference, same cases (one p per case, both layouts)."""
    for index, case in enumerate(CASES):
        p_value = P_VALUES[index % len(P_VALUES)]
        generator = seeded("gem-cuda", str(dtype), case)
        x = make_input(case, dtype, generator)
        grad_y = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        y_ref, grad_x_ref, grad_p_ref = run(gem_definition, x.double(), p_value, grad_y)
        for layout in (torch.contiguous_format, torch.channels_last):
            xd = x.cuda().contiguous(memory_format=layout)
            y, grad_x, grad_p = run(reid_ops.gem, xd, p_value, grad_y.cuda())
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(y.cpu().double(), y_ref.to(dtype).double(), rtol=tol, atol=0, equal_nan=True)
            scale = float(grad_x_ref[torch.isfinite(grad_x_ref)].abs().max())
            torch.testing.assert_close(grad_x.cpu().double(), grad_x_ref, rtol=tol, atol=tol * scale, equal_nan=True)
            assert torch.isnan(grad_p).item() == torch.isnan(grad_p_ref).item()
