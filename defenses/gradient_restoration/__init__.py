"""The flagship: gradient-guided weight restoration with rollback (shared specs/gradient_restoration.md).

Where to read what:
  recipe.py     the algorithm top to bottom in the spec's order: Params, directions, gradient
                pass, recover and rollback steps, the schedule
  rules.py      the spec's pure rules (E, prompt ids, released batching, score, k-th largest,
                checkpoint choice)
  reference.py  the spec read literally with three full copies: the executable spec, the tests'
                oracle and the benchmark's baseline
  masks.py      checkpoints as bit-packed masks
  engine/       what exists only for time and memory, one file per switch (recipe.SpeedOptions)
"""

from defenses.gradient_restoration.recipe import GradientRestoration, GradientRestorationParams, SpeedOptions

__all__ = ["GradientRestoration", "GradientRestorationParams", "SpeedOptions"]
