"""Metrics with their per-sample outcomes and a 95% confidence interval.

A rate is stored with every 0/1 outcome it came from, so that the board can resample prompts for
rank intervals and run paired tests (McNemar) between methods on the same prompts. Its interval is
the Wilson score interval, here and on the board: one rate, one interval wherever it is shown.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.errors import UserError


@dataclass
class Rate:
    """A proportion k/n with a Wilson 95% interval (good at rates near 0 and 1, unlike Wald)."""

    value: float
    ci: tuple[float, float]
    n: int
    k: int
    outcomes: list[int] = field(repr=False)
    n_unknown: int = 0

    def to_dict(self, with_outcomes: bool = False) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        if not with_outcomes:
            d.pop("outcomes")
        return d


def rate(outcomes: list[int | None], confidence: float = 0.95) -> Rate:
    """Rate of 1s among the known outcomes (None = unknown, counted aside)."""
    known = [int(o) for o in outcomes if o is not None]
    n, k = len(known), sum(known)
    if n == 0:
        return Rate(float("nan"), (float("nan"), float("nan")), 0, 0, [], len(outcomes))
    low, high = wilson_interval(k, n, confidence)
    return Rate(k / n, (float(low), float(high)), n, k, known, len(outcomes) - n)


def wilson_interval(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k successes in n, elementwise over arrays (a whole board in one
    call); nan where n is 0. Closed form on scipy.special: importing scipy.stats costs about a second."""
    from scipy.special import ndtri

    k, n = np.asarray(k, float), np.asarray(n, float)
    z2 = float(ndtri(0.5 + confidence / 2)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = np.sqrt(z2 * p * (1 - p) / n + z2 * z2 / (4 * n * n)) / (1 + z2 / n)
    # the closed form hits 0 and 1 exactly at k = 0 and k = n only up to rounding
    low = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)


def outcome_string(outcomes: list[int | None]) -> str:
    """Per-sample outcomes in doc order as one compact string: '1', '0', '-' (unknown)."""
    return "".join("-" if o is None else str(int(o)) for o in outcomes)


def binary_outcomes(rows: list[dict], metric: str, task: str) -> list[int]:
    """Each sample's 0/1 outcome. The board's statistics are of rates (k of n: Wilson intervals,
    McNemar's paired test), so a graded per-sample score (ROUGE, BLEU) is refused, never rounded."""
    out = []
    for s in rows:
        value = s[metric]
        if not isinstance(value, numbers.Real) or value not in (0, 1):
            raise UserError(
                f"task {task}: metric {metric!r} is {value!r} for one sample, not a 0/1 outcome; the board ranks "
                "rates (k of n), so choose a per-sample 0/1 metric such as exact_match or acc"
            )
        out.append(int(value))
    return out
