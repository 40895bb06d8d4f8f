"""The defense registry.

    from defenses import register_defense, Defense, DEFENSES

    @register_defense("my_method")
    class MyMethod(Defense):
        Params = MyParams            # a dataclass; each field has metadata={"help": ...}
        needs = ("calibration",)     # inputs it uses, in words (`realign list`)
        reads = ("calibration_prompts",)  # of base.OPTIONAL_INPUTS: what keys its cache and reaches it
        def apply(self, ctx): ...    # -> DefenseOutput

A third-party package adds a defense without editing this repository through the entry-point
group `realign.defenses` (`my_method = "my_pkg.module:MyMethod"`); `realign list` shows it
without importing it, and it is loaded when first used.
"""

from bench.registry import Registry
from defenses.base import ROLES, Defense, DefenseContext, DefenseOutput, NoParams

DEFENSES = Registry("defense", entry_point_group="realign.defenses")
register_defense = DEFENSES.register

# built-in defenses, imported only when used (so `realign list` stays instant)
DEFENSES.register_lazy("aligned", "defenses.reference:Aligned")
DEFENSES.register_lazy("none", "defenses.reference:Undefended")
DEFENSES.register_lazy("gradient_restoration", "defenses.gradient_restoration:GradientRestoration")
DEFENSES.register_lazy("interpolation", "defenses.interpolation:Interpolation")
DEFENSES.register_lazy("resta", "defenses.resta:Resta")
DEFENSES.register_lazy("safelora", "defenses.safelora:SafeLora")
DEFENSES.register_lazy("antidote", "defenses.antidote:Antidote")
DEFENSES.register_lazy("safe_delta", "defenses.safe_delta:SafeDelta")


def names_with_role(role: str) -> list[str]:
    """Registered defenses of one role (see Defense.role); imports each defense module (cheap)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return [name for name in DEFENSES.names() if DEFENSES.get(name).role == role]


__all__ = ["DEFENSES", "register_defense", "names_with_role", "Defense", "DefenseContext", "DefenseOutput", "NoParams"]
