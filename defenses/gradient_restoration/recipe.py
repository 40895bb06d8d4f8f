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
from dataclasses import dataclass

from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, check_choice, option
from defenses.gradient_restoration import rules


@dataclass
class AlgorithmOptions:
    """The method's own parameters: its mode and quirks, budgets and schedule."""

    mode: str = option("faithful", "'faithful' (the released code, quirks kept) or 'clean' (quirks fixed)")
    steps: int = option(20, "recovery steps")
    warmup_steps: int = option(5, "plain steps before the rollback decision")
    save_step: int = option(5, "checkpoint every this many steps")
    metric_drop: float = option(0.05, "largest tolerated relative drop of the task metric")
    rollback: bool = option(True, "enter rollback mode when the warm-up loses too much utility")
    rollback_rate: float = option(0.2, "share of this step's restored coordinates that may roll back")
    recovery_rate: float = option(0.002, "k = ceil(recovery_rate * N) coordinates restored per step")
    batch_size: int = option(8, "prompts per gradient batch")
    n_benign: int = option(256, "benign task prompts used (the first ones, no shuffle)")
    n_harmful: int = option(256, "at most this many calibration prompts")
    seed: int = option(42, "torch seed (the method itself is deterministic)")
    E: int = option(0, "decoder layers probed; 0 = floor(2L/3) as in the paper")
    rate_denominator: str | None = option(None, "all_layers | candidates (default from mode)")
    grad_accumulation: str | None = option(None, "cumulative | fresh (default from mode)")
    batches: str | None = option(None, "zip | all (default from mode)")
    ties: str | None = option(None, "strict | inclusive (default from mode)")
    comparison: str | None = option(None, "mixed | strict (default from mode)")

    def __post_init__(self):
        check_choice("mode", self.mode, ("faithful", "clean"))
        for name, default in (rules.FAITHFUL if self.mode == "faithful" else rules.CLEAN).items():
            setattr(self, name, default if getattr(self, name) is None else getattr(self, name))
            check_choice(name, getattr(self, name), rules.CHOICES[name])
        for name in ("recovery_rate", "rollback_rate", "metric_drop"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.E < 0:
            raise ValueError(f"E must be >= 0 (0 = floor(2L/3)), got {self.E}")
        if self.steps < 1 or self.save_step < 1 or self.batch_size < 1 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("steps >= 1, save_step >= 1, batch_size >= 1 and 0 <= warmup_steps <= steps are required")


@dataclass
class SpeedOptions:
    """Switches for time and memory only; the algorithm is the same under each. Each switch's trade-off
    (figures in BENCHMARKS.md; its engine module says how it works):
      compute_dtype    bf16 autocast, fp32 sums (auto: where native): faster; masks differ by rounding only
      packing          a batch as one sequence, the shared prefix once, no padding: fewer tokens, same h
      low_memory       theta as bf16 + 2-bit sign(theta - theta_A): 3.75 bytes a candidate less; gradient
                       sums leave memory while the probe generates; slower where bf16 is not native
      block_attention  packed attention block by block: ~1/8 of the T x T scores at 8 prompts, for long
                       prompts; ~8% slower on the embedded model on a CPU
      aligned_copy     theta_A's candidates held (fastest, +|Delta_F|) or read each step (least memory)
    """

    compute_dtype: str = option(
        "auto", "float32 (as released), bfloat16 (autocast, fp32 sums) or auto (bf16 if native)"
    )
    packing: bool = option(True, "each batch as one sequence, the common prefix once (false: padded, as released)")
    low_memory: bool = option(False, "bf16 only: theta as bf16 + 2-bit sign of theta - theta_A, summed linears")
    block_attention: bool = option(
        False, "packed only: attention block by block, not under a T x T mask (long prompts)"
    )
    aligned_copy: str = option("auto", "theta_A's candidates: memory (fastest), stream (least memory) or auto")

    def __post_init__(self):
        check_choice("compute_dtype", self.compute_dtype, ("auto", "float32", "bfloat16"))
        check_choice("aligned_copy", self.aligned_copy, ("auto", "memory", "stream"))
        if self.low_memory and self.compute_dtype == "float32":
            raise ValueError(
                "low_memory holds theta in bf16 (and 2-bit signs): it needs compute_dtype bfloat16 or auto"
            )


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
    # spec: Candidates, sign agreement; every qualifying |grad| that can reach tau
    n_qual, picked, margin = candidates_for_top_k(cands, aligned, k)
    stats = {"qualifying": n_qual, "k": k, "lower_bound_margin": margin}
    if n_qual == 0 or k == 0:
        return restored, stats | {"selected": 0, "tau": None}
    # spec: Candidates, threshold tau = k-th largest qualifying |grad| (fewer than k qualify: all are taken)
    tau = rules.kth_largest(torch.cat([s for _, _, s, _ in picked]), k) if k <= n_qual else float("-inf")
    selected = 0
    with torch.no_grad():
        for c, idx, s, a in picked:
            take = (s > tau) if strict else (s >= tau)  # spec: Candidates, STRICT > leaves ties out (faithful)
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
            parts.append((c, idx, previous, rules.score(c.sign_from(idx, previous), c.grad.view(-1)[idx])))
    n_qual = sum(int(torch.count_nonzero(s)) for *_, s in parts)
    k = math.ceil(rate * n_qual)
    if k == 0:
        return {"qualifying": n_qual, "k": 0, "selected": 0, "tau": None}
    tau = rules.kth_largest(torch.cat([s[s > 0] for *_, s in parts]), k)
    selected = 0
    with torch.no_grad():
        for c, idx, previous, s in parts:
            back = (s > tau) if strict else (s >= tau)
            c.put_back(idx, previous, back)
            selected += int(back.sum())
    return {"qualifying": n_qual, "k": k, "selected": selected, "tau": tau}


NO_CHECKPOINT = "no recovered model: the first checkpoint already lost more than metric_drop of the task metric"


@register_defense("gradient_restoration")
class GradientRestoration(Defense):
    """Gradient-guided restoration of aligned weights with rollback (Yang et al., S&P 2025)."""

    Params = GradientRestorationParams
    needs = ("calibration", "benign", "utility_probe")
    reads = ("calibration_prompts", "benign_prompts", "utility_probe")
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
        L, E = theta.L, p.E or rules.probe_layers(theta.L)  # spec: Probe, E = floor(2L/3)
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

        ctx.progress(f"gradient_restoration: L={L}, E={E}, k={k} of N={N} ({p.mode}{theta.describe()})")
        s0 = theta.score(ctx.utility_probe)  # spec: Schedule, s0 = task metric of theta_F
        min_score = s0 * (1 - p.metric_drop)
        log, checkpoints, scores = [], {}, {}  # the steps' stats; step -> bit-packed M; step -> task metric

        def checkpoint(step: int) -> None:  # spec: Schedule, checkpoint every save_step steps
            if step % p.save_step == 0:
                checkpoints[step], scores[step] = theta.masks(), theta.score(ctx.utility_probe)
                ctx.progress(
                    f"gradient_restoration: step {step}: task metric {scores[step]:.3f} (floor {min_score:.3f})"
                )

        def plain_step(step: int, phase: str) -> None:  # faithful: cumulative gradients (never zeroed)
            gradients(harmful, d_h, fresh=p.grad_accumulation == "fresh")
            log.append({"step": step, "phase": phase} | recover(keep_previous=False)[1])
            checkpoint(step)

        for step in range(1, p.warmup_steps + 1):  # spec: Schedule, warmup_steps recovery steps toward theta_A
            plain_step(step, "warmup")
        s_warm = scores[p.warmup_steps] if p.warmup_steps in scores else s0
        if p.warmup_steps and p.warmup_steps not in scores:  # the warm-up ends between two checkpoints
            s_warm = theta.score(ctx.utility_probe)
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
                rb_stats = {f"rollback_{k_}": v for k_, v in rb_stats.items()}
                log.append({"step": step, "phase": "rollback"} | stats | rb_stats)
                checkpoint(step)
        else:  # spec: Schedule, continue plain recovery steps up to `steps` (still cumulative)
            for step in range(p.warmup_steps + 1, p.steps + 1):
                plain_step(step, "plain")

        # spec: Schedule, final model: a checkpoint fails at <= min_score (faithful "mixed"; clean: <)
        fails = (lambda s: s <= min_score) if p.comparison == "mixed" else (lambda s: s < min_score)
        chosen_step = rules.choose_checkpoint(scores, fails)
        info = {"mode": p.mode, "options": {k_: getattr(p, k_) for k_ in rules.FAITHFUL}} | theta.info()
        info |= {"L": L, "E": E, "N": N, "k": k} | theta.candidate_info()
        info |= {"D_h": len(D_h), "D_b": len(D_b), "batches_per_pass": [len(harmful), len(benign)]}
        info |= {"s0": s0, "min_score": min_score, "warmup_score": s_warm, "rollback_mode": rollback_mode}
        info |= {"checkpoint_scores": {str(k_): v for k_, v in scores.items()}, "chosen_step": chosen_step}
        info["steps"] = log
        out = DefenseOutput(info=info, checkpoints=checkpoints, skipped=NO_CHECKPOINT if chosen_step is None else None)
        if chosen_step is not None:  # spec: Equivalent view, theta_F with M(chosen) copied from theta_A, from its mask
            out.model, info["restored"] = theta.rebuild(checkpoints[chosen_step])
        info["timing_s"] = theta.timings()
        return out
