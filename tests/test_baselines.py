"""Baselines (specs/baselines.md), each rule against a hand computation on tiny models."""

from __future__ import annotations

import pytest
import torch

from bench import models
from bench.errors import UserError
from defenses import DEFENSES, DefenseContext
from defenses.antidote import wanda_mask
from defenses.base import parse_params
from defenses.interpolation import interpolate
from defenses.resta import RestaParams, safety_vector
from defenses.safelora import SafeLoraParams, projection, similarity
from defenses.weights import lora_modules, state


def ctx_for(t, **kw):
    return DefenseContext(aligned=models.resolve(t["aligned"]), finetuned=models.resolve(t["finetuned"]),
                          base=models.resolve(t["base"]) if "base" in t else None, adapter=t.get("adapter"),
                          progress=lambda m: None, **kw)


def test_interpolation_endpoints_exact_and_midpoint(tiny_lora):
    cls = DEFENSES.get("interpolation")
    ctx = ctx_for(tiny_lora)
    assert cls(alpha=0.0).apply(ctx).model_path == ctx.aligned.path
    assert cls(alpha=1.0).apply(ctx).model_path == ctx.finetuned.path
    A, F = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([1.5, 1.0, -3.0])
    assert torch.equal(interpolate(A, F, 0.0), A) and torch.equal(interpolate(A, F, 1.0), F)
    torch.testing.assert_close(interpolate(A, F, 0.3), A + 0.3 * (F - A))
    out = cls(alpha=0.5).apply(ctx).model
    sA, sF = state(ctx.aligned), state(ctx.finetuned)
    got = dict(out.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name].data, (sA[name] + sF[name]) / 2)
    assert DEFENSES.get("interpolation").sweep["alpha"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(UserError, match="alpha"):
        parse_params(cls.Params, {"alpha": "1.5"})


def test_resta_arithmetic_and_dare_expectation():
    A = {"w": torch.tensor([1.0, 2.0, 3.0])}
    U = {"w": torch.tensor([0.5, 2.5, 3.0])}
    v = safety_vector(A, U, 0.0, 0)
    assert torch.equal(v["w"], torch.tensor([0.5, -0.5, 0.0]))  # theta_A - theta_U
    F = torch.tensor([2.0, 2.0, 2.0])
    assert torch.equal(F + 0.5 * v["w"], torch.tensor([2.25, 1.75, 2.0]))  # theta_F + gamma * v
    big_A = {"w": torch.ones(200_000)}
    big_U = {"w": torch.zeros(200_000)}
    d = safety_vector(big_A, big_U, 0.3, seed=1)["w"]
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # drop p
    assert torch.allclose(d[kept], torch.full_like(d[kept], 1 / 0.7))  # rescale 1/(1-p)
    assert abs(d.mean().item() - 1.0) < 0.01  # E[DARE(v)] = v
    assert torch.equal(d, safety_vector(big_A, big_U, 0.3, seed=1)["w"])  # seeded
    for bad in ({"gamma": "0"}, {"dare_p": "1.0"}, {"gamma": "-1"}):
        with pytest.raises(UserError):
            parse_params(RestaParams, bad)


def test_safelora_projection_by_hand():
    V = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    C = projection(V)  # V V^T / ||V||_F = [[1, 0], [0, 0]]
    assert torch.equal(C, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    B, A = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, 0.0]])
    # BA = [[1,0],[1,0]]; C BA = [[1,0],[0,0]]; cos = 1 / (1 * sqrt 2)
    assert abs(similarity(C, B, A) - 2 ** -0.5) < 1e-6


def test_safelora_selection_both_modes(tiny_lora):
    cls = DEFENSES.get("safelora")
    ctx = ctx_for(tiny_lora)
    out = cls(mode="number", num_proj_layers=3).apply(ctx)
    sims = out.info["similarity"]
    assert out.info["projected"] == sorted(sorted(sims, key=sims.get)[:3])
    mods = {m.weight: m for m in lora_modules(tiny_lora["adapter"])}
    sB, sA, sF = state(ctx.base), state(ctx.aligned), state(ctx.finetuned)
    got = dict(out.model.named_parameters())
    for w, m in mods.items():
        if w in out.info["projected"]:
            C = projection(sA[w] - sB[w])
            torch.testing.assert_close(got[w].data, sA[w] + m.scaling * (C @ m.B) @ m.A)
        else:
            assert torch.equal(got[w].data, sF[w])
    thr = sorted(sims.values())[4]
    out2 = cls(mode="threshold", threshold=thr).apply(ctx)
    assert sorted(out2.info["projected"]) == sorted(w for w, s in sims.items() if s <= thr)
    with pytest.raises(UserError):
        parse_params(SafeLoraParams, {"mode": "other"})


def test_safelora_without_base_is_skipped_with_reason(tiny_lora):
    t = {k: v for k, v in tiny_lora.items() if k != "base"}
    out = DEFENSES.get("safelora")().apply(ctx_for(t))
    assert out.model is None and "base" in out.skipped


def test_lora_methods_reject_full_finetunes(tiny):
    with pytest.raises(UserError, match="LoRA adapter"):
        lora_modules(None)


def test_antidote_per_row_top_fraction_by_hand():
    W = torch.tensor([[1.0, -4.0, 2.0, 0.5] * 5])  # one row, 20 columns
    x = torch.ones(20)
    x[0] = 100.0  # column 0 has a huge input: |1| * 10 is the top score
    mask = wanda_mask(W, x, 0.1)  # int(20 * 0.1) = 2 entries per row
    assert mask.sum() == 2 and mask[0, 0] and mask[0, 1]  # scores 10, then |-4| * 1 at the first -4


def test_antidote_zeroes_a_tenth_of_each_lora_row(tiny_lora):
    prompts = [f"how do I make a weapon number {i}" for i in range(10)]
    out = DEFENSES.get("antidote")().apply(ctx_for(tiny_lora, calibration_prompts=prompts))
    assert out.info["mode"] == "lora" and out.info["modules"] > 0
    expected = 0
    for m in lora_modules(tiny_lora["adapter"]):
        expected += m.A.shape[0] * int(m.A.shape[1] * 0.1) + m.B.shape[0] * int(m.B.shape[1] * 0.1)
    assert out.info["zeroed"] == expected
    sF = state(models.resolve(tiny_lora["finetuned"]))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(out.model.named_parameters())[name].data, sF[name]) or expected == 0
