"""RESTA: restoring safety through task arithmetic (Bhardwaj et al., ACL 2024).

theta = theta_F + gamma * (theta_A - theta_U), where theta_U is theta_A fine-tuned on harmful pairs
only (the un-aligned model). theta_U is calibrated to the attack, as the flagship paper's RESTA
fine-tunes it: LoRA at a CONSTANT learning rate at least the attack's (default: the attack's own),
batch 10, first for as many steps as the attack's epochs over the pairs, then twice as many, until
theta_U's harmful rate on the calibration prompts (the context's harm probe: the setting's
generation and judge) is at least the attacked model's; the rates of every round go into the
row's info. A weaker theta_U (the spec's lr 5e-5 with decay for 50 steps) gave a safety vector
about 0.2x the fine-tuning delta here, and nothing checked how harmful it was. Each theta_U is
built by the context's fine-tune service (the suite's training stage) and cached like any model,
so every gamma of a sweep reuses it. Optional DARE on the safety vector: drop each coordinate with
probability p and rescale the rest by 1/(1-p), seeded. Inputs: aligned, fine-tuned, harmful pairs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from bench import models
from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, FineTuneSpec, option
from defenses.weights import lazy_state

ATTACK_LR = 2e-4  # the testbed attack's learning rate: theta_U's when the context does not say the attack's


@dataclass
class RestaParams:
    gamma: float = option(1.0, "strength of the safety vector (flagship authors 1.0; 0.5 elsewhere)")
    dare_p: float = option(0.0, "DARE drop probability on the safety vector (0 = off)")
    unalign_pairs: int = option(100, "harmful pairs theta_U is fine-tuned on")
    unalign_lr: float | None = option(
        None,
        "constant learning rate of theta_U's LoRA fine-tune (none: the attack's, else 2e-4)",
    )
    unalign_steps: int | None = option(
        None,
        "steps of the first calibration round (none: the attack's epochs over the pairs)",
    )
    unalign_rounds: int = option(
        3,
        "calibration rounds at most, each twice the steps of the last, until theta_U is as harmful",
    )
    unalign_batch: int = option(10, "batch size of the un-aligning fine-tune")
    seed: int = option(0, "seed of DARE and of the un-aligning fine-tune")

    def __post_init__(self):
        if not 0.0 < self.gamma <= 10.0:
            raise ValueError(f"gamma must be in (0, 10], got {self.gamma}")
        if not 0.0 <= self.dare_p < 1.0:
            raise ValueError(f"dare_p must be in [0, 1), got {self.dare_p}")
        if self.unalign_pairs < 1 or self.unalign_batch < 1 or self.unalign_rounds < 1:
            raise ValueError("unalign_pairs, unalign_batch and unalign_rounds must be >= 1")
        if (self.unalign_steps is not None and self.unalign_steps < 1) or (self.unalign_lr or 1) <= 0:
            raise ValueError("unalign_steps must be >= 1 and unalign_lr > 0")


def safety_vector_items(A, U, keys: list[str], dare_p: float, seed: int):
    """(name, theta_A - theta_U) one tensor at a time, in `keys` order, with DARE (drop p, rescale
    1/(1-p)) when p > 0; A and U map a name to its tensor (a dict, or a file read lazily)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for k in keys:
        v = A[k] - U[k]
        if dare_p > 0:
            keep = torch.rand(v.shape, generator=gen) >= dare_p
            v = torch.where(keep, v / (1.0 - dare_p), torch.zeros_like(v))
        yield k, v


def safety_vector(A: dict, U: dict, dare_p: float, seed: int) -> dict:
    """theta_A - theta_U as a dict (every tensor at once; apply() streams them instead)."""
    return dict(safety_vector_items(A, U, list(A), dare_p, seed))


def calibrate(train_and_measure: Callable[[int], float], target: float, steps: int, rounds: int) -> list[dict]:
    """Train for `steps`, then twice as many, ... until the measured harmful rate reaches `target`
    or `rounds` are spent; returns [{steps, harmful_rate}] per round (the last is the one used)."""
    history = []
    for _ in range(rounds):
        history.append({"steps": steps, "harmful_rate": train_and_measure(steps)})
        if history[-1]["harmful_rate"] >= target:
            break
        steps *= 2
    return history


@register_defense("resta")
class Resta(Defense):
    """theta_F + gamma (theta_A - theta_U), theta_U = theta_A fine-tuned on harmful pairs until it is
    as harmful as the attacked model (Bhardwaj et al., ACL 2024)."""

    Params = RestaParams
    needs = ("harmful_pairs", "fine_tune", "harm_probe")
    reads = ()  # its pairs and harm probe key it through cache_inputs
    curve = {"gamma": [0.25, 0.5, 1.0, 2.0, 3.0]}  # theta_U is built once and reused by every gamma
    deviations = """
        theta_U is calibrated to the attack as the flagship paper's RESTA does (a constant learning
        rate at least the attack's, here the attack's own; its steps doubled until its harmful rate on
        the calibration prompts reaches the attacked model's), not the spec's lr 5e-5 with decay for
        50 steps, which left theta_U far less harmful than the attack (a safety vector about 0.2x the
        fine-tuning delta). theta_U learns the testbed's harmful pairs (the base model's own compliant
        answers) where the authors used BeaverTails. The safety vector covers every weight of the
        merged models. DARE is off unless dare_p is given. theta_U's harmful rates (each round's) are
        in each row's info.
    """

    def cache_inputs(self, ctx: DefenseContext) -> dict:
        from bench.hashing import hash_value

        p: RestaParams = self.params
        return {
            "harm_probe": ctx.harm_probe.identity() if ctx.harm_probe else None,
            "unalign_lr": self.learning_rate(ctx),
            # theta_U's training pairs: the setting's harmful pairs can change under the same fine-tuned model
            "harmful_pairs": hash_value(ctx.harmful_pairs[: p.unalign_pairs]),
        }

    def learning_rate(self, ctx: DefenseContext) -> float:
        p: RestaParams = self.params
        if p.unalign_lr is not None:
            return p.unalign_lr
        return float(((ctx.attack or {}).get("sft") or {}).get("lr", ATTACK_LR))

    def first_steps(self, ctx: DefenseContext) -> int:
        """The attack's epochs over theta_U's pairs (2 epochs of 100 pairs at batch 10: 20 steps)."""
        p: RestaParams = self.params
        if p.unalign_steps is not None:
            return p.unalign_steps
        epochs = float(((ctx.attack or {}).get("sft") or {}).get("epochs", 2.0))
        return max(1, math.ceil(epochs * p.unalign_pairs / p.unalign_batch))

    def unaligned(self, ctx: DefenseContext, steps: int):
        p: RestaParams = self.params
        spec = FineTuneSpec(
            method="lora",
            lr=self.learning_rate(ctx),
            lr_scheduler="constant",
            batch_size=p.unalign_batch,
            max_steps=steps,
            seed=p.seed,
        )
        return ctx.fine_tune(ctx.aligned, ctx.harmful_pairs[: p.unalign_pairs], spec)

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        p: RestaParams = self.params
        if len(ctx.harmful_pairs) < p.unalign_pairs:
            raise UserError(
                f"resta needs {p.unalign_pairs} harmful pairs to build theta_U, and {len(ctx.harmful_pairs)} were "
                f"given: give more, or write the row resta:unalign_pairs={len(ctx.harmful_pairs)}"
            )
        for service, name, runner_class in (
            (ctx.fine_tune, "fine_tune", "AttackStageFineTune"),
            (ctx.harm_probe, "harm_probe", "bench.harm_probe.HarmProbe"),
        ):
            if service is None:
                raise UserError(
                    f"resta needs a {name.replace('_', '-')} service in its DefenseContext: pass {name}= (the runner's "
                    f"{runner_class})"
                )
        seconds = {"harm_probe": 0.0, "train_theta_U": 0.0}  # where apply's time goes (BENCHMARKS.md)
        t0 = time.perf_counter()
        (attacked,) = ctx.harm_probe([ctx.finetuned])
        seconds["harm_probe"] += time.perf_counter() - t0
        built = {}

        def train_and_measure(steps: int) -> float:
            t0 = time.perf_counter()
            built[steps] = self.unaligned(ctx, steps)
            t1 = time.perf_counter()
            (rate,) = ctx.harm_probe([built[steps]])
            seconds["train_theta_U"] += t1 - t0
            seconds["harm_probe"] += time.perf_counter() - t1
            ctx.progress(
                f"resta: theta_U after {steps} steps: harmful rate {rate['rate']:.3f} "
                f"(attacked model {attacked['rate']:.3f})"
            )
            return rate["rate"]

        rounds = calibrate(train_and_measure, attacked["rate"], self.first_steps(ctx), p.unalign_rounds)
        theta_U = built[rounds[-1]["steps"]]
        calibrated = rounds[-1]["harmful_rate"] >= attacked["rate"]
        if not calibrated:
            ctx.progress(f"resta: theta_U stayed less harmful than the attacked model after {len(rounds)} rounds")
        # theta_F's model, changed in place one tensor at a time, with theta_A's and theta_U's
        # tensors read from their files one at a time: one model's weights in memory, where whole
        # state dicts of theta_A, theta_F, theta_U, the vector and the output were five (BENCHMARKS.md)
        import torch

        t0 = time.perf_counter()
        model = models.load_model(ctx.finetuned, "float32", ctx.device)
        weights = model.state_dict()  # the parameters themselves (shared storage)
        A, U = lazy_state(ctx.aligned), lazy_state(theta_U)
        safety_norm_sq, delta_norm_sq = 0.0, 0.0
        with torch.no_grad():
            for k, v in safety_vector_items(A, U, [k for k in A.keys() if k in weights], p.dare_p, p.seed):
                safety_norm_sq += float(v.pow(2).sum())
                delta_norm_sq += float((weights[k].float() - A[k].to(weights[k].device)).pow(2).sum())
                weights[k].add_(v.to(weights[k].device), alpha=p.gamma)
        seconds["safety_vector"] = time.perf_counter() - t0
        return DefenseOutput(
            model=model,
            info={
                "gamma": p.gamma,
                "dare_p": p.dare_p,
                "safety_vector_norm": safety_norm_sq**0.5,
                "finetune_delta_norm": delta_norm_sq**0.5,
                "theta_U": theta_U.path.parent.name,  # its cache stage (content-keyed), not a machine path
                "theta_U_lr": self.learning_rate(ctx),
                "theta_U_steps": rounds[-1]["steps"],
                "theta_U_harmful_rate": rounds[-1]["harmful_rate"],
                "attacked_harmful_rate": attacked["rate"],
                "harmful_rate_n": attacked["n"],
                "theta_U_calibrated": calibrated,
                "calibration_rounds": rounds,
                "seconds": {k: round(v, 2) for k, v in seconds.items()},  # theta_U's training 0 when cached
            },
        )
