"""Attention kernels for gradient passes (switches: the CPU default, and `block_attention`).

`masked_attention`: transformers' eager attention under a 4-D mask, keeping less for the
backward. `packed_attention`: a packed batch's attention block by block, no T x T scores. Both
compute plain grouped-query softmax attention, so they serve only the families bench.models calls
plain (`models.plain_attention`); the others keep transformers' attention under the mask.
"""

from __future__ import annotations

import torch

from bench import models
from defenses.gradient_restoration.engine.packed_batches import PackedLayout

PACKED_ATTENTION = "realign_packed"
MASKED_ATTENTION = "realign_masked"


def gradient_attention(model, device: str) -> str:
    """The attention implementation to take gradients through on `device`. On a CPU, transformers'
    eager path (two matmuls and a softmax) with a 4-D mask: its forward + backward is 30% faster
    than torch's CPU flash kernel under a mask at the probe's shapes, 11% of the flagship's
    whole gradient pass on the embedded model (bench.perf.flagship_step). Elsewhere the model's own."""
    current = getattr(model.config, "_attn_implementation", None)
    return "eager" if str(device) == "cpu" and current == "sdpa" else current


class SoftmaxValues(torch.autograd.Function):
    """softmax(scores, fp32).to(v's dtype) @ v, keeping only the scores and v for its backward and
    computing the softmax again there: the same operations, forward and backward, as autograd runs
    through transformers' eager attention (softmax in fp32, cast, matmul; `_softmax_backward_data`
    on the fp32 probabilities), so the same gradients, without the fp32 probabilities and their
    bf16 copy that autograd keeps (2.8 MB a layer at T = 226; the recomputed softmax is ~1% of a
    gradient pass)."""

    @staticmethod
    def forward(ctx, scores, v):
        ctx.save_for_backward(scores, v)
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)

    @staticmethod
    def backward(ctx, dout):
        scores, v = ctx.saved_tensors
        p = torch.softmax(scores, dim=-1, dtype=torch.float32)
        dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dout)
        dp = torch.matmul(dout, v.transpose(-1, -2)).to(torch.float32)
        return torch._softmax_backward_data(dp, p, -1, torch.float32).to(scores.dtype), dv


def masked_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention under a 4-D additive mask, for a gradient pass: the query
    heads of each key/value head in one matmul against that head's keys (no repeat_kv copies of
    keys and values, which the backward would keep), the softmax through `SoftmaxValues`.
    query [B, H, T, d]; key, value [B, Hkv, Tk, d]; mask [B, 1, T, Tk]; returns [B, T, H, d]."""
    if dropout:
        raise ValueError("masked_attention has no dropout (it serves gradient passes of a model in eval mode)")
    B, H, T, d = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    g = H // Hkv
    scores = query.reshape(B, Hkv, g * T, d).matmul(key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = (scores.view(B, H, T, Tk) + attention_mask).view(B, Hkv, g * T, Tk)
    out = SoftmaxValues.apply(scores, value)  # [B, Hkv, g * T, d]
    return out.view(B, H, T, d).transpose(1, 2).contiguous(), None


def packed_attention(
    module, query, key, value, attention_mask, scaling, dropout=0.0, packed_layout: PackedLayout = None, **kwargs
):
    """Attention of a packed sequence (PackedLayout) computed block by block: the prefix causally
    on itself, each prompt on the prefix and itself, instead of a T x T score matrix under a block
    mask. The same arithmetic as transformers' eager attention (scores in the query's dtype,
    softmax in fp32, cast back) on the allowed keys only: with 8 prompts of ~25 tokens after a
    ~25-token prefix, about a sixth of the scores, and of what a gradient pass keeps of them
    (`SoftmaxValues` keeps the scores). query [1, H, T, d]; key, value
    [1, Hkv, T, d]; returns [1, T, H, d] as transformers' attention functions do."""
    lay = packed_layout
    _, H, T, d = query.shape
    Hkv = key.shape[1]
    g = H // Hkv  # query heads per key/value head (grouped-query attention)
    S, Lmax = lay.query_index.shape
    K, P = lay.key_index.shape[1], lay.prefix

    def attend(q, k, v, allowed):  # q [B, Hkv, g * Lq, d] (head-major), k/v [B, Hkv, Lk, d], allowed [B, 1, 1, Lq, Lk]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # one plain batched matmul per key/value head
        B, _, _, Lk = scores.shape
        scores = (
            scores.view(B, Hkv, g, -1, Lk).masked_fill(~allowed, torch.finfo(scores.dtype).min).view(B, Hkv, -1, Lk)
        )
        return SoftmaxValues.apply(scores, v)  # [B, Hkv, g * Lq, d]

    q, k, v = query[0].view(Hkv, g, T, d), key[0], value[0]
    parts = []
    if P:
        causal = torch.ones(P, P, dtype=torch.bool, device=query.device).tril()
        parts.append(
            attend(q[:, :, :P].reshape(1, Hkv, g * P, d), k[None, :, :P], v[None, :, :P], causal).view(H, P, d)
        )
    # index_select, not advanced indexing: its backward is an index_add, several times faster on a
    # CPU than the sorting index_put that advanced indexing's backward runs
    qs = (
        q.index_select(2, lay.query_index.view(-1))
        .view(Hkv, g, S, Lmax, d)
        .permute(2, 0, 1, 3, 4)
        .reshape(S, Hkv, g * Lmax, d)
    )
    ks = k.index_select(1, lay.key_index.view(-1)).view(Hkv, S, K, d).transpose(0, 1)  # [S, Hkv, K, d]
    vs = v.index_select(1, lay.key_index.view(-1)).view(Hkv, S, K, d).transpose(0, 1)
    out = attend(qs, ks, vs, lay.allowed).view(S, H, Lmax, d)
    parts.append(out.transpose(0, 1).reshape(H, S * Lmax, d).index_select(1, lay.keep))
    return torch.cat(parts, dim=1).transpose(0, 1)[None].contiguous(), None


_OURS = {PACKED_ATTENTION: packed_attention, MASKED_ATTENTION: masked_attention}


def use(model, implementation: str) -> None:
    """models.set_attention, registering ours first (transformers looks attention functions up by name)."""
    if implementation in _OURS:
        from transformers import AttentionInterface

        AttentionInterface.register(implementation, _OURS[implementation])
    models.set_attention(model, implementation)


def custom_attention_mask(model, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """allowed[b, 1, query, key] (True = may attend) in the form the model's attention wants:
    boolean for sdpa, additive (0 / most negative) for eager."""
    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
