"""RESTA: restoring safety through task arithmetic (Bhardwaj et al., ACL 2024).

theta = theta_F + gamma * (theta_A - theta_U), where theta_U is theta_A fine-tuned on harmful pairs
only (the un-aligned model; the flagship authors: 100 harmful pairs, LoRA, lr 5e-5, batch 10, 50
steps, merged). theta_U is built once per aligned model by the context's fine-tune service (the
suite's own training stage) and cached like any other model. Optional DARE on the safety vector:
drop each coordinate with probability p and rescale the rest by 1/(1-p), seeded. Inputs: aligned,
fine-tuned, harmful pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, FineTuneSpec
from defenses.weights import load_into, state


@dataclass
class RestaParams:
    gamma: float = field(
        default=1.0, metadata={"help": "strength of the safety vector (flagship authors 1.0; 0.5 elsewhere)"}
    )
    dare_p: float = field(default=0.0, metadata={"help": "DARE drop probability on the safety vector (0 = off)"})
    unalign_pairs: int = field(default=100, metadata={"help": "harmful pairs theta_U is fine-tuned on"})
    unalign_lr: float = field(default=5e-5, metadata={"help": "learning rate of the un-aligning LoRA fine-tune"})
    unalign_steps: int = field(default=50, metadata={"help": "optimiser steps of the un-aligning fine-tune"})
    unalign_batch: int = field(default=10, metadata={"help": "batch size of the un-aligning fine-tune"})
    seed: int = field(default=0, metadata={"help": "seed of DARE and of the un-aligning fine-tune"})

    def __post_init__(self):
        if not 0.0 < self.gamma <= 10.0:
            raise ValueError(f"gamma must be in (0, 10], got {self.gamma}")
        if not 0.0 <= self.dare_p < 1.0:
            raise ValueError(f"dare_p must be in [0, 1), got {self.dare_p}")
        if self.unalign_pairs < 1 or self.unalign_steps < 1 or self.unalign_batch < 1:
            raise ValueError("unalign_pairs, unalign_steps and unalign_batch must be >= 1")


def safety_vector(A: dict, U: dict, dare_p: float, seed: int) -> dict:
    """theta_A - theta_U, with DARE (drop p, rescale 1/(1-p)) when p > 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in A:
        v = A[k] - U[k]
        if dare_p > 0:
            keep = torch.rand(v.shape, generator=gen) >= dare_p
            v = torch.where(keep, v / (1.0 - dare_p), torch.zeros_like(v))
        out[k] = v
    return out


@register_defense("resta")
class Resta(Defense):
    """theta_F + gamma (theta_A - theta_U), theta_U = theta_A fine-tuned on harmful pairs
    (Bhardwaj et al., ACL 2024)."""

    Params = RestaParams
    needs = ("harmful_pairs",)

    def unaligned(self, ctx: DefenseContext):
        p: RestaParams = self.params
        if len(ctx.harmful_pairs) < p.unalign_pairs:
            raise UserError(
                f"resta needs {p.unalign_pairs} harmful pairs to build theta_U, and {len(ctx.harmful_pairs)} were given"
            )
        if ctx.fine_tune is None:
            raise UserError(
                "resta needs a fine-tune service in its DefenseContext to build theta_U: pass fine_tune= (the "
                "runner's AttackStageFineTune)"
            )
        spec = FineTuneSpec(
            method="lora", lr=p.unalign_lr, batch_size=p.unalign_batch, max_steps=p.unalign_steps, seed=p.seed
        )
        return ctx.fine_tune(ctx.aligned, ctx.harmful_pairs[: p.unalign_pairs], spec)

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        p: RestaParams = self.params
        theta_U = self.unaligned(ctx)
        A, F, U = state(ctx.aligned), state(ctx.finetuned), state(theta_U)
        v = safety_vector(A, U, p.dare_p, p.seed)
        out = {k: F[k] + p.gamma * v[k] for k in F}
        norm = sum(float(x.pow(2).sum()) for x in v.values()) ** 0.5
        return DefenseOutput(
            model=load_into(ctx.finetuned, out, ctx.device),
            info={"gamma": p.gamma, "dare_p": p.dare_p, "safety_vector_norm": norm, "theta_U": str(theta_U.path)},
        )
