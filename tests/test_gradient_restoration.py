"""The flagship, rule by rule (specs/gradient_restoration.md), on tiny random Llama models.

`naive_run` is an independent, deliberately literal reference: three full copies, the full model
with output_hidden_states, one concatenated top-k. The real implementation must give IDENTICAL
masks at every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import models
from bench.errors import UserError
from defenses import DEFENSES, DefenseContext
from defenses.base import parse_params
from defenses.gradient_restoration import (
    GradientRestorationParams,
    TruncatedModel,
    batches_of,
    choose_checkpoint,
    kth_largest,
    probe_layers,
    select,
    Candidate,
    unpack,
)

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


def context(tiny, probe, harmful=HARMFUL, benign=BENIGN):
    return DefenseContext(aligned=models.resolve(tiny["aligned"]), finetuned=models.resolve(tiny["finetuned"]),
                          calibration_prompts=list(harmful), benign_prompts=list(benign), probe=probe, progress=lambda m: None)


def run_real(tiny, probe, **params):
    cls = DEFENSES.get("gradient_restoration")
    out = cls(**params).apply(context(tiny, probe))
    masks = {int(step): unpack(blob) for step, blob in (out.checkpoints or {}).items()}
    return out, masks


# ------------------------------------------------------------------------------------------ reference


def naive_run(tiny, probe_scores, steps, warmup, rate=0.002, rollback_rate=0.2, batch=8, save_step=1):
    """The spec read literally; returns {step: {name: mask}} for the checkpoints of the final phase."""
    tok = models.load_tokenizer(models.resolve(tiny["finetuned"]))
    A = models.load_model(models.resolve(tiny["aligned"]))
    F = models.load_model(models.resolve(tiny["finetuned"]))
    theta = models.load_model(models.resolve(tiny["finetuned"]))
    L = theta.config.num_hidden_layers
    E = (2 * L) // 3
    pA, pF = dict(A.named_parameters()), dict(F.named_parameters())
    cand = [n for n, _ in theta.named_parameters() if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) < E and "norm" not in n]
    N = sum(p.numel() for n, p in theta.named_parameters() if ".layers." in n)
    k = math.ceil(rate * N)
    for n, p in theta.named_parameters():
        p.requires_grad_(n in cand)

    def h(model, b):
        out = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True, use_cache=False)
        return out.hidden_states[E][:, -1, :]  # output of layer E-1 (before any final norm, E < L)

    hb = batches_of(tok, HARMFUL, batch)
    bb = batches_of(tok, BENIGN, batch)
    with torch.no_grad():
        d_h = torch.cat([h(A, b) for b in hb]).mean(0)
        d_b = torch.cat([h(F, b) for b in bb]).mean(0)
    nb = min(len(hb), len(bb))
    params = dict(theta.named_parameters())
    M = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in cand}
    scores = iter(probe_scores)

    def pass_(batches, d):
        for b in list(batches)[:nb]:
            (-torch.nn.functional.cosine_similarity(h(theta, b).mean(0), d, dim=0)).backward()

    def step_toward(target, budget_k=None, budget_rate=None, restrict=None):
        quals, gs = {}, []
        for n in cand:
            g = params[n].grad
            diff = params[n].data - target[n].data
            q = ((diff > 0) & (g > 0)) | ((diff < 0) & (g < 0))
            if restrict is not None:
                q &= restrict[n]
            quals[n] = q
            gs.append(g.abs()[q])
        allg = torch.cat(gs)  # one concatenated vector, as the released code does
        kk = budget_k if budget_k is not None else math.ceil(budget_rate * allg.numel())
        tau = torch.topk(allg, kk).values[-1] if kk <= allg.numel() else -1.0
        sel = {n: quals[n] & (params[n].grad.abs() > tau) for n in cand}
        with torch.no_grad():
            for n in cand:
                params[n].data[sel[n]] = target[n].data[sel[n]]
        return sel

    def zero():
        for n in cand:
            params[n].grad = None

    s0 = next(scores)
    min_score = s0 * 0.95
    ckpt = {}
    for t in range(1, warmup + 1):
        pass_(hb, d_h)
        sel = step_toward(pA, budget_k=k)
        for n in cand:
            M[n] |= sel[n]
        if t % save_step == 0:
            ckpt[t] = {n: M[n].clone() for n in cand}
            last = next(scores)
    s_warm = last
    if s_warm < min_score:
        ckpt = {}
        with torch.no_grad():
            for n in cand:
                params[n].data.copy_(pF[n].data)
                M[n].zero_()
        for t in range(1, steps + 1):
            zero()
            pass_(hb, d_h)
            m = step_toward(pA, budget_k=k)
            for n in cand:
                M[n] |= m[n]
            zero()
            pass_(bb, d_b)
            back = step_toward(pF, budget_rate=rollback_rate, restrict=m)
            for n in cand:
                M[n] &= ~back[n]
            zero()
            if t % save_step == 0:
                ckpt[t] = {n: M[n].clone() for n in cand}
                next(scores)
    else:
        for t in range(warmup + 1, steps + 1):
            pass_(hb, d_h)
            sel = step_toward(pA, budget_k=k)
            for n in cand:
                M[n] |= sel[n]
            if t % save_step == 0:
                ckpt[t] = {n: M[n].clone() for n in cand}
                next(scores)
    return ckpt


# ------------------------------------------------------------------------------------------ tests


def test_identical_masks_plain_mode(tiny):
    """6 faithful plain steps (cumulative gradients): the real masks equal the naive ones at every step."""
    scores = [1.0] * 20
    out, real = run_real(tiny, ScriptedProbe(scores), steps=6, warmup_steps=2, save_step=1, recovery_rate=0.01)
    ref = naive_run(tiny, scores, steps=6, warmup=2, rate=0.01)
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
    ref = naive_run(tiny, scores, steps=6, warmup=2, rate=0.01)
    assert out.info["rollback_mode"]
    assert sorted(real) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        for name, mask in ref[step].items():
            assert torch.equal(real[step][name], mask), f"step {step} {name}"
    rolled = [s["rollback_selected"] for s in out.info["steps"] if s["phase"] == "rollback"]
    assert all(r > 0 for r in rolled)


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
        tm = TruncatedModel(model, E)
        assert len(models.decoder_layers(model)) == E
        h1 = tm.h(alone)
        h2 = tm.h(padded)[0:1]
    torch.testing.assert_close(h1, ref)
    torch.testing.assert_close(h2, ref, atol=1e-5, rtol=1e-4)


def test_candidates_exclude_norms_and_upper_layers_and_k_denominator(tiny):
    out, masks = run_real(tiny, ScriptedProbe([1.0] * 9), steps=2, warmup_steps=1, save_step=1)
    names = set(masks[1])
    assert names and all(".layers." in n and "norm" not in n and int(n.split(".layers.")[1].split(".")[0]) < out.info["E"] for n in names)
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


def _cand(values, grads, delta, mask=None):
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))
    p.grad = torch.tensor(grads, dtype=torch.float32)
    d = torch.tensor(delta, dtype=torch.float32)
    return Candidate("w", p, d, torch.zeros_like(d, dtype=torch.bool) if mask is None else torch.tensor(mask))


def test_sign_agreement_and_strict_threshold_with_ties():
    # theta - A = delta. qualify iff delta and grad share a sign; zero delta or zero grad never
    c = _cand([0.0] * 6, grads=[3.0, 2.0, 2.0, -1.0, 5.0, 0.0], delta=[1.0, 1.0, 1.0, -1.0, -1.0, 1.0])
    chosen, stats = select([c], "A", None, 3, None, strict=True)
    assert stats["qualifying"] == 4  # indices 0,1,2,3 (4 has opposite signs, 5 has zero grad)
    assert stats["tau"] == 2.0  # 3rd largest of |g| over qualifying {3,2,2,1}
    assert chosen["w"].tolist() == [True, False, False, False, False, False]  # strict '>': the ties at tau are left out
    chosen, _ = select([c], "A", None, 3, None, strict=False)
    assert chosen["w"].tolist() == [True, True, True, False, False, False]


def test_rollback_budget_and_restriction():
    # coordinates 0..3 restored (mask True); toward F: theta - F = -delta there
    c = _cand([0.0] * 5, grads=[-4.0, -3.0, -2.0, -1.0, -9.0], delta=[1.0] * 5, mask=[True, True, True, True, False])
    restrict = {"w": torch.tensor([True, True, True, False, False])}
    chosen, stats = select([c], "F", 0.5, None, restrict, strict=True)
    assert stats["qualifying"] == 3  # restricted to this step's mask; index 4 is not restored
    assert stats["k"] == math.ceil(0.5 * 3)
    assert chosen["w"].tolist() == [True, False, False, False, False]  # > tau = 3.0


def test_kth_largest_matches_topk_across_tensors():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(1000, generator=g) ** 3 for _ in range(7)] + [torch.zeros(10), torch.full((5,), 0.5)]
    flat = torch.cat(parts)
    for k in (1, 2, 17, 1000, 3333, flat.numel()):
        assert kth_largest(parts, k) == float(torch.topk(flat, k).values[-1])


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
            expect = torch.where(final[name], F[name] - (F[name] - A[name]), F[name])
            assert torch.equal(p.data, expect.data)
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
    same = DefenseContext(aligned=models.resolve(tiny["aligned"]), finetuned=models.resolve(tiny["aligned"]),
                          calibration_prompts=HARMFUL, benign_prompts=BENIGN, probe=ScriptedProbe([1.0]), progress=lambda m: None)
    with pytest.raises(UserError, match="nothing to restore"):
        cls().apply(same)
    from tests.conftest import make_llama

    other = tmp_path / "other"
    make_llama(other, tiny["tok"], layers=3)
    diff = DefenseContext(aligned=models.resolve(tiny["aligned"]), finetuned=models.resolve(other),
                          calibration_prompts=HARMFUL, benign_prompts=BENIGN, probe=ScriptedProbe([1.0]), progress=lambda m: None)
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


def test_bfloat16_probe_tracks_float32_and_runs(tiny):
    """compute_dtype=bfloat16 is autocast: h stays close to the fp32 h; the run records its dtype."""
    tok = models.load_tokenizer(models.resolve(tiny["aligned"]))
    model = models.load_model(models.resolve(tiny["aligned"]))
    E = probe_layers(model.config.num_hidden_layers)
    batch = batches_of(tok, HARMFUL[:8], 8)[0]
    with torch.no_grad():
        tm = TruncatedModel(model, E)
        h32 = tm.h(batch)
        tm.autocast = torch.bfloat16
        h16 = tm.h(batch)
    assert h16.dtype == torch.float32
    assert not torch.equal(h16, h32)  # bf16 arithmetic really ran
    assert float((h16 - h32).norm() / h32.norm()) < 0.05
    out, masks = run_real(tiny, ScriptedProbe([1.0] * 9), steps=2, warmup_steps=1, save_step=1, compute_dtype="bfloat16")
    assert out.info["compute_dtype"] == "bfloat16" and sum(int(m.sum()) for m in masks[2].values()) > 0
