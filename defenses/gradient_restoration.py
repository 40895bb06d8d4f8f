"""Gradient-guided weight restoration with rollback (Yang, Tao, Chen, Xu, IEEE S&P 2025,
"Alleviating the Fear of Losing Alignment in LLM Fine-tuning", arXiv 2504.09757).

Reads top to bottom like the spec (shared specs/gradient_restoration.md), with its names:
L decoder layers, E = floor(2L/3) probed layers, d_h / d_b directions, k budget, tau threshold.

Inputs: aligned theta_A and fine-tuned theta_F, D_h = the harmful calibration prompts (prompts only),
D_b = the first benign task prompts (no shuffle), and the utility probe on the task's dev split.

The recovered model is theta_A + Delta_F * (1 - M) = theta_F - Delta_F * M for a sparse mask M, so:
- the run holds ONE working copy of the truncated model (layers < E, embeddings) plus Delta_F of the
  candidate tensors; restoring is theta[m] -= Delta_F[m];
- a checkpoint is a bit-packed mask, rebuilt on demand as theta_F - Delta_F * M;
- the k-th largest qualifying |grad| is found by a radix select over the tensors, without
  concatenating every gradient into one vector;
- the model stays on its device for the whole run.

Modes. `faithful` keeps each quirk of the released code; `clean` replaces each with an explicit
option (each can also be set on its own):
  rate_denominator  faithful "all_layers": k counts every parameter of all L layers incl. norms;
                    clean "candidates": k counts the candidate parameters only.
  grad_accumulation faithful "cumulative" in plain mode (never zeroed; fresh in rollback mode);
                    clean "fresh": zeroed before every pass in both modes.
  batches           faithful "zip": both passes use min(|D_h|, |D_b|) / batch batches;
                    clean "all": each pass uses all of its own set.
  ties              faithful "strict": select |grad| > tau (ties at tau left out, k-1 chosen);
                    clean "inclusive": select |grad| >= tau (k chosen unless values tie).
  comparison        faithful "mixed": warm-up fails if s < min_score, a checkpoint fails if
                    s <= min_score; clean "strict": both fail only when s < min_score.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from bench import models
from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput

FAITHFUL = {"rate_denominator": "all_layers", "grad_accumulation": "cumulative", "batches": "zip", "ties": "strict", "comparison": "mixed"}
CLEAN = {"rate_denominator": "candidates", "grad_accumulation": "fresh", "batches": "all", "ties": "inclusive", "comparison": "strict"}
CHOICES = {k: {FAITHFUL[k], CLEAN[k]} for k in FAITHFUL}


@dataclass
class GradientRestorationParams:
    mode: str = field(default="faithful", metadata={"help": "'faithful' (the released code, quirks kept) or 'clean' (quirks fixed)"})
    steps: int = field(default=20, metadata={"help": "recovery steps"})
    warmup_steps: int = field(default=5, metadata={"help": "plain steps before the rollback decision"})
    save_step: int = field(default=5, metadata={"help": "checkpoint every this many steps"})
    metric_drop: float = field(default=0.05, metadata={"help": "largest tolerated relative drop of the task metric"})
    rollback: bool = field(default=True, metadata={"help": "enter rollback mode when the warm-up loses too much utility"})
    rollback_rate: float = field(default=0.2, metadata={"help": "share of this step's restored coordinates that may roll back"})
    recovery_rate: float = field(default=0.002, metadata={"help": "k = ceil(recovery_rate * N) coordinates restored per step"})
    batch_size: int = field(default=8, metadata={"help": "prompts per gradient batch"})
    n_benign: int = field(default=256, metadata={"help": "benign task prompts used (the first ones, no shuffle)"})
    n_harmful: int = field(default=256, metadata={"help": "at most this many calibration prompts"})
    seed: int = field(default=42, metadata={"help": "torch seed (the method itself is deterministic)"})
    E: int = field(default=0, metadata={"help": "decoder layers probed; 0 = floor(2L/3) as in the paper"})
    compute_dtype: str = field(default="float32", metadata={"help": "float32 (the released code) or bfloat16 (autocast: faster on "
                                                                     "CPUs with AVX512-BF16 and on GPUs; gradients still accumulate in fp32)"})
    rate_denominator: str | None = field(default=None, metadata={"help": "all_layers | candidates (default from mode)"})
    grad_accumulation: str | None = field(default=None, metadata={"help": "cumulative | fresh (default from mode)"})
    batches: str | None = field(default=None, metadata={"help": "zip | all (default from mode)"})
    ties: str | None = field(default=None, metadata={"help": "strict | inclusive (default from mode)"})
    comparison: str | None = field(default=None, metadata={"help": "mixed | strict (default from mode)"})

    def __post_init__(self):
        if self.mode not in ("faithful", "clean"):
            raise ValueError(f"mode must be 'faithful' or 'clean', got {self.mode!r}")
        for name, default in (FAITHFUL if self.mode == "faithful" else CLEAN).items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif getattr(self, name) not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {sorted(CHOICES[name])}, got {getattr(self, name)!r}")
        for name in ("recovery_rate", "rollback_rate", "metric_drop"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.E < 0:
            raise ValueError(f"E must be >= 0 (0 = floor(2L/3)), got {self.E}")
        if self.steps < 1 or self.save_step < 1 or self.batch_size < 1 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("steps >= 1, save_step >= 1, batch_size >= 1 and 0 <= warmup_steps <= steps are required")


# ------------------------------------------------------------------------------------------ probe


def probe_layers(num_layers: int) -> int:
    """E = floor(2L/3): Llama-2-7B 21 of 32, Gemma-2B 12 of 18."""
    return (2 * num_layers) // 3


def batches_of(tokenizer, prompts: list[str], batch_size: int) -> list[dict]:
    """Chat template with the assistant header, no extra special tokens, LEFT padding."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        text = [models.render_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        out.append(tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False))
    return out


class TruncatedModel:
    """The working model cut after layer E-1; h(x) = residual stream there at the last token.

    The upper layers, final norm and LM head are kept aside (not copied) so the full model can be
    put back for the utility probe and for the output.
    """

    def __init__(self, model, E: int, compute_dtype: str = "float32"):
        import torch

        self.model = model
        self.E = E
        self.autocast = getattr(torch, compute_dtype) if compute_dtype != "float32" else None
        self.stack = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.all_layers = models.decoder_layers(model)
        self.norm = models.final_norm(model)
        self.truncated = torch.nn.ModuleList(list(self.all_layers)[:E])
        self._cut()

    def _cut(self):
        import torch

        _set_layers(self.model, self.truncated)
        if self.norm is not None:
            _set_final_norm(self.model, torch.nn.Identity())  # no final norm on the probe

    def full(self):
        """Context manager: the whole model (for generation), cut again on exit."""
        outer = self

        class _Full:
            def __enter__(self):
                _set_layers(outer.model, outer.all_layers)
                if outer.norm is not None:
                    _set_final_norm(outer.model, outer.norm)
                return outer.model

            def __exit__(self, *exc):
                outer._cut()

        return _Full()

    def h(self, batch) -> "torch.Tensor":
        import torch

        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.stack(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
        return out.last_hidden_state[:, -1, :].float()  # position -1 is the last real token under left padding


def _set_layers(model, layers):
    parent = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    parent.layers = layers


def _set_final_norm(model, module):
    parent = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    parent.norm = module


def mean_direction(tm: TruncatedModel, batches: list[dict]) -> "torch.Tensor":
    """Mean of h over every prompt of the set (no grad)."""
    import torch

    total, count = None, 0
    with torch.no_grad():
        for b in batches:
            h = tm.h(b)
            total = h.sum(0) if total is None else total + h.sum(0)
            count += h.shape[0]
    return total / count


def gradient_pass(tm: TruncatedModel, batches: list[dict], direction) -> float:
    """loss = -cos(mean_over_batch h, direction), one backward per batch, gradients SUMMED."""
    import torch

    total = 0.0
    for b in batches:
        loss = -torch.nn.functional.cosine_similarity(tm.h(b).mean(0), direction, dim=0)
        loss.backward()
        total += float(loss.detach())
    return total


# ------------------------------------------------------------------------------------------ selection


def kth_largest(parts: list, k: int) -> float:
    """The k-th largest of the union of non-negative float32 values, without concatenating them.

    `parts` are zero-argument callables, each returning one tensor's values (e.g. the qualifying
    |grad| of one candidate tensor), recomputed per pass so that only one tensor's values exist
    at a time. Radix select on the IEEE-754 bit patterns (monotonic for non-negative floats): a
    512-bin histogram of sign+exponent, then a 2048-bin one of the top mantissa bits inside the
    chosen bin, then an exact pick among the few values left. No library offers a k-th value
    across a list of tensors, and a concatenation would cost one more copy of every gradient.
    """
    import torch

    parts = [p if callable(p) else (lambda p=p: p) for p in parts]
    total = sum(int(p().numel()) for p in parts)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    prefix, shift, remaining = 0, 32, k
    for width in (9, 11):
        shift -= width
        counts = torch.zeros(1 << width, dtype=torch.int64)
        for part in parts:
            b = part().float().contiguous().view(torch.int32)
            if shift + width < 32:
                b = b[(b >> (shift + width)) == prefix]
            counts += torch.bincount(((b >> shift) & ((1 << width) - 1)).flatten().long(), minlength=1 << width).cpu()
        above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # above[i] = count in bins >= i
        bin_ = int((above >= remaining).nonzero().max())
        remaining -= int(above[bin_ + 1]) if bin_ + 1 < len(above) else 0
        prefix = (prefix << width) | bin_
    rest = []
    for part in parts:  # values sharing the top 20 bits of the answer: few
        b = part().float().contiguous().view(torch.int32)
        rest.append(b[(b >> shift) == prefix].cpu())
    return float(torch.topk(torch.cat(rest).view(torch.float32), remaining).values[-1])


@dataclass
class Candidate:
    """One candidate tensor: the working parameter, Delta_F, and the current restored mask."""

    name: str
    param: "torch.nn.Parameter"
    delta: "torch.Tensor"  # theta_F - theta_A
    mask: "torch.Tensor"  # True where the coordinate currently holds theta_A's value


def select(cands: list[Candidate], toward: str, k_rate: float | None, k_abs: int | None, restrict: dict | None, strict: bool) -> tuple[dict, dict]:
    """Sign agreement, the k-th largest |grad| as tau, then |grad| > tau (strict) or >= tau.

    toward 'A': theta_i - A_i = Delta_i where not yet restored, else 0.
    toward 'F': theta_i - F_i = -Delta_i where restored, else 0.
    Returns (selected masks by name, stats). k is ceil(k_rate * qualifying) when k_rate is given
    (the rollback budget), else k_abs.
    """
    import torch

    qual, parts = {}, []
    for c in cands:
        g = c.param.grad
        if g is None:
            qual[c.name] = torch.zeros_like(c.mask)
            continue
        diff = torch.where(c.mask, torch.zeros_like(c.delta), c.delta) if toward == "A" else torch.where(c.mask, -c.delta, torch.zeros_like(c.delta))
        q = ((diff > 0) & (g > 0)) | ((diff < 0) & (g < 0))
        if restrict is not None:
            q &= restrict[c.name]
        qual[c.name] = q
        parts.append(lambda g=g, q=q: g.abs()[q])
    n_qual = sum(int(q.sum()) for q in qual.values())
    k = math.ceil(k_rate * n_qual) if k_rate is not None else k_abs
    stats = {"qualifying": n_qual, "k": k}
    if n_qual == 0 or k == 0:
        return {c.name: torch.zeros_like(c.mask) for c in cands}, stats | {"selected": 0, "tau": None}
    # fewer qualifying coordinates than k: all of them are taken (tau = -inf)
    tau = kth_largest(parts, k) if k <= n_qual else float("-inf")
    chosen = {}
    for c in cands:
        g = c.param.grad
        if g is None:
            chosen[c.name] = torch.zeros_like(c.mask)
        else:
            chosen[c.name] = qual[c.name] & ((g.abs() > tau) if strict else (g.abs() >= tau))
    return chosen, stats | {"selected": sum(int(m.sum()) for m in chosen.values()), "tau": tau}


def pack(masks: dict) -> bytes:
    """Bit-packed masks (one bit per coordinate) as a safetensors blob."""
    import numpy as np
    import torch
    from safetensors.torch import save

    return save({name: torch.from_numpy(np.packbits(m.cpu().numpy().reshape(-1))) for name, m in masks.items()},
                metadata={name: ",".join(map(str, m.shape)) for name, m in masks.items()})


def unpack(blob: bytes) -> dict:
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import load

    packed = load(blob)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        with safe_open(f.name, "pt") as st:
            shapes = st.metadata()
    out = {}
    for name, bits in packed.items():
        shape = tuple(int(s) for s in shapes[name].split(","))
        n = math.prod(shape)
        out[name] = torch.from_numpy(np.unpackbits(bits.numpy())[:n].astype(bool)).reshape(shape)
    return out


# ------------------------------------------------------------------------------------------ the defense


@register_defense("gradient_restoration")
class GradientRestoration(Defense):
    """Gradient-guided restoration of aligned weights with rollback (Yang et al., S&P 2025)."""

    Params = GradientRestorationParams
    needs = ("calibration", "benign", "probe")

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        import torch
        from safetensors import safe_open

        p: GradientRestorationParams = self.params
        torch.manual_seed(p.seed)
        t_start = time.perf_counter()
        timing = {"gradient_s": 0.0, "selection_s": 0.0, "probe_s": 0.0}
        D_h = ctx.calibration_prompts[: p.n_harmful]
        D_b = ctx.benign_prompts[: p.n_benign]
        if not D_h:
            raise UserError("gradient_restoration needs harmful calibration prompts, and the set is empty")
        if not D_b:
            raise UserError("gradient_restoration needs benign task prompts, and the set is empty")
        if ctx.probe is None:
            raise UserError("gradient_restoration needs a utility probe (the task metric on a dev split)")
        tok = ctx.tokenizer()
        check_compatible(ctx)

        # --- the aligned model first: d_h = mean h(theta_A, x) over D_h
        model = ctx.load("aligned")
        L = models.num_layers(model)
        E = p.E or probe_layers(L)
        if E > L:
            raise UserError(f"gradient_restoration: E={E} but the model has only {L} decoder layers")
        norms = models.norm_parameter_names(model)
        prefix = models.layers_prefix(model)
        N_all = sum(p_.numel() for n, p_ in model.named_parameters() if n.startswith(prefix))
        upper = {n for n, _ in model.named_parameters() if (models.layer_index(n) or 0) >= E and n.startswith(prefix)}
        tm = TruncatedModel(model, E, p.compute_dtype)
        for param in model.parameters():
            param.requires_grad_(False)
        harmful = batches_of(tok, D_h, p.batch_size)
        benign = batches_of(tok, D_b, p.batch_size)
        t0 = time.perf_counter()
        d_h = mean_direction(tm, harmful)

        # --- load theta_F into the same module; keep Delta_F for candidate tensors only
        with tm.full():
            cands = _load_finetuned(model, _weights_file(ctx.finetuned), str(ctx.device), prefix, E, set(norms), upper)
        if not any(bool((c.delta != 0).any()) for c in cands):
            raise UserError("the fine-tuned model equals the aligned model in every candidate weight: nothing to restore")
        N_cand = sum(c.param.numel() for c in cands)
        d_b = mean_direction(tm, benign)
        timing["gradient_s"] += time.perf_counter() - t0

        N = N_all if p.rate_denominator == "all_layers" else N_cand
        k = math.ceil(p.recovery_rate * N)
        n_batches = min(len(harmful), len(benign))
        harmful_used = harmful[:n_batches] if p.batches == "zip" else harmful
        benign_used = benign[:n_batches] if p.batches == "zip" else benign
        strict = p.ties == "strict"

        def zero_grads():
            for c in cands:
                c.param.grad = None

        def harmful_grad(fresh: bool):
            nonlocal timing
            if fresh:
                zero_grads()
            t = time.perf_counter()
            gradient_pass(tm, harmful_used, d_h)
            timing["gradient_s"] += time.perf_counter() - t

        weights = _weights_file(ctx.finetuned)

        def reload_finetuned(only_masked: bool) -> None:
            """theta := theta_F exactly, read from the file (never rebuilt as (F - D) + D)."""
            with torch.no_grad(), safe_open(str(weights), "pt", device=str(ctx.device)) as st:
                for c in cands:
                    if only_masked and not bool(c.mask.any()):
                        continue
                    c.param.data.copy_(st.get_tensor(c.name).to(c.param.dtype))
                    c.mask.zero_()

        def recover(keep_previous: bool) -> tuple[dict, dict, dict]:
            """One recovery step toward theta_A: theta[m] -= Delta[m]. Returns (m, stats, old values)."""
            t = time.perf_counter()
            chosen, stats = select(cands, "A", None, k, None, strict)
            previous = {}
            with torch.no_grad():
                for c in cands:
                    m = chosen[c.name]
                    if keep_previous:  # theta_F's values of this step's coordinates, for an exact rollback
                        previous[c.name] = c.param.data[m].clone()
                    c.param.data[m] -= c.delta[m]
                    c.mask |= m
            timing["selection_s"] += time.perf_counter() - t
            return chosen, stats, previous

        def roll_back(chosen: dict, previous: dict) -> dict:
            """One rollback step toward theta_F, restricted to this step's mask m."""
            t = time.perf_counter()
            back, stats = select(cands, "F", p.rollback_rate, None, chosen, strict)
            with torch.no_grad():
                for c in cands:
                    b = back[c.name]
                    c.param.data[b] = previous[c.name][b[chosen[c.name]]]
                    c.mask &= ~b
            timing["selection_s"] += time.perf_counter() - t
            return stats

        def probe_score() -> float:
            t = time.perf_counter()
            with torch.no_grad(), tm.full() as full:
                score = ctx.probe(full, handle=ctx.finetuned)
            timing["probe_s"] += time.perf_counter() - t
            return score

        ctx.progress(f"gradient_restoration: L={L}, E={E}, |D_h|={len(D_h)}, |D_b|={len(D_b)}, k={k} of N={N} ({p.mode})")
        s0 = probe_score()
        min_score = s0 * (1 - p.metric_drop)
        fails_final = (lambda s: s <= min_score) if p.comparison == "mixed" else (lambda s: s < min_score)
        log: list[dict] = []
        checkpoints: dict[int, bytes] = {}
        scores: dict[int, float] = {}

        def checkpoint(step: int) -> None:
            checkpoints[step] = pack({c.name: c.mask for c in cands})
            scores[step] = probe_score()
            ctx.progress(f"gradient_restoration: step {step}: task metric {scores[step]:.3f} (floor {min_score:.3f})")

        # --- warm-up: plain recovery steps toward theta_A (cumulative gradients in faithful mode)
        fresh = p.grad_accumulation == "fresh"
        for step in range(1, p.warmup_steps + 1):
            harmful_grad(fresh)
            _, stats, _ = recover(keep_previous=False)
            log.append({"step": step, "phase": "warmup"} | stats)
            if step % p.save_step == 0:
                checkpoint(step)
        s_warm = scores.get(p.warmup_steps, probe_score() if p.warmup_steps else s0)
        # the released code compares with '<' here and '<=' in the final choice (comparison=mixed)
        rollback_mode = p.rollback and p.warmup_steps > 0 and s_warm < min_score

        if rollback_mode:
            ctx.progress(f"gradient_restoration: warm-up metric {s_warm:.3f} < {min_score:.3f}: rollback mode")
            checkpoints.clear()
            scores.clear()
            reload_finetuned(only_masked=True)  # reset theta := theta_F
            for step in range(1, p.steps + 1):
                harmful_grad(fresh=True)  # cleared before every harmful pass
                chosen, stats, previous = recover(keep_previous=True)
                zero_grads()  # ... and before and after every benign pass
                t = time.perf_counter()
                gradient_pass(tm, benign_used, d_b)
                timing["gradient_s"] += time.perf_counter() - t
                rb_stats = roll_back(chosen, previous)
                zero_grads()
                log.append({"step": step, "phase": "rollback"} | stats | {f"rollback_{k_}": v for k_, v in rb_stats.items()})
                if step % p.save_step == 0:
                    checkpoint(step)
        else:
            for step in range(p.warmup_steps + 1, p.steps + 1):
                harmful_grad(fresh)
                _, stats, _ = recover(keep_previous=False)
                log.append({"step": step, "phase": "plain"} | stats)
                if step % p.save_step == 0:
                    checkpoint(step)

        chosen_step = choose_checkpoint(scores, fails_final)
        zero_grads()
        info = {
            "mode": p.mode, "options": {k_: getattr(p, k_) for k_ in FAITHFUL}, "compute_dtype": p.compute_dtype, "L": L, "E": E, "N": N, "N_all_layers": N_all,
            "N_candidates": N_cand, "k": k, "candidate_tensors": len(cands), "D_h": len(D_h), "D_b": len(D_b),
            "batches_per_pass": [len(harmful_used), len(benign_used)], "s0": s0, "min_score": min_score, "warmup_score": s_warm,
            "rollback_mode": rollback_mode, "checkpoint_scores": {str(k_): v for k_, v in scores.items()}, "chosen_step": chosen_step,
            "steps": log,
        }
        if chosen_step is None:
            info["timing_s"] = {k_: round(v, 2) for k_, v in timing.items()} | {"total": round(time.perf_counter() - t_start, 2)}
            return DefenseOutput(skipped="no recovered model: the first checkpoint already lost more than metric_drop of the task metric", info=info, checkpoints=checkpoints)

        # --- the answer: theta_F - Delta_F * M(chosen), rebuilt from its bit-packed mask
        masks = unpack(checkpoints[chosen_step])
        reload_finetuned(only_masked=False)
        with torch.no_grad():
            for c in cands:
                m = masks[c.name].to(c.param.device)
                c.param.data[m] -= c.delta[m]
                c.mask.copy_(m)
                c.param.requires_grad_(False)
        _set_layers(model, tm.all_layers)
        if tm.norm is not None:
            _set_final_norm(model, tm.norm)
        info["restored"] = int(sum(int(m.sum()) for m in masks.values()))
        info["timing_s"] = {k_: round(v, 2) for k_, v in timing.items()} | {"total": round(time.perf_counter() - t_start, 2)}
        return DefenseOutput(model=model, info=info, checkpoints=checkpoints)


def _load_finetuned(model, weights, device: str, prefix: str, E: int, norms: set, upper: set) -> list[Candidate]:
    """theta := theta_F in place (the full model); returns the candidate tensors with Delta_F.

    A function of its own so that the safetensors mapping of theta_F is released when it returns:
    held for the run, its pages count in the process's RSS (about one more model)."""
    import torch
    from safetensors import safe_open

    cands: list[Candidate] = []
    with torch.no_grad(), safe_open(str(weights), "pt", device=device) as st:
        keys = set(st.keys())
        for name, param in model.named_parameters():  # the FULL model: upper layers get theta_F too
            if name not in keys:
                continue  # tied lm_head
            F = st.get_tensor(name).to(param.dtype)
            if F.shape != param.shape:
                raise UserError(f"aligned and fine-tuned models differ in shape at {name}: {tuple(param.shape)} vs {tuple(F.shape)}")
            if name in upper:
                param.data.copy_(F)  # upper layers: theta_F, never changed
                continue
            delta = F - param.data
            param.data.copy_(F)
            idx = models.layer_index(name)
            if name.startswith(prefix) and idx is not None and idx < E and name not in norms:
                param.requires_grad_(True)
                cands.append(Candidate(name, param, delta, torch.zeros_like(param, dtype=torch.bool)))
    return cands


def choose_checkpoint(scores: dict[int, float], fails) -> int | None:
    """Checkpoints in step order; stop at the first that fails; answer the one before it.

    None fails -> the last; the first fails -> None (no recovered model)."""
    previous = None
    for step in sorted(scores):
        if fails(scores[step]):
            return previous
        previous = step
    return previous


def check_compatible(ctx: DefenseContext) -> None:
    """Same architecture, shapes and tokenizer, or one clear line."""
    import json

    a = json.loads((ctx.aligned.path / "config.json").read_text())
    f = json.loads((ctx.finetuned.path / "config.json").read_text())
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"):
        if a.get(key) != f.get(key):
            raise UserError(f"aligned and fine-tuned models differ in {key} ({a.get(key)} vs {f.get(key)}): they must share one architecture")
    ta = models.load_tokenizer(ctx.aligned)
    if ta.get_vocab() != ctx.tokenizer().get_vocab():
        raise UserError("aligned and fine-tuned models have different tokenizers: they must share one")


def _weights_file(handle: models.ModelHandle):
    files = sorted(handle.path.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"{handle.name}: expected one .safetensors file, found {len(files)} (sharded checkpoints are not supported yet)")
    return files[0]
