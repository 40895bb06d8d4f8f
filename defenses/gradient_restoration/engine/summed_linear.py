"""A bf16 linear layer (and a gated-SiLU MLP) whose backward adds its weight gradients straight
into fp32 sums.

Why by hand: autograd computes a Linear's weight gradient as the transpose of X^T dY, so the
gradient it hands to AccumulateGrad is a transposed view, which AccumulateGrad copies into a
fresh contiguous tensor before a hook can add it to the fp32 sum. Here the backward hands the two
factors (dY, X) to the owner of the sum, which adds dY^T X in one call of MKL's bf16 gemm with
fp32 accumulation where torch carries it (`add_product`), else as a bf16 matmul plus an fp32 add.
Everything else is what autograd runs through the module under autocast: the same bf16 matmuls
(x cast to bf16 as autocast casts it, dX = dY W cast back to x's dtype, as autocast's cast
backward does).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)


def _mkl_gemm_bf16():
    """MKL's cblas_gemm_bf16bf16f32 (C = alpha op(A) op(B) + beta C, A and B bf16, C fp32), which
    x86 builds of torch carry inside libtorch_cpu; None where it is not there. Why by hand: torch's
    CPU matmul has no bf16 x bf16 -> fp32 form (`out_dtype` is CUDA-only), and this one adds a
    batch's weight gradient into the fp32 sum in the same call, accumulating in fp32: ~2x faster on
    the embedded model's shapes than a bf16 matmul plus an fp32 add, and without rounding each
    batch's gradient to bf16 first (bench.perf.flagship_step; tests). The symbol is not part of
    torch's API, so a torch build may drop it: it is looked up once, here, and its absence logged."""
    try:
        fn = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        log.info(
            "libtorch_cpu has no cblas_gemm_bf16bf16f32: summed linears add each bf16 weight gradient to the fp32 "
            "sum instead"
        )
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return fn


MKL_GEMM_BF16 = _mkl_gemm_bf16()  # None: add_product declines and its callers take the fallback


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_INT_MAX = 2**31 - 1  # MKL_INT of the LP64 interface


def add_product(out, dy, x, accumulate: bool) -> bool:
    """out (fp32 [m, n]) := dy^T x (+ out if accumulate), dy [k, m] and x [k, n] bf16, by MKL in
    fp32. False (nothing done) where MKL's kernel is missing or the tensors do not suit it: the
    caller then adds the bf16 product dy^T x itself."""
    fn = MKL_GEMM_BF16
    if (
        fn is None
        or out.device.type != "cpu"
        or out.dtype != torch.float32
        or dy.dtype != torch.bfloat16
        or x.dtype != torch.bfloat16
        or not out.is_contiguous()
        or max(out.numel(), dy.numel(), x.numel()) > _INT_MAX
    ):
        return False
    dy, x = dy.contiguous(), x.contiguous()
    (k, m), n = dy.shape, x.shape[1]
    if out.shape != (m, n) or x.shape[0] != k:
        raise ValueError(f"add_product: out {tuple(out.shape)}, dy {tuple(dy.shape)}, x {tuple(x.shape)} do not fit")
    fn(
        _ROW_MAJOR,
        _TRANS,
        _NO_TRANS,
        m,
        n,
        k,
        1.0,
        dy.data_ptr(),
        m,
        x.data_ptr(),
        n,
        1.0 if accumulate else 0.0,
        out.data_ptr(),
        n,
    )
    return True


class _SummedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x16, weight, add_to_sum):
        ctx.save_for_backward(x16, weight)
        ctx.x_dtype, ctx.add_to_sum = x.dtype, add_to_sum
        return torch.nn.functional.linear(x16, weight)

    @staticmethod
    def backward(ctx, dy):
        x16, weight = ctx.saved_tensors
        ctx.add_to_sum(dy.reshape(-1, dy.shape[-1]), x16.reshape(-1, x16.shape[-1]))  # dW = dy^T x
        dx = dy.matmul(weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None  # the weight's gradient is in the sum: autograd gets none


class _SummedSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) in bf16, as a Llama-family MLP computes it under autocast, with
    the three weight gradients added to their sums in the backward. It keeps x (bf16), gate(x)
    and up(x) for the backward and computes silu and the product again there: autograd through
    the module would also keep silu(gate(x)) and the product (1.4 MB a layer at T = 226). The
    backward runs the operations autograd runs (silu_backward, the two products, the matmuls)."""

    @staticmethod
    def forward(ctx, x, x16, w_gate, w_up, w_down, adds):
        F = torch.nn.functional
        g, u = F.linear(x16, w_gate), F.linear(x16, w_up)
        ctx.save_for_backward(x16, g, u, w_gate, w_up, w_down)
        ctx.x_dtype, ctx.adds = x.dtype, adds
        return F.linear(F.silu(g) * u, w_down)

    @staticmethod
    def backward(ctx, dy):
        x16, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        add_gate, add_up, add_down = ctx.adds
        flat = lambda t: t.reshape(-1, t.shape[-1])
        a = torch.nn.functional.silu(g)
        add_down(flat(dy), flat(a * u))
        dp = dy.matmul(w_down)
        du = dp * a
        dg = torch.ops.aten.silu_backward(dp * u, g)
        add_up(flat(du), flat(x16))
        add_gate(flat(dg), flat(x16))
        dx = dg.matmul(w_gate).to(ctx.x_dtype) + du.matmul(w_up).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None


class _CastOnce:
    """x cast to the weights' dtype, shared by consecutive linears that read the same x (q, k and
    v read one normed hidden state, gate and up another): one bf16 copy kept for their backward
    passes instead of one each, as autocast makes (~16 MB of a gradient pass on the embedded
    model). Holds the last x and its cast only."""

    def __init__(self):
        self.x = self.version = self.x16 = None

    def __call__(self, x, dtype):
        if x is not self.x or x._version != self.version or self.x16.dtype != dtype:
            self.x, self.version, self.x16 = x, x._version, x.detach().to(dtype)
        return self.x16


def summed_forward(module: torch.nn.Linear, add_to_sum, cast: _CastOnce):
    """A forward for `module` (bias-free, bf16 weight) whose backward calls add_to_sum(dy, x), the
    two factors of the weight gradient dy^T x (flattened to [tokens, features])."""

    def forward(x):
        return _SummedLinear.apply(x, cast(x, module.weight.dtype), module.weight, add_to_sum)

    return forward


def supports(module) -> bool:
    """A bias-free nn.Linear with a bf16 weight (a bias would need autocast's cast of it too)."""
    return isinstance(module, torch.nn.Linear) and module.bias is None and module.weight.dtype == torch.bfloat16


def swiglu_forward(gate, up, down, adds: tuple, cast: _CastOnce):
    """A forward for a gated-SiLU MLP (models.swiglu_parts) whose three weight gradients go to adds."""

    def forward(x):
        return _SummedSwiGLU.apply(x, cast(x, gate.weight.dtype), gate.weight, up.weight, down.weight, adds)

    return forward


@contextlib.contextmanager
def installed(routes: dict, mlps: dict | None = None):
    """Within: each module of `routes` ({linear: add_to_sum}) runs as a summed linear, and each
    of `mlps` ({mlp: its (gate, up, down) linears}, all three in routes) as one summed MLP."""
    cast = _CastOnce()
    mlps = mlps or {}
    forwards = {module: summed_forward(module, add, cast) for module, add in routes.items()}
    forwards |= {mlp: swiglu_forward(*parts, tuple(routes[m] for m in parts), cast) for mlp, parts in mlps.items()}
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in forwards:
            del module.forward  # back to the class's own forward
        cast.__init__()
