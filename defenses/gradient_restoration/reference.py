"""The spec read literally, faithful mode (shared specs/gradient_restoration.md): the executable
spec, the tests' oracle (the recipe with compute_dtype=float32 packing=false must give these
masks bit for bit) and the baseline of bench.perf.flagship_step.

Written the released code's way (`sgdg_rollback_final.py`): three fp32 copies of the model cut
after layer E-1 (aligned, fine-tuned, working), every parameter of the working copy requiring a
gradient (embeddings and norms too), left-padded batches, the working copy sent to the device
before each gradient pass and back after (a no-op on a CPU-only machine), the qualifying |grad|
of every candidate concatenated into one vector for one top-k, and restore by copying masked
values. It shares no code with the recipe or its engine (its own chat-template rendering and
left padding too), so a bug there cannot pass the mask tests; it asks bench.models only to load
models and for family facts (where the layers are, which parameters are norms).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import models


@dataclass
class Result:
    checkpoints: dict[int, dict[str, torch.Tensor]]  # step -> {candidate name: M}, of the final phase
    scores: dict[int, float]  # step -> task metric of that checkpoint
    rollback_mode: bool
    chosen_step: int | None  # None: the first checkpoint already failed (no recovered model)
    L: int
    E: int
    k: int
    gradient_s: float  # the gradient passes, all steps together
    selection_s: float  # the selections and restores, all steps together


def left_padded_batches(tokenizer, prompts: list[str], batch_size: int) -> list[dict]:
    """spec: Inputs. The chat template with the assistant header, no extra special tokens, LEFT padding."""
    batches = []
    for i in range(0, len(prompts), batch_size):
        ids = [
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
            for p in prompts[i : i + batch_size]
        ]
        T = max(len(x) for x in ids)
        batches.append(
            {
                "input_ids": torch.tensor([[tokenizer.pad_token_id] * (T - len(x)) + x for x in ids]),
                "attention_mask": torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids]),
            }
        )
    return batches


def run(
    aligned: str | Path,
    finetuned: str | Path,
    harmful: list[str],
    benign: list[str],
    probe: Callable[[dict], float],
    *,
    steps: int = 20,
    warmup_steps: int = 5,
    save_step: int = 5,
    recovery_rate: float = 0.002,
    rollback_rate: float = 0.2,
    metric_drop: float = 0.05,
    batch_size: int = 8,
    device: str | None = None,
) -> Result:
    """The whole schedule. probe(M) is the task metric of theta_F with M copied from theta_A
    ({} for theta_F itself), asked for s0 and then at each checkpoint, in step order."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # the released code's choice
    tok = models.load_tokenizer(models.resolve(finetuned))
    hb, bb = left_padded_batches(tok, harmful, batch_size), left_padded_batches(tok, benign, batch_size)
    A = models.load_model(models.resolve(aligned))
    L = models.num_layers(A)
    E = (2 * L) // 3  # spec: Probe
    prefix = models.layers_prefix(A)
    N = sum(
        p.numel() for n, p in A.named_parameters() if n.startswith(prefix)
    )  # spec: Candidates, N counts all L layers, norms included
    k = math.ceil(recovery_rate * N)

    def truncated(model):  # spec: Probe, layers 0..E-1 only, no final norm
        models.set_decoder_layers(model, torch.nn.ModuleList(list(models.decoder_layers(model))[:E]))
        models.set_final_norm(model, torch.nn.Identity())
        return model

    def h(model, b):  # spec: Probe, the residual stream after layer E-1 at position -1
        out = models.decoder_stack(model)(
            input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
        )
        return out.last_hidden_state[:, -1, :]

    def direction(model, batches):  # spec: Probe, the mean of h over the whole set, no grad
        with torch.no_grad():
            model.to(device)
            d = torch.vstack([h(model, b) for b in batches]).mean(0)
            model.cpu()
        return d

    A = truncated(A)
    d_h = direction(A, hb)
    F = truncated(models.load_model(models.resolve(finetuned)))
    d_b = direction(F, bb)
    theta = truncated(
        models.load_model(models.resolve(finetuned))
    )  # the released code deep-copies F; a second load is the same memory
    norms = models.norm_parameter_names(theta)
    cand = [
        n for n, _ in theta.named_parameters() if n.startswith(prefix) and models.layer_index(n) < E and n not in norms
    ]
    pA, pF, params = dict(A.named_parameters()), dict(F.named_parameters()), dict(theta.named_parameters())
    nb = min(len(hb), len(bb))  # spec: Gradient pass, zip(harmful, benign)
    timing = {"gradient": 0.0, "selection": 0.0}

    def gradient_pass(batches, d):  # spec: Gradient pass, -cos(mean h, d), one backward per batch, summed
        t = time.perf_counter()
        theta.to(device)
        for b in batches[:nb]:
            (-torch.nn.functional.cosine_similarity(h(theta, b).mean(0), d, dim=0)).backward()
        theta.cpu()
        timing["gradient"] += time.perf_counter() - t

    def step_toward(target, budget_k=None, budget_rate=None, restrict=None):  # spec: Candidates, selection and restore
        t = time.perf_counter()
        quals, gs = {}, []
        for n in cand:
            g, diff = params[n].grad, params[n].data - target[n].data
            q = ((diff > 0) & (g > 0)) | ((diff < 0) & (g < 0))
            if restrict is not None:
                q &= restrict[n]
            quals[n] = q
            gs.append(g.abs()[q])
        allg = torch.cat(gs)  # one concatenated vector, as the released code does
        kk = budget_k if budget_k is not None else math.ceil(budget_rate * allg.numel())
        tau = (
            torch.topk(allg, kk).values[-1] if 0 < kk <= allg.numel() else -1.0
        )  # fewer than kk qualify: all are taken
        sel = {n: quals[n] & (params[n].grad.abs() > tau) for n in cand}  # STRICT >
        with torch.no_grad():
            for n in cand:
                params[n].data[sel[n]] = target[n].data[sel[n]]
        timing["selection"] += time.perf_counter() - t
        return sel

    def zero():
        for p in theta.parameters():
            p.grad = None

    def M():  # the coordinates that hold theta_A's value and differ in theta_F
        return {n: (params[n].data == pA[n].data) & (pF[n].data != pA[n].data) for n in cand}

    s0 = probe({})
    min_score = s0 * (1 - metric_drop)
    ckpt, scores = {}, {}
    for t in range(1, warmup_steps + 1):  # spec: Schedule, warm-up with cumulative gradients
        gradient_pass(hb, d_h)
        step_toward(pA, budget_k=k)
        if t % save_step == 0:
            ckpt[t] = M()
            scores[t] = probe(ckpt[t])
    s_warm = scores[warmup_steps] if warmup_steps in scores else (probe(M()) if warmup_steps else s0)
    rollback_mode = warmup_steps > 0 and s_warm < min_score
    if rollback_mode:  # spec: Schedule, rollback mode
        ckpt, scores = {}, {}
        with torch.no_grad():
            for n in cand:
                params[n].data.copy_(pF[n].data)
        for t in range(1, steps + 1):
            zero()
            gradient_pass(hb, d_h)
            m = step_toward(pA, budget_k=k)
            zero()
            gradient_pass(bb, d_b)
            step_toward(pF, budget_rate=rollback_rate, restrict=m)
            zero()
            if t % save_step == 0:
                ckpt[t] = M()
                scores[t] = probe(ckpt[t])
    else:
        for t in range(warmup_steps + 1, steps + 1):
            gradient_pass(hb, d_h)
            step_toward(pA, budget_k=k)
            if t % save_step == 0:
                ckpt[t] = M()
                scores[t] = probe(ckpt[t])
    chosen = None  # spec: Schedule, final model, the checkpoint before the first with metric <= min_score
    for t in sorted(scores):
        if scores[t] <= min_score:
            break
        chosen = t
    return Result(ckpt, scores, rollback_mode, chosen, L, E, k, timing["gradient"], timing["selection"])
