"""SafeLoRA (Hsu et al., NeurIPS 2024): project the LoRA update onto the alignment subspace.

Per LoRA module: V = W_A - W_B (aligned minus base, the alignment matrix); C = V V^T / ||V||_F;
s = cos(flatten(C B A), flatten(B A)). The modules with the lowest similarity are projected:
B := C B; the others keep B. Modes: `number` projects the least similar modules, as a `share` of
the adapter's modules (default 10/64: the paper's 10 of the 64 q/v modules of Llama-2-7B; a
count fixed at 10 would project 4.8% of an all-linear adapter's 210 modules) or an absolute
`num_proj_layers`; `threshold` projects modules with s <= threshold (0.5).

The public code's `number` mode first runs a pass at s <= 0.3 (reported upstream as a bug); its
second pass recomputes every B from the original adapter, so the first pass has no effect on the
result. One pass is implemented. Data-free and training-free. Inputs: base, aligned, the LoRA
adapter; without a base model it cannot run and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, check_choice, option
from defenses.weights import load_into, lora_modules, state


@dataclass
class SafeLoraParams:
    mode: str = option("number", "'number' (project the least similar modules) or 'threshold'")
    share: float = field(
        default=10 / 64,
        metadata={
            "help": "number mode: share of the adapter's modules projected, rounded to the nearest count (10/64: the "
            "paper's 10 of Llama-2's 64 q/v modules)"
        },
    )
    num_proj_layers: int | None = option(None, "number mode: an absolute count of modules instead of a share")
    threshold: float = option(0.5, "similarity at or below which a module is projected (threshold mode)")

    def __post_init__(self):
        check_choice("mode", self.mode, ("number", "threshold"))
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share}")
        if (self.num_proj_layers is not None and self.num_proj_layers < 0) or not -1.0 <= self.threshold <= 1.0:
            raise ValueError("num_proj_layers must be >= 0 and threshold in [-1, 1]")

    def count(self, modules: int) -> int:
        """Modules projected in number mode: num_proj_layers if given, else round(share * modules)
        (half up: Python's round() goes to even)."""
        if self.num_proj_layers is not None:
            return self.num_proj_layers
        return math.floor(self.share * modules + 0.5)


def projection(V):
    """C = V V^T / ||V||_F."""
    return V @ V.T / V.norm()


def similarity(C, B, A) -> float:
    import torch

    update = B @ A
    return float(torch.nn.functional.cosine_similarity((C @ update).flatten(), update.flatten(), dim=0))


@register_defense("safelora")
class SafeLora(Defense):
    """Project the least aligned LoRA modules onto the alignment subspace (Hsu et al., NeurIPS 2024)."""

    Params = SafeLoraParams
    needs = ("base", "adapter")
    reads = ("base",)
    curve = {"share": [0.05, 10 / 64, 0.3, 0.5, 1.0]}
    deviations = """
        One pass where the released `number` mode makes two (its first pass, at s <= 0.3, is
        overwritten by the second: reported upstream as a bug). The count of projected modules is a
        share of the adapter's modules (default 10/64, the paper's 10 of Llama-2-7B's 64 q/v
        modules): the testbed's adapter covers every linear layer (210 modules), where a count of 10
        would project 4.8% of them. The base model is the testbed's SmolLM2 base, which went through
        Q4_1 quantisation.
    """

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        p: SafeLoraParams = self.params
        if ctx.base is None:
            return DefenseOutput(skipped="safelora needs the base (pre-alignment) model, and none was given")
        mods = lora_modules(ctx.adapter)
        W_base, W_A, F = state(ctx.base), state(ctx.aligned), state(ctx.finetuned)
        sims = {}
        projections = {}
        for m in mods:
            C = projection(W_A[m.weight] - W_base[m.weight])
            projections[m.weight] = C
            sims[m.weight] = similarity(C, m.B, m.A)
        if p.mode == "number":
            chosen = sorted(sims, key=sims.get)[: p.count(len(mods))]
        else:
            chosen = [w for w, s in sims.items() if s <= p.threshold]
        out = dict(F)
        for m in mods:
            if m.weight in chosen:  # B := C B; the other modules keep theta_F exactly
                out[m.weight] = W_A[m.weight] + m.scaling * (projections[m.weight] @ m.B) @ m.A
        return DefenseOutput(
            model=load_into(ctx.finetuned, out, ctx.device),
            info={"mode": p.mode, "modules": len(mods), "projected": sorted(chosen), "similarity": sims},
        )
