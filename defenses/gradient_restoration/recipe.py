"""Gradient-guided weight restoration with rollback (Yang, Tao, Chen, Xu, IEEE S&P 2025,
"Alleviating the Fear of Losing Alignment in LLM Fine-tuning", arXiv 2504.09757), as a recipe.

In the spec's order, with its names (L, E, d_h, d_b, k, tau), each rule tagged `# spec: <section>`.

Modes: `faithful` keeps each quirk of the released code (spec: Known quirks), `clean` fixes
each; each can also be set on its own (faithful / clean):
  rate_denominator   all_layers: k counts all L layers incl. norms / candidates: the candidates only
  grad_accumulation  cumulative in plain mode (fresh in rollback mode) / fresh: zeroed before every pass
  batches            zip: both passes cut to min(|D_h|, |D_b|) / all: each pass all of its own set
  ties               strict: |grad| > tau, ties left out (k-1 chosen) / inclusive: |grad| >= tau
  comparison         mixed: warm-up fails if s < min_score, a checkpoint if s <= / strict: < in both
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput
from defenses.gradient_restoration.rules import (
    CHOICES,
    CLEAN,
    FAITHFUL,
    choose_checkpoint,
    kth_largest,
    probe_layers,
    score,
)


@dataclass
class AlgorithmOptions:
    """The method's own parameters: its mode and quirks, budgets and schedule."""

    mode: str = field(
        default="faithful", metadata={"help": "'faithful' (the released code, quirks kept) or 'clean' (quirks fixed)"}
    )
    steps: int = field(default=20, metadata={"help": "recovery steps"})
    warmup_steps: int = field(default=5, metadata={"help": "plain steps before the rollback decision"})
    save_step: int = field(default=5, metadata={"help": "checkpoint every this many steps"})
    metric_drop: float = field(default=0.05, metadata={"help": "largest tolerated relative drop of the task metric"})
    rollback: bool = field(
        default=True, metadata={"help": "enter rollback mode when the warm-up loses too much utility"}
    )
    rollback_rate: float = field(
        default=0.2, metadata={"help": "share of this step's restored coordinates that may roll back"}
    )
    recovery_rate: float = field(
        default=0.002, metadata={"help": "k = ceil(recovery_rate * N) coordinates restored per step"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per gradient batch"})
    n_benign: int = field(default=256, metadata={"help": "benign task prompts used (the first ones, no shuffle)"})
    n_harmful: int = field(default=256, metadata={"help": "at most this many calibration prompts"})
    seed: int = field(default=42, metadata={"help": "torch seed (the method itself is deterministic)"})
    E: int = field(default=0, metadata={"help": "decoder layers probed; 0 = floor(2L/3) as in the paper"})
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
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.E < 0:
            raise ValueError(f"E must be >= 0 (0 = floor(2L/3)), got {self.E}")
        if self.steps < 1 or self.save_step < 1 or self.batch_size < 1 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("steps >= 1, save_step >= 1, batch_size >= 1 and 0 <= warmup_steps <= steps are required")


@dataclass
class SpeedOptions:
    """Switches for time and memory only (the engine's); the algorithm is the same under each.
    Measured figures are in BENCHMARKS.md; each switch's engine module says how it works.

      compute_dtype    bfloat16 (auto: where the device computes it natively: GPUs, CPUs with AVX512-BF16
                       or AMX) is faster; the gradients still sum in fp32; masks then differ from fp32's by
                       rounding only
      packing          one sequence per batch, the prompts' shared prefix once and no padding: fewer tokens,
                       the same h up to float rounding
      low_memory       theta held as bf16 plus sign(theta - theta_A) at 2 bits instead of fp32 plus autocast's
                       bf16 copies (3.75 bytes a candidate parameter less); less kept for each backward (Llama
                       family); each batch's weight gradients added to the fp32 sums in fp32 (MKL where torch
                       has it); the gradient sums leave memory while the bf16 probe generates
      block_attention  a packed batch's attention block by block (the prefix on itself, each prompt on the
                       prefix and itself): keeps ~1/8 of the T x T scores at 8 prompts, pays off for long
                       prompts, costs ~8% of a step on the embedded model on a CPU (Llama family)
      aligned_copy     theta_A's candidate tensors held (fastest, the size of Delta_F more) or read from its
                       file each step (least memory); auto streams on a CPU and holds on a GPU
    """

    compute_dtype: str = field(
        default="auto",
        metadata={"help": "float32 (as released), bfloat16 (autocast, fp32 sums) or auto (bf16 if native)"},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "each batch as one sequence, the common prefix once (false: padded, as released)"},
    )
    low_memory: bool = field(
        default=False, metadata={"help": "bf16 only: theta as bf16 + 2-bit sign of theta - theta_A, summed linears"}
    )
    block_attention: bool = field(
        default=False, metadata={"help": "packed only: attention block by block, not under a T x T mask (long prompts)"}
    )
    aligned_copy: str = field(
        default="auto", metadata={"help": "theta_A's candidates: memory (fastest), stream (least memory) or auto"}
    )

    def __post_init__(self):
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'auto', 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.low_memory and self.compute_dtype == "float32":
            raise ValueError(
                "low_memory holds theta in bf16 (plus the sign of theta - theta_A): it needs compute_dtype bfloat16 "
                "or auto"
            )
        if self.aligned_copy not in ("auto", "memory", "stream"):
            raise ValueError(f"aligned_copy must be 'auto', 'memory' or 'stream', got {self.aligned_copy!r}")


@dataclass
class GradientRestorationParams(SpeedOptions, AlgorithmOptions):
    """Both kinds as one flat dataclass (`--param low_memory=true`, `realign list`); `.speed` is the nested view."""

    def __post_init__(self):
        AlgorithmOptions.__post_init__(self)
        SpeedOptions.__post_init__(self)

    @property
    def speed(self) -> SpeedOptions:
        return SpeedOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SpeedOptions)})


def mean_direction(model, batches: list):
    """spec: Probe. The mean of h over every prompt of the set, no grad (d_h on theta_A, d_b on theta_F)."""
    import torch

    total, count = 0, 0
    with torch.no_grad():
        for b in batches:
            h = model.h(b)
            total, count = total + h.sum(0), count + h.shape[0]
    return total / count


def gradient_pass(model, batches: list, direction) -> None:
    """spec: Gradient pass. loss = -cos(mean_over_batch h, direction), one backward per batch,
    gradients SUMMED over batches (no averaging, no zero_grad between batches)."""
    import torch

    with model.compute():
        for b in batches:
            (-torch.nn.functional.cosine_similarity(model.h(b).mean(0), direction, dim=0)).backward()


def recover_step(cands: list, aligned, k: int, strict: bool, keep_previous: bool) -> tuple[dict, dict]:
    """spec: Candidates, budget, selection, restore. One recovery step toward theta_A. Returns
    ({name: (flat indices restored, what theta held there or None)}, stats)."""
    import torch

    from defenses.gradient_restoration.engine.selection import candidates_for_top_k

    restored = {c.name: (torch.empty(0, dtype=torch.long), None) for c in cands}
    n_qual, picked, margin = candidates_for_top_k(
        cands, aligned, k
    )  # spec: Candidates, sign agreement, every |grad| that can reach tau
    stats = {"qualifying": n_qual, "k": k, "lower_bound_margin": margin}
    if n_qual == 0 or k == 0:
        return restored, stats | {"selected": 0, "tau": None}
    # spec: Candidates, threshold tau = k-th largest qualifying |grad| (fewer than k qualify: all are taken)
    tau = kth_largest(torch.cat([s for _, _, s, _ in picked]), k) if k <= n_qual else float("-inf")
    selected = 0
    with torch.no_grad():
        for c, idx, s, a in picked:
            take = (
                (s > tau) if strict else (s >= tau)
            )  # spec: Candidates, STRICT > leaves the ties out (faithful quirk)
            chosen = idx[take]
            if not len(chosen):
                continue
            restored[c.name] = (chosen, c.state_at(chosen) if keep_previous else None)
            # spec: Candidates, restore: theta_i := A_i (a copy, not a gradient step)
            c.take_aligned(chosen, a[take] if a is not None else aligned.get(c.name).view(-1)[chosen])
            selected += len(chosen)
    return restored, stats | {"selected": selected, "tau": tau}


def rollback_step(cands: list, restored: dict, rate: float, strict: bool) -> dict:
    """spec: Schedule, rollback mode. One rollback step toward theta_F, restricted to this step's
    restored coordinates, budget ceil(rate * qualifying); theta_i := F_i there. The coordinates
    are few (at most k), so they are handled as sparse vectors."""
    import torch

    parts = []
    for c in cands:
        idx, previous = restored[c.name]
        if len(idx) and c.grad is not None:  # spec: Candidates, sign agreement toward theta_F, restricted to m
            parts.append((c, idx, previous, score(c.sign_from(idx, previous), c.grad.view(-1)[idx])))
    n_qual = sum(int(torch.count_nonzero(s)) for *_, s in parts)
    k = math.ceil(rate * n_qual)
    if k == 0:
        return {"qualifying": n_qual, "k": 0, "selected": 0, "tau": None}
    tau = kth_largest(torch.cat([s[s > 0] for *_, s in parts]), k)
    selected = 0
    with torch.no_grad():
        for c, idx, previous, s in parts:
            back = (s > tau) if strict else (s >= tau)
            c.put_back(idx, previous, back)
            selected += int(back.sum())
    return {"qualifying": n_qual, "k": k, "selected": selected, "tau": tau}


@register_defense("gradient_restoration")
class GradientRestoration(Defense):
    """Gradient-guided restoration of aligned weights with rollback (Yang et al., S&P 2025)."""

    Params = GradientRestorationParams
    needs = ("calibration", "benign", "utility_probe")
    # recovery_rate x steps: half, the paper's and twice the budget per step, for half and all the steps
    curve = {"recovery_rate": [0.001, 0.002, 0.004], "steps": [10, 20]}
    deviations = """
        `mode=faithful` follows the released code rule by rule (its masks are the released code's bit
        for bit with compute_dtype=float32 packing=false, tested against the literal
        re-implementation); `mode=clean` makes each quirk of the released code an explicit option
        (rate denominator, gradient accumulation, batches, ties, comparison). The speed and memory
        features (packing, bf16 autocast, streamed theta_A) change the arithmetic's rounding only.
    """

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        import torch

        from defenses.gradient_restoration.engine.working_copy import WorkingCopy

        p: GradientRestorationParams = self.params
        torch.manual_seed(p.seed)
        # spec: Inputs. D_h: harmful prompts only; D_b: the first benign task prompts, no shuffle
        D_h, D_b = ctx.calibration_prompts[: p.n_harmful], ctx.benign_prompts[: p.n_benign]
        if not D_h:
            raise UserError("gradient_restoration needs harmful calibration prompts, and the set is empty")
        if not D_b:
            raise UserError("gradient_restoration needs benign task prompts, and the set is empty")
        if ctx.utility_probe is None:
            raise UserError("gradient_restoration needs a utility probe (the task metric on a dev split)")
        theta = WorkingCopy(ctx, p.speed)  # theta_A for now
        L, E = theta.L, p.E or probe_layers(theta.L)  # spec: Probe, E = floor(2L/3)
        theta.cut_after(E)  # spec: Probe, only layers 0..E-1 are run
        harmful, benign = theta.batches(D_h, p.batch_size), theta.batches(D_b, p.batch_size)
        with theta.timed("setup_s"):
            d_h = mean_direction(theta.model, harmful)  # spec: Probe, d_h = mean h(theta_A, x) over D_h
            theta.load_finetuned(harmful + benign)  # theta := theta_F
            d_b = mean_direction(theta.model, benign)  # spec: Probe, d_b = mean h(theta_F, x) over D_b

        # spec: Candidates, budget k = ceil(recovery_rate * N); faithful N counts all L layers incl. norms
        N = theta.N_all_layers if p.rate_denominator == "all_layers" else theta.N_candidates
        k = math.ceil(p.recovery_rate * N)
        # spec: Gradient pass. zip(harmful batches, benign batches) cuts both to the shorter (faithful quirk)
        n_batches = min(len(harmful), len(benign)) if p.batches == "zip" else None
        harmful, benign = harmful[:n_batches], benign[:n_batches]
        strict = p.ties == "strict"

        def gradients(batches, direction, fresh: bool) -> None:
            with theta.summing(fresh):
                gradient_pass(theta.model, batches, direction)

        def recover(keep_previous: bool) -> tuple[dict, dict]:
            with theta.timed("selection_s"):
                return recover_step(theta.candidates, theta.aligned, k, strict, keep_previous)

        ctx.progress(
            f"gradient_restoration: L={L}, E={E}, |D_h|={len(D_h)}, |D_b|={len(D_b)}, k={k} of N={N} "
            f"({p.mode}{theta.describe()})"
        )
        s0 = theta.score(ctx.utility_probe)  # spec: Schedule, s0 = task metric of theta_F
        min_score = s0 * (1 - p.metric_drop)
        log, checkpoints, scores = [], {}, {}  # the steps' stats; step -> bit-packed M; step -> task metric

        def checkpoint(step: int) -> None:  # spec: Schedule, checkpoint every save_step steps
            if step % p.save_step:
                return
            checkpoints[step] = theta.masks()
            scores[step] = theta.score(ctx.utility_probe)
            ctx.progress(f"gradient_restoration: step {step}: task metric {scores[step]:.3f} (floor {min_score:.3f})")

        def plain_step(step: int, phase: str) -> None:  # faithful: cumulative gradients (never zeroed)
            gradients(harmful, d_h, fresh=p.grad_accumulation == "fresh")
            log.append({"step": step, "phase": phase} | recover(keep_previous=False)[1])
            checkpoint(step)

        for step in range(1, p.warmup_steps + 1):  # spec: Schedule, warmup_steps recovery steps toward theta_A
            plain_step(step, "warmup")
        s_warm = (
            scores[p.warmup_steps]
            if p.warmup_steps in scores
            else (theta.score(ctx.utility_probe) if p.warmup_steps else s0)
        )
        # spec: Schedule, rollback mode iff s < min_score (strict '<' here, '<=' in the final choice)
        rollback_mode = p.rollback and p.warmup_steps > 0 and s_warm < min_score
        if rollback_mode:
            ctx.progress(f"gradient_restoration: warm-up metric {s_warm:.3f} < {min_score:.3f}: rollback mode")
            checkpoints, scores = {}, {}
            theta.reset_to_finetuned()  # spec: Schedule, theta := theta_F and `steps` fresh steps
            for step in range(1, p.steps + 1):
                gradients(harmful, d_h, fresh=True)  # cleared before every harmful pass
                restored, stats = recover(keep_previous=True)  # mask m
                gradients(benign, d_b, fresh=True)  # ... and before and after every benign pass
                with theta.timed("selection_s"):
                    rb_stats = rollback_step(theta.candidates, restored, p.rollback_rate, strict)
                theta.zero_grads()
                log.append(
                    {"step": step, "phase": "rollback"} | stats | {f"rollback_{k_}": v for k_, v in rb_stats.items()}
                )
                checkpoint(step)
        else:  # spec: Schedule, continue plain recovery steps up to `steps` (still cumulative)
            for step in range(p.warmup_steps + 1, p.steps + 1):
                plain_step(step, "plain")

        # spec: Schedule, final model: a checkpoint fails at <= min_score (faithful "mixed"; clean: <)
        chosen_step = choose_checkpoint(
            scores, (lambda s: s <= min_score) if p.comparison == "mixed" else (lambda s: s < min_score)
        )
        info = {
            "mode": p.mode,
            "options": {k_: getattr(p, k_) for k_ in FAITHFUL},
            **theta.info(),
            "L": L,
            "E": E,
            "N": N,
            "k": k,
            **theta.candidate_info(),
            "D_h": len(D_h),
            "D_b": len(D_b),
            "batches_per_pass": [len(harmful), len(benign)],
            "s0": s0,
            "min_score": min_score,
            "warmup_score": s_warm,
            "rollback_mode": rollback_mode,
            "checkpoint_scores": {str(k_): v for k_, v in scores.items()},
            "chosen_step": chosen_step,
            "steps": log,
        }
        model = None
        if chosen_step is not None:  # spec: Equivalent view, theta_F with M(chosen) copied from theta_A, from its mask
            model, info["restored"] = theta.rebuild(checkpoints[chosen_step])
        info["timing_s"] = theta.timings()
        skipped = (
            None
            if model is not None
            else "no recovered model: the first checkpoint already lost more than metric_drop of the task metric"
        )
        return DefenseOutput(model=model, info=info, checkpoints=checkpoints, skipped=skipped)
