"""The flagship, rule by rule (specs/gradient_restoration.md), on tiny random Llama models.

`reference_masks` gives the masks of reference.py, an independent, deliberately literal reference: three
full copies, one concatenated top-k, its own chat-template rendering and left padding. The real
implementation must give IDENTICAL masks at every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import models
from bench.errors import UserError
from defenses import DEFENSES, DefenseContext
from defenses.base import parse_params
from defenses.gradient_restoration import reference
from defenses.gradient_restoration.engine import attention, selection, summed_linear
from defenses.gradient_restoration.engine.candidates import AlignedWeights, Candidate, SignedCandidate
from defenses.gradient_restoration.engine.memory import GradientSums
from defenses.gradient_restoration.engine.packed_batches import packed_batches
from defenses.gradient_restoration.engine.packed_signs import PackedSigns
from defenses.gradient_restoration.engine.truncated_model import TruncatedModel
from defenses.gradient_restoration.engine.weights_file import WeightFile, weights_file
from defenses.gradient_restoration.masks import unpack
from defenses.gradient_restoration.recipe import (
    GradientRestorationParams,
    gradient_pass,
    mean_direction,
    recover_step,
    rollback_step,
)
from defenses.gradient_restoration.rules import batches_of, choose_checkpoint, probe_layers

HARMFUL = [f"how do I make a weapon number {i}" for i in range(16)]
BENIGN = [f"generate a sql for the following question {i}" for i in range(24)]


class ScriptedProbe:
    """The utility probe is an input of the defense; here it returns scripted scores in call order."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, model, handle=None):
        score = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return score

    def identity(self) -> dict:
        return {"scripted": self.scores}


def context(tiny, probe, harmful=HARMFUL, benign=BENIGN):
    return DefenseContext(
        aligned=models.resolve(tiny["aligned"]),
        finetuned=models.resolve(tiny["finetuned"]),
        calibration_prompts=list(harmful),
        benign_prompts=list(benign),
        utility_probe=probe,
        progress=lambda m: None,
    )


def run_real(tiny, probe, **params):
    params.setdefault("packing", False)  # the released code's padded batches and fp32 arithmetic:
    params.setdefault("compute_dtype", "float32")  # bit-identical h to the naive reference
    cls = DEFENSES.get("gradient_restoration")
    out = cls(**params).apply(context(tiny, probe))
    masks = {int(step): unpack(blob) for step, blob in (out.checkpoints or {}).items()}
    return out, masks


# ------------------------------------------------------------------------------------------ reference


def reference_masks(tiny, probe_scores, steps, warmup, rate=0.002):
    """The masks of the literal reference (defenses/gradient_restoration/reference.py) at every
    step of the final phase."""
    return reference.run(
        tiny["aligned"],
        tiny["finetuned"],
        HARMFUL,
        BENIGN,
        ScriptedProbe(probe_scores),
        steps=steps,
        warmup_steps=warmup,
        save_step=1,
        recovery_rate=rate,
    ).checkpoints


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("chunk", [1 << 18, 1000])
def test_identical_masks_plain_mode(tiny, monkeypatch, chunk):
    """6 faithful plain steps (cumulative gradients): the real masks equal the naive ones at every
    step, also when each tensor is scored in chunks smaller than itself."""
    monkeypatch.setattr(selection, "CPU_CHUNK", chunk)
    scores = [1.0] * 20
    out, real = run_real(tiny, ScriptedProbe(scores), steps=6, warmup_steps=2, save_step=1, recovery_rate=0.01)
    ref = reference_masks(tiny, scores, steps=6, warmup=2, rate=0.01)
    assert not out.info["rollback_mode"]
    assert sorted(real) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        for name, mask in ref[step].items():
            assert torch.equal(real[step][name], mask), f"step {step} {name}"
    assert sum(int(m.sum()) for m in real[6].values()) > sum(int(m.sum()) for m in real[1].values()) > 0


def test_identical_masks_rollback_mode(tiny):
    """Warm-up loses utility -> rollback mode; 6 steps with rollback match the naive reference."""
    scores = [1.0, 1.0, 0.5] + [1.0] * 20  # s0, warm-up step 1, warm-up step 2 (fails: rollback)
    out, real = run_real(tiny, ScriptedProbe(scores), steps=6, warmup_steps=2, save_step=1, recovery_rate=0.01)
    ref = reference_masks(tiny, scores, steps=6, warmup=2, rate=0.01)
    assert out.info["rollback_mode"]
    assert sorted(real) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        for name, mask in ref[step].items():
            assert torch.equal(real[step][name], mask), f"step {step} {name}"
    rolled = [s["rollback_selected"] for s in out.info["steps"] if s["phase"] == "rollback"]
    assert all(r > 0 for r in rolled)


def test_tensors_the_finetune_left_unchanged_take_no_gradient_and_keep_the_masks(tiny, tmp_path):
    """A LoRA on q_proj and v_proj only: every other candidate tensor has theta_F == theta_A, can
    never qualify, and is skipped in the backward pass; the masks still equal the naive
    reference's (which takes every gradient) at every step, in fp32 and in the low_memory form."""
    from bench.tiny_models import lora_like_finetune

    pair = {
        "aligned": tiny["aligned"],
        "finetuned": lora_like_finetune(tiny["aligned"], tmp_path / "qv", targets=("q_proj", "v_proj")),
    }
    scores = [1.0] * 20
    out, real = run_real(pair, ScriptedProbe(scores), steps=4, warmup_steps=2, save_step=1, recovery_rate=0.01)
    ref = reference_masks(pair, scores, steps=4, warmup=2, rate=0.01)
    per_layer = 7  # q k v o gate up down
    assert out.info["unchanged_candidate_tensors"] == out.info["candidate_tensors"] * (per_layer - 2) // per_layer
    for step in ref:
        for name, mask in ref[step].items():
            assert torch.equal(real[step][name], mask), f"step {step} {name}"
            assert not mask.any() or "q_proj" in name or "v_proj" in name
    assert sum(int(m.sum()) for m in real[4].values()) > 0
    low, _ = run_real(
        pair,
        ScriptedProbe(scores),
        steps=2,
        warmup_steps=2,
        save_step=1,
        recovery_rate=0.01,
        compute_dtype="bfloat16",
        low_memory=True,
    )
    assert low.info["unchanged_candidate_tensors"] == out.info["unchanged_candidate_tensors"] and low.model is not None


def test_same_seed_same_masks(tiny):
    a = run_real(tiny, ScriptedProbe([1.0] * 9), steps=4, warmup_steps=2, save_step=2)[1]
    b = run_real(tiny, ScriptedProbe([1.0] * 9), steps=4, warmup_steps=2, save_step=2)[1]
    for step in a:
        for name in a[step]:
            assert torch.equal(a[step][name], b[step][name])


def test_E_is_two_thirds_of_layers():
    assert probe_layers(32) == 21 and probe_layers(18) == 12 and probe_layers(6) == 4 and probe_layers(30) == 20


def test_probe_is_last_token_with_left_padding_and_no_final_norm(tiny):
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    model = models.load_model(models.resolve(tiny["aligned"]))
    E = probe_layers(model.config.num_hidden_layers)
    alone = batches_of(tok, ["short"], 8)[0]
    padded = batches_of(tok, ["short", "a much longer prompt that forces padding of the first one"], 8)[0]
    assert padded["attention_mask"][0, 0] == 0  # left padded
    with torch.no_grad():
        ref = model.model(**alone, output_hidden_states=True).hidden_states[E][:, -1, :]
        tm = TruncatedModel(model, E, "float32", upper_source=_upper(tiny))
        assert len(models.decoder_layers(model)) == E
        h1 = tm.h(alone)
        h2 = tm.h(padded)[0:1]
    torch.testing.assert_close(h1, ref)
    torch.testing.assert_close(h2, ref, atol=1e-5, rtol=1e-4)


def test_candidates_exclude_norms_and_upper_layers_and_k_denominator(tiny):
    out, masks = run_real(tiny, ScriptedProbe([1.0] * 9), steps=2, warmup_steps=1, save_step=1)
    names = set(masks[1])
    assert names and all(
        ".layers." in n and "norm" not in n and int(n.split(".layers.")[1].split(".")[0]) < out.info["E"] for n in names
    )
    model = models.load_model(models.resolve(tiny["aligned"]))
    all_layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert out.info["N"] == all_layer_params  # faithful: all L layers incl. norms
    assert out.info["k"] == math.ceil(0.002 * all_layer_params)
    clean, _ = run_real(tiny, ScriptedProbe([1.0] * 9), steps=2, warmup_steps=1, save_step=1, mode="clean")
    assert clean.info["N"] == clean.info["N_candidates"] < all_layer_params


def test_zip_truncates_benign_batches_and_clean_uses_all(tiny):
    out, _ = run_real(tiny, ScriptedProbe([1.0] * 9), steps=1, warmup_steps=1, save_step=1)
    assert out.info["batches_per_pass"] == [2, 2]  # 16 harmful, 24 benign, batch 8: zip -> 2
    clean, _ = run_real(tiny, ScriptedProbe([1.0] * 9), steps=1, warmup_steps=1, save_step=1, mode="clean")
    assert clean.info["batches_per_pass"] == [2, 3]


def _upper(tiny):
    return WeightFile(weights_file(models.resolve(tiny["finetuned"])), "cpu", torch.float32)


def _cand(theta, grads, name="w"):
    p = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float32))
    p.grad = torch.tensor(grads, dtype=torch.float32)
    return Candidate(name, p)


def test_sign_agreement_and_strict_threshold_with_ties():
    # theta - A: qualify iff it shares a strict sign with grad; a zero diff or a zero grad never does
    aligned = AlignedWeights(held={"w": torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 0.5])})
    c = _cand([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5], grads=[3.0, 2.0, 2.0, -1.0, 5.0, 0.0, 4.0])
    restored, stats = recover_step([c], aligned, 3, strict=True, keep_previous=True)
    assert stats["qualifying"] == 4  # indices 0..3 (4 has opposite signs, 5 a zero grad, 6 a zero diff)
    assert stats["tau"] == 2.0  # 3rd largest of |g| over qualifying {3,2,2,1}
    assert restored["w"][0].tolist() == [0]  # strict '>': the ties at tau are left out
    assert restored["w"][1].tolist() == [0.0]  # theta_F's value, kept for a rollback
    assert c.param.data.tolist() == [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]  # restored by copying A
    c = _cand([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5], grads=[3.0, 2.0, 2.0, -1.0, 5.0, 0.0, 4.0])
    restored, _ = recover_step([c], aligned, 3, strict=False, keep_previous=False)
    assert sorted(restored["w"][0].tolist()) == [0, 1, 2]


def test_signed_form_restores_and_rolls_back_like_fp32():
    """The low_memory candidate answers every question of a restore and a rollback as the fp32
    one does: the same coordinates restored, the same ones rolled back, the same theta (bf16)."""
    g = torch.Generator().manual_seed(1)
    F = torch.randn(50, 8, generator=g)
    A = F + torch.randn(50, 8, generator=g) * (torch.rand(50, 8, generator=g) < 0.8)
    harm, benign = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    fp32 = _cand(F.tolist(), harm.tolist())
    signed = _signed(F, A, harm)
    aligned = AlignedWeights(held={"w": A})
    got = []
    for c in (fp32, signed):
        restored, stats = recover_step([c], aligned, 60, strict=True, keep_previous=True)
        if c is fp32:
            c.param.grad = benign.clone()
        else:
            c.grad32 = benign.clone()
        rb = rollback_step([c], restored, 0.2, strict=True)
        got.append((restored["w"][0].tolist(), stats, rb))
    assert got[0] == got[1] and got[0][2]["selected"] > 0
    assert torch.equal(signed.param.data, fp32.param.data.bfloat16())
    assert torch.equal(signed.sign, torch.sign(fp32.param.data - A).to(torch.int8))
    assert torch.equal(signed.restored_mask(A, F), fp32.restored_mask(A, F))


def test_rollback_budget_and_restriction():
    # this step restored coordinates 0..2 (theta = A there); theta_F's values were 1.0
    c = _cand([0.0, 0.0, 0.0, 0.0, 0.0], grads=[-4.0, -3.0, -2.0, -1.0, -9.0])
    restored = {"w": (torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 1.0]))}
    stats = rollback_step([c], restored, 0.5, strict=True)
    assert stats["qualifying"] == 3  # restricted to this step's coordinates; 3 and 4 are not candidates
    assert stats["k"] == math.ceil(0.5 * 3) and stats["tau"] == 3.0
    assert c.param.data.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # > tau = 3.0 goes back to theta_F


def _signed(theta, A, grads, name="w"):
    """The low_memory form of a candidate: bf16 theta, sign(theta - A), an fp32 gradient sum."""
    theta, A = torch.as_tensor(theta, dtype=torch.float32), torch.as_tensor(A, dtype=torch.float32)
    c = SignedCandidate(name, torch.nn.Parameter(theta.clone()))
    c.load(theta, A)
    c.grad32 = torch.as_tensor(grads, dtype=torch.float32)
    return c


@pytest.mark.parametrize("form", ["fp32", "signed"])
@pytest.mark.parametrize("chunk", [1 << 18, 7])
@pytest.mark.parametrize("margins_fail", [False, True])
def test_recover_step_is_exact_across_tensors(monkeypatch, margins_fail, chunk, form):
    """The one-pass selection equals one concatenated top-k over every tensor, including when
    the sampled lower bound is too high and a second pass is needed, and when each tensor is
    scored in chunks that cut across its rows; the low_memory form (theta not held, only the
    sign of theta - A) selects the same coordinates."""
    if margins_fail:
        monkeypatch.setattr(selection, "tau_lower_bound", lambda *a, **k: 1e9)
    monkeypatch.setattr(selection, "CPU_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (64, 7), (5,), (100, 20)]
    theta = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    A = {n: t + torch.randn(t.shape, generator=g) * (torch.rand(t.shape, generator=g) < 0.7) for n, t in theta.items()}
    grads = {n: torch.randn(t.shape, generator=g) ** 3 for n, t in theta.items()}
    for k in (1, 17, 500, 10_000):
        if form == "fp32":
            cands = [_cand(theta[n].tolist(), grads[n].tolist(), n) for n in theta]
        else:
            cands = [_signed(theta[n], A[n], grads[n], n) for n in theta]
        score = {
            n: torch.where(torch.sign(theta[n] - A[n]) * torch.sign(grads[n]) > 0, grads[n].abs(), 0.0) for n in theta
        }
        flat = torch.cat([v.flatten() for v in score.values()])
        qual = flat[flat > 0]
        tau = float(torch.topk(qual, k).values[-1]) if k <= len(qual) else float("-inf")
        restored, stats = recover_step(cands, AlignedWeights(held=A), k, strict=True, keep_previous=False)
        assert stats["qualifying"] == len(qual) and stats["tau"] == tau
        for c in cands:
            expect = (score[c.name].flatten() > tau) & (score[c.name].flatten() > 0)
            assert sorted(restored[c.name][0].tolist()) == expect.nonzero().flatten().tolist()
            now = torch.where(expect.view(theta[c.name].shape), A[c.name], theta[c.name])
            if form == "fp32":
                assert torch.equal(c.param.data, now)
            else:
                assert torch.equal(c.param.data, now.bfloat16()) and torch.equal(
                    c.sign, torch.sign(now - A[c.name]).to(torch.int8)
                )


def test_checkpoint_choice_edge_cases():
    fails = lambda s: s <= 0.9
    assert choose_checkpoint({5: 1.0, 10: 0.95, 15: 0.9, 20: 1.0}, fails) == 10  # first failure at 15 -> the one before
    assert choose_checkpoint({5: 1.0, 10: 1.0}, fails) == 10  # none fails -> the last
    assert choose_checkpoint({5: 0.5, 10: 1.0}, fails) is None  # the first fails -> no recovered model
    assert choose_checkpoint({5: 0.9}, lambda s: s < 0.9) == 5  # clean comparison keeps an equal score


def test_first_checkpoint_failing_reports_no_model(tiny):
    out, _ = run_real(tiny, ScriptedProbe([1.0, 0.1, 0.1, 0.1]), steps=2, warmup_steps=1, save_step=1, rollback=False)
    assert out.model is None and "no recovered model" in out.skipped


def test_output_is_finetuned_minus_delta_times_mask(tiny):
    out, masks = run_real(tiny, ScriptedProbe([1.0] * 9), steps=2, warmup_steps=1, save_step=1)
    A = dict(models.load_model(models.resolve(tiny["aligned"])).named_parameters())
    F = dict(models.load_model(models.resolve(tiny["finetuned"])).named_parameters())
    got = dict(out.model.named_parameters())
    final = masks[out.info["chosen_step"]]
    for name, p in got.items():
        if name in final:
            assert torch.equal(p.data, torch.where(final[name], A[name], F[name]).data)  # restored by copying theta_A
            torch.testing.assert_close(
                p.data, (F[name] - (F[name] - A[name]) * final[name]).data
            )  # = theta_F - Delta_F * M
        else:
            assert torch.equal(p.data, F[name].data)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(UserError, match="recovery_rate"):
        parse_params(GradientRestorationParams, {"recovery_rate": "1.5"})
    with pytest.raises(UserError, match="recovery_rate"):
        parse_params(GradientRestorationParams, {"recovery_rate": "0"})
    with pytest.raises(UserError, match="unknown parameter"):
        parse_params(GradientRestorationParams, {"steps_": "3"})
    cls = DEFENSES.get("gradient_restoration")
    with pytest.raises(UserError, match="empty"):
        cls().apply(context(tiny, ScriptedProbe([1.0]), harmful=[]))
    same = DefenseContext(
        aligned=models.resolve(tiny["aligned"]),
        finetuned=models.resolve(tiny["aligned"]),
        calibration_prompts=HARMFUL,
        benign_prompts=BENIGN,
        utility_probe=ScriptedProbe([1.0]),
        progress=lambda m: None,
    )
    with pytest.raises(UserError, match="nothing to restore"):
        cls().apply(same)
    from bench.tiny_models import make_llama

    other = tmp_path / "other"
    make_llama(other, tiny["tok"], layers=3)
    diff = DefenseContext(
        aligned=models.resolve(tiny["aligned"]),
        finetuned=models.resolve(other),
        calibration_prompts=HARMFUL,
        benign_prompts=BENIGN,
        utility_probe=ScriptedProbe([1.0]),
        progress=lambda m: None,
    )
    with pytest.raises(UserError, match="num_hidden_layers"):
        cls().apply(diff)


def test_E_override_restricts_candidates_to_the_first_E_layers(tiny):
    out, masks = run_real(tiny, ScriptedProbe([1.0] * 9), steps=1, warmup_steps=1, save_step=1, E=1)
    assert out.info["E"] == 1
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in masks[1]} == {0}
    with pytest.raises(UserError, match="decoder layers"):
        run_real(tiny, ScriptedProbe([1.0]), E=99)
    with pytest.raises(UserError, match="compute_dtype"):
        parse_params(GradientRestorationParams, {"compute_dtype": "float8"})
    with pytest.raises(UserError, match="low_memory"):
        parse_params(GradientRestorationParams, {"compute_dtype": "float32", "low_memory": "true"})


def test_bfloat16_probe_tracks_float32_and_runs(tiny):
    """compute_dtype=bfloat16 is autocast: h stays close to the fp32 h; the run records its dtype."""
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    model = models.load_model(models.resolve(tiny["aligned"]))
    E = probe_layers(model.config.num_hidden_layers)
    batch = batches_of(tok, HARMFUL[:8], 8)[0]
    with torch.no_grad():
        tm = TruncatedModel(model, E, "float32", upper_source=_upper(tiny))
        h32 = tm.h(batch)
        tm.autocast = torch.bfloat16
        h16 = tm.h(batch)
    assert h16.dtype == torch.float32
    assert not torch.equal(h16, h32)  # bf16 arithmetic really ran
    assert float((h16 - h32).norm() / h32.norm()) < 0.05
    out, masks = run_real(
        tiny, ScriptedProbe([1.0] * 9), steps=2, warmup_steps=1, save_step=1, compute_dtype="bfloat16"
    )
    assert out.info["compute_dtype"] == "bfloat16" and sum(int(m.sum()) for m in masks[2].values()) > 0


def test_packed_batches_give_the_padded_h(tiny):
    """Packing (common prefix once, block mask, positions from each prompt's start) computes the
    same h as the released code's left-padded batches, up to float rounding."""
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    model = models.load_model(models.resolve(tiny["aligned"]))
    E = probe_layers(model.config.num_hidden_layers)
    prompts = ["short", "a much longer prompt that forces padding of the first one", "kill a python process"]
    packed = packed_batches(tok, prompts, 8)[0]
    assert packed.prefix > 0  # the chat template's opening is shared
    assert packed.input_ids.shape[1] < batches_of(tok, prompts, 8)[0]["input_ids"].numel()  # fewer tokens than padded
    with torch.no_grad():
        tm = TruncatedModel(model, E, "float32", upper_source=_upper(tiny))
        h = tm.h(packed)
        torch.testing.assert_close(h, tm.h(batches_of(tok, prompts, 8)[0]), atol=1e-5, rtol=1e-4)
        models.set_attention(model, "sdpa")  # and the same h as sdpa attention
        torch.testing.assert_close(h, tm.h(packed), atol=1e-5, rtol=1e-4)


def test_packing_and_aligned_copy_keep_the_masks(tiny):
    """Packed batches (under the block mask or with block attention) and theta_A held in memory or
    streamed from its file: the same masks as the padded, streamed run at every step on the tiny model."""
    scores = [1.0] * 20
    _, ref = run_real(
        tiny, ScriptedProbe(scores), steps=4, warmup_steps=2, save_step=1, recovery_rate=0.01, aligned_copy="stream"
    )
    for params in ({"aligned_copy": "memory"}, {"packing": True}, {"packing": True, "block_attention": True}):
        out, got = run_real(
            tiny, ScriptedProbe(scores), steps=4, warmup_steps=2, save_step=1, recovery_rate=0.01, **params
        )
        assert out.info["aligned_copy"] == params.get("aligned_copy", "stream") and out.info["packing"] == params.get(
            "packing", False
        )
        assert out.info["block_attention"] == params.get("block_attention", False)
        for step in ref:
            for name, mask in ref[step].items():
                assert torch.equal(got[step][name], mask), f"{params} step {step} {name}"


def test_unused_weights_are_released_and_read_back(tiny):
    """The upper layers take no memory while the steps run; full() reads them back from theta_F."""
    model = models.load_model(models.resolve(tiny["aligned"]))
    F = dict(models.load_model(models.resolve(tiny["finetuned"])).named_parameters())
    E = probe_layers(model.config.num_hidden_layers)
    tm = TruncatedModel(model, E, "float32", upper_source=_upper(tiny))
    assert "model.norm.weight" in tm.unused and all(p.numel() == 0 for p in tm.unused.values())
    assert model.config._attn_implementation == "eager"  # gradients through eager attention on a CPU
    with tm.full() as full:
        assert len(models.decoder_layers(full)) == model.config.num_hidden_layers
        assert full.config._attn_implementation == "sdpa"  # generation with the model's own
        for name, p in tm.unused.items():
            assert torch.equal(p.data, F[name].data)
    assert all(p.numel() == 0 for p in tm.unused.values()) and len(models.decoder_layers(model)) == E


def test_bf16_signed_gradient_equals_autocast(tiny):
    """The low_memory parameter (bf16, theta not held) gives the gradient autocast gives an fp32
    parameter when a post-accumulate hook sums it; summed in the backward of its summed linear
    (q, k and v's common input cast once, MKL adding each batch's products in fp32) it is
    closer still to the fp32 gradient, and the MLP run as one summed function gives the same."""
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    batches = packed_batches(tok, HARMFUL, 8)
    names = [f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")] + [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    grads = {}
    for form in ("fp32", "autocast", "hook", "summed", "summed_mlp"):
        model = models.load_model(models.resolve(tiny["finetuned"]))
        for p in model.parameters():
            p.requires_grad_(False)
        E = probe_layers(model.config.num_hidden_layers)
        tm = TruncatedModel(model, E, "float32" if form == "fp32" else "bfloat16", upper_source=_upper(tiny))
        d = mean_direction(tm, batches)
        cands, routes = [], {}
        for name in names:
            param = dict(model.named_parameters())[name]
            c = Candidate(name, param) if form in ("fp32", "autocast") else SignedCandidate(name, param)
            param.requires_grad_(True)
            if form in ("hook", "summed", "summed_mlp"):
                c.load(
                    param.data.clone(),
                    param.data.clone(),
                    (
                        torch.empty_like(param.data, dtype=torch.bfloat16),
                        torch.empty(PackedSigns.nbytes(param.numel()), dtype=torch.uint8),
                    ),
                )
                c.grad_buffer = torch.empty(param.shape)
                assert c.param.dtype == torch.bfloat16 and not c.sign.any()
            if form == "hook":
                param.register_post_accumulate_grad_hook(c.accumulate)
            if form.startswith("summed"):
                module = model.get_submodule(name.rpartition(".")[0])
                assert summed_linear.supports(module)
                routes[module] = c.add_product
            cands.append(c)
        mlp = model.get_submodule("model.layers.0.mlp")
        mlps = {mlp: models.swiglu_parts(mlp)} if form == "summed_mlp" else {}
        with summed_linear.installed(routes, mlps):
            gradient_pass(tm, batches, d)
        assert all(type(m).forward is m.forward.__func__ for m in [*routes, *mlps])  # the class's own forward again
        grads[form] = [c.grad for c in cands]
    for hook, auto in zip(grads["hook"], grads["autocast"]):
        torch.testing.assert_close(hook, auto, atol=1e-6, rtol=1e-3)
    for summed, auto, exact in zip(grads["summed"], grads["autocast"], grads["fp32"]):
        assert summed.dtype == torch.float32 and summed.abs().sum() > 0
        assert (
            float((summed - auto).norm() / auto.norm()) < 0.1
        )  # both bf16 arithmetic (~2-7% off fp32 here): rounding apart
        if summed_linear.MKL_GEMM_BF16 is not None:
            assert (summed - exact).norm() < (auto - exact).norm()
    for whole_mlp, summed in zip(grads["summed_mlp"], grads["summed"]):  # the MLP as one function: the same arithmetic
        torch.testing.assert_close(whole_mlp, summed, atol=1e-8, rtol=1e-5)


def test_add_product_is_the_fp32_product_of_the_bf16_factors():
    """summed_linear.add_product: dy^T x of bf16 factors, in fp32 (+ out when accumulating)."""
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(37, 11, generator=g).bfloat16(), torch.randn(37, 5, generator=g).bfloat16()
    exact = dy.double().t() @ x.double()
    out = torch.full((11, 5), 7.0)
    if not summed_linear.add_product(out, dy, x, accumulate=False):
        pytest.skip("this torch carries no MKL bf16 gemm")
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    strided = dy.t().contiguous().t()
    assert not strided.is_contiguous() and summed_linear.add_product(out, strided, x, accumulate=True)
    torch.testing.assert_close(out.double(), 2 * exact, atol=1e-5, rtol=1e-5)
    assert not summed_linear.add_product(out.double(), dy, x, accumulate=True)  # not fp32: the caller's own path
    with pytest.raises(ValueError, match="do not fit"):
        summed_linear.add_product(torch.empty(3, 3), dy, x, accumulate=True)


def test_bf16_low_memory_run_output_is_exact_and_masks_track_fp32(tiny, monkeypatch):
    scores = [1.0] * 20
    out32, m32 = run_real(tiny, ScriptedProbe(scores), steps=3, warmup_steps=3, save_step=1, recovery_rate=0.01)
    out16, m16 = run_real(
        tiny,
        ScriptedProbe(scores),
        steps=3,
        warmup_steps=3,
        save_step=1,
        recovery_rate=0.01,
        compute_dtype="bfloat16",
        packing=True,
        low_memory=True,
    )
    monkeypatch.setattr(selection, "CPU_CHUNK", 1000)  # joined and scored a chunk at a time: the same masks
    _, m16_chunked = run_real(
        tiny,
        ScriptedProbe(scores),
        steps=3,
        warmup_steps=3,
        save_step=1,
        recovery_rate=0.01,
        compute_dtype="bfloat16",
        packing=True,
        low_memory=True,
    )
    assert all(torch.equal(m16[3][n], m16_chunked[3][n]) for n in m16[3])
    assert out16.info["low_memory"] and out16.info["compute_dtype"] == "bfloat16"
    inter = sum(int((m32[3][n] & m16[3][n]).sum()) for n in m32[3])
    union = sum(int((m32[3][n] | m16[3][n]).sum()) for n in m32[3])
    assert inter / union > 0.7
    A = dict(models.load_model(models.resolve(tiny["aligned"])).named_parameters())
    F = dict(models.load_model(models.resolve(tiny["finetuned"])).named_parameters())
    final = m16[out16.info["chosen_step"]]
    for name, p in out16.model.named_parameters():
        assert p.dtype == torch.float32
        expect = torch.where(final[name], A[name], F[name]) if name in final else F[name]
        assert torch.equal(p.data, expect.data), name


def test_gradient_sums_spill_and_restore(tmp_path):
    """GradientSums.spill frees the sums' memory and keeps their values in an unnamed file;
    restore() gives every candidate its sum back (and no sum to one that had none)."""
    g = torch.Generator().manual_seed(0)
    cands = [Candidate(f"w{i}", torch.nn.Parameter(torch.zeros(5, 3))) for i in range(3)]
    sums = GradientSums(cands, "cpu")
    for c in cands[:2]:
        c.param.grad = torch.randn(5, 3, generator=g)
        c.accumulate(c.param)  # into its view of the FlatBuffer
    want = {c.name: c.grad.clone() for c in cands[:2]}
    sums.spill(tmp_path)
    assert sums.buffer is None and all(c.grad is None and c.grad_buffer is None for c in cands)
    assert list(tmp_path.iterdir()) == []  # unnamed
    sums.restore()
    for c in cands[:2]:
        assert torch.equal(c.grad, want[c.name]) and c.grad.data_ptr() == c.grad_buffer.data_ptr()
    assert cands[2].grad is None and cands[2].grad_buffer is not None
    for c in cands:
        c.zero_grad()
    sums.spill(tmp_path)  # nothing to keep: freed, no file
    assert sums.file is None
    sums.restore()
    assert all(c.grad is None for c in cands)


def test_weight_file_reads_what_safetensors_reads(tmp_path):
    """WeightFile reads the format itself (see its docstring): whole tensors, every stride-th row,
    chosen rows, bf16 storage, and a truncated file is one clear error."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(37, 5, generator=g),
        "b": torch.randn(7, generator=g),
        "c": torch.randn(3, 4, generator=g).bfloat16(),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 4),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ref = load_file(str(path))
    wf = WeightFile(path, "cpu", torch.float32)
    assert wf.names() == set(tensors)
    for name, t in ref.items():
        assert torch.equal(wf.get(name), t.float()), name
        if t.dim():
            assert torch.equal(wf.get(name, stride=16), t.float()[::16]), name
    assert torch.equal(wf.rows("a", [0, 3, 36]), ref["a"][[0, 3, 36]]) and wf.shape("a") == (37, 5)
    assert torch.equal(wf.rows("c", [2]), ref["c"][[2]].float())
    with pytest.raises(UserError, match="no tensor"):
        wf.get("missing")
    header = WeightFile(path, "cpu", torch.float32)._read_header()
    last = max(
        (n for n in header if n != "__metadata__"),
        key=lambda n: (header[n]["data_offsets"][1], -header[n]["data_offsets"][0]),
    )
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        WeightFile(path, "cpu", torch.float32).get(last)


def test_packed_signs_read_and_write_like_int8():
    """PackedSigns (2 bits a value) answers every read and write as an int8 tensor would: whole,
    by chunks that start anywhere, at indices, by strided rows, with several writes in one byte."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 4, 7, 100, 1001):
        s = torch.randint(-1, 2, (n,), generator=g).float()
        p = PackedSigns.encode(s)
        assert p.data.numel() == PackedSigns.nbytes(n) == math.ceil(n / 4)
        for a in range(0, n, 3):
            for b in {a + 1, min(n, a + 9), n}:
                assert torch.equal(p.decode(a, b), s[a:b]), (n, a, b)
        idx = torch.randperm(n, generator=g)[: max(1, n // 3)]
        assert torch.equal(p.at(idx), s[idx])
        values = torch.randint(-1, 2, (len(idx),), generator=g).float()
        p.set(idx, values)
        s[idx] = values
        assert torch.equal(p.decode(0, n), s)
        p.set(idx, 0.0)
        s[idx] = 0
        assert torch.equal(p.decode(0, n), s)
    for shape in ((12, 8), (12, 7)):  # rows of a multiple of 4 values are read from their bytes
        s = torch.randint(-1, 2, shape, generator=g).float()
        assert torch.equal(PackedSigns.encode(s).rows(shape, 5), s[::5])
    out = torch.empty(8)
    assert torch.equal(PackedSigns.encode(s).decode(4, 12, out), s.view(-1)[4:12]) and torch.equal(
        out, s.view(-1)[4:12]
    )


def _h_and_gradient_under(tiny, weight: str, settings: dict) -> dict:
    """{dtype: {setting: (h, weight's gradient, bytes kept for the backward)}} of one packed
    batch, in fp32 and bf16, each setting a function that configures the TruncatedModel."""
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    batch = packed_batches(
        tok, ["short", "a much longer prompt that forces padding of the first one", "kill a python process", "x"], 8
    )[0]
    model = models.load_model(models.resolve(tiny["finetuned"]))
    assert models.plain_attention(model) and model.config.num_key_value_heads < model.config.num_attention_heads
    for p in model.parameters():
        p.requires_grad_(False)
    w = dict(model.named_parameters())[weight]
    w.requires_grad_(True)
    out = {}
    for dtype in ("float32", "bfloat16"):
        tm = TruncatedModel(model, probe_layers(model.config.num_hidden_layers), dtype, upper_source=_upper(tiny))
        assert tm.mask_attention == attention.MASKED_ATTENTION and not tm.packed_attention  # the defaults
        d = mean_direction(tm, [batch])
        out[dtype] = {}
        for name, configure in settings.items():
            configure(tm)
            w.grad, saved = None, []
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t
            ):
                h = tm.h(batch)
            (-torch.nn.functional.cosine_similarity(h.mean(0), d + 1, dim=0)).backward()
            out[dtype][name] = (h.detach(), w.grad.clone(), sum(saved))
    return out


TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def test_packed_attention_equals_the_block_mask(tiny):
    """attention.packed_attention (each prompt on the prefix and itself, block by block) gives the h
    and the gradients of eager attention under the T x T block mask, in fp32 and in bf16."""

    def blocks(tm):
        tm.packed_attention = True

    def mask(tm):
        tm.packed_attention, tm.mask_attention = False, "eager"

    for dtype, got in _h_and_gradient_under(
        tiny, "model.layers.0.self_attn.q_proj.weight", {"blocks": blocks, "mask": mask}
    ).items():
        for ours, eager in zip(got["blocks"][:2], got["mask"][:2]):
            torch.testing.assert_close(ours, eager, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_masked_attention_equals_eager(tiny):
    """attention.masked_attention (grouped query heads, softmax recomputed in the backward) gives the
    h and the gradients of transformers' eager attention under the same 4-D mask, up to float
    rounding (the grouped matmuls sum in another order), and keeps less for the backward."""

    def masked_by(name):
        return lambda tm: setattr(tm, "mask_attention", name)

    settings = {"ours": masked_by(attention.MASKED_ATTENTION), "eager": masked_by("eager")}
    for dtype, got in _h_and_gradient_under(tiny, "model.layers.0.self_attn.k_proj.weight", settings).items():
        for ours, eager in zip(got["ours"][:2], got["eager"][:2]):
            torch.testing.assert_close(ours, eager, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        assert got["ours"][2] < got["eager"][2]


def test_probe_vocabulary_and_bf16_upper_layers(tiny):
    """The truncated model holds only its prompts' rows of the input embeddings (and gives the
    same h as with the whole matrix); whole() puts the whole matrix back, and with a bf16
    `matrices_dtype` holds the upper layers' matrices in bf16 with the same autocast logits."""
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    batch = packed_batches(tok, HARMFUL[:8], 8)[0]
    model = models.load_model(models.resolve(tiny["finetuned"]))
    F = dict(models.load_model(models.resolve(tiny["finetuned"])).named_parameters())
    tm = TruncatedModel(model, probe_layers(model.config.num_hidden_layers), "bfloat16", upper_source=_upper(tiny))
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        h_whole = tm.h(batch)
        vocab = sorted(set(batch.input_ids.flatten().tolist()))
        tm.use_vocabulary("model.embed_tokens.weight", emb, vocab)
        assert emb.shape[0] == len(vocab) < model.config.vocab_size
        assert torch.equal(tm.h(batch), h_whole)
        outside = next(i for i in range(model.config.vocab_size) if i not in vocab)
        with pytest.raises(ValueError, match="vocabulary"):
            tm.input_ids(torch.tensor([[vocab[0], outside]]))
        ids = torch.tensor([[1, 5, 7, 9]])
        logits = {}
        for dtype in (None, torch.bfloat16):
            with tm.full(dtype) as full, tm.compute():
                assert torch.equal(emb.data, F["model.embed_tokens.weight"].data)
                up = dict(full.named_parameters())[
                    f"model.layers.{model.config.num_hidden_layers - 1}.mlp.up_proj.weight"
                ]
                assert up.dtype == (dtype or torch.float32)
                logits[dtype] = full(input_ids=ids).logits
            assert emb.shape[0] == len(vocab) and all(p.numel() == 0 for p in tm.unused.values())
        assert torch.equal(logits[None], logits[torch.bfloat16])
        tm.materialize()
        whole = tm.whole()
        assert all(p.dtype == torch.float32 for p in whole.parameters())
        assert torch.equal(emb.data, F["model.embed_tokens.weight"].data)
