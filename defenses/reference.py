"""Reference rows, always on the board: `aligned` (theta_A, the safety ceiling) and `none`
(theta_F as fine-tuned, the undefended row every defense is compared with)."""

from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput


@register_defense("aligned")
class Aligned(Defense):
    """theta_A itself: the aligned model before the attack."""

    role = "reference"
    reads = ()

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        return DefenseOutput(model_path=ctx.aligned.path, info={"model": "aligned"})


@register_defense("none")
class Undefended(Defense):
    """theta_F as fine-tuned: no defense."""

    role = "reference"
    reads = ()

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        return DefenseOutput(model_path=ctx.finetuned.path, info={"model": "finetuned"})
