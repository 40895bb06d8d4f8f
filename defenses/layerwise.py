"""Walk a decoder one layer at a time on a calibration set (the SparseGPT / Wanda way).

    def visit(index, layer, feed):
        ...register hooks on the layer's linear modules...
        feed()                      # runs this layer on its current inputs
        ...change the layer's weights...
    walk_layers(model, batches, visit)

Layer i+1's inputs are computed from layer i AFTER `visit` changed it, as the pruning and
compensation methods expect. Hooks see only real tokens: `feed` passes the padding mask along,
and `real_tokens(x, mask)` drops padded positions.
"""

from __future__ import annotations

from typing import Callable

from bench import models


class _Caught(Exception):
    """Stops the forward pass once layer 0's inputs are caught."""


def walk_layers(model, batches: list[dict], visit: Callable) -> None:
    import torch

    layers = models.decoder_layers(model)
    device = next(model.parameters()).device  # the tokenizer's batches are on the CPU
    batches = [{k: b[k].to(device) for k in ("input_ids", "attention_mask")} for b in batches]
    inputs, kwargs = [], []

    def catch(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            try:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            except _Caught:
                pass
    handle.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    current = {"mask": None}

    with torch.no_grad():
        for index, layer in enumerate(layers):

            def feed(layer=layer):
                for hs, kw, mask in zip(inputs, kwargs, masks):
                    current["mask"] = mask
                    layer(hs, **kw)
                current["mask"] = None

            visit(index, layer, feed, current)
            inputs = [_hidden(layer(hs, **kw)) for hs, kw in zip(inputs, kwargs)]


def real_tokens(x, current: dict):
    """[batch, seq, features] -> [real tokens, features] (padding dropped)."""
    mask = current.get("mask")
    if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out
