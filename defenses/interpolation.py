"""Linear interpolation between the aligned and the fine-tuned model (WiSE-FT style).

theta(alpha) = theta_A + alpha * Delta_F, Delta_F = theta_F - theta_A; for a LoRA fine-tune this is
scaling the adapter. Each alpha is one row; the runner sweeps alpha over 0.0, 0.1, ..., 1.0 and the
board draws the rows as the frontier every defense must beat (a defense that does not beat it at
equal utility adds nothing). Inputs: aligned and fine-tuned weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, option
from defenses.weights import load_into, state

SWEEP = [round(0.1 * i, 1) for i in range(11)]


@dataclass
class InterpolationParams:
    alpha: float = option(0.5, "share of the fine-tuning delta kept (0 = aligned, 1 = fine-tuned)")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def interpolate(A, F, alpha: float):
    """A + alpha (F - A), computed from the nearer end so that alpha 0 and 1 give A and F exactly."""
    return A + alpha * (F - A) if alpha <= 0.5 else F - (1.0 - alpha) * (F - A)


@register_defense("interpolation")
class Interpolation(Defense):
    """theta_A + alpha * (theta_F - theta_A): the frontier every method must beat."""

    Params = InterpolationParams
    role = "frontier"
    reads = ()
    sweep = {"alpha": SWEEP}  # the runner makes one row per value
    curve = {"alpha": SWEEP}
    deviations = (
        "None: the frontier every method must beat (theta_A + alpha (theta_F - theta_A)), not a published defense."
    )

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        alpha = self.params.alpha
        if alpha == 0.0:
            return DefenseOutput(model_path=ctx.aligned.path, info={"alpha": alpha})
        if alpha == 1.0:
            return DefenseOutput(model_path=ctx.finetuned.path, info={"alpha": alpha})
        A, F = state(ctx.aligned), state(ctx.finetuned)
        mixed = {k: interpolate(A[k], F[k], alpha) for k in F}
        return DefenseOutput(model=load_into(ctx.finetuned, mixed, ctx.device), info={"alpha": alpha})
