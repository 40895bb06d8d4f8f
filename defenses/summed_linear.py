"""A bf16 linear layer whose backward adds its weight gradient straight into an fp32 sum.

Why by hand: autograd computes a Linear's weight gradient as the transpose of X^T dY, so the
gradient it hands to AccumulateGrad is a transposed view, which AccumulateGrad copies into a
fresh contiguous tensor before a hook can add it to the fp32 sum. On the embedded model that copy
and the add, both from main memory, were ~30% of a low_memory gradient pass (torch.profiler:
~0.75 s of 2.4 s). Here dY^T X is computed in (out, in) order and added to the sum while it is
still in the cache; nothing else changes: the same bf16 matmuls (x cast to bf16 as autocast
casts it, dX = dY W cast back to x's dtype, as autocast's cast backward does) and one fp32 add of
each batch's bf16 weight gradient, as before. PyTorch's CPU matmul cannot write bf16 products
into an fp32 output (`out_dtype` is CUDA-only), which would have fused the add too.
"""

from __future__ import annotations

import contextlib

import torch


class _SummedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x16, weight, add_gradient):
        ctx.save_for_backward(x16, weight)
        ctx.x_dtype, ctx.add_gradient = x.dtype, add_gradient
        return torch.nn.functional.linear(x16, weight)

    @staticmethod
    def backward(ctx, dy):
        x16, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        ctx.add_gradient(dy2.t().mm(x16.reshape(-1, x16.shape[-1])))
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
        add_down(flat(dy).t().mm(flat(a * u)))
        dp = dy.matmul(w_down)
        du = dp * a
        dg = torch.ops.aten.silu_backward(dp * u, g)
        add_up(flat(du).t().mm(flat(x16)))
        add_gate(flat(dg).t().mm(flat(x16)))
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


def summed_forward(module: torch.nn.Linear, add_gradient, cast: _CastOnce):
    """A forward for `module` (bias-free, bf16 weight) that calls add_gradient(dW) in backward."""

    def forward(x):
        return _SummedLinear.apply(x, cast(x, module.weight.dtype), module.weight, add_gradient)

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
    """Within: each module of `routes` ({linear: add_gradient}) runs as a summed linear, and each
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
