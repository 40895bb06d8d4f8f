"""Metrics with their per-sample outcomes and a 95% confidence interval.

A rate is stored with every 0/1 outcome it came from, so that the board can bootstrap it and run
paired tests (McNemar) between methods on the same prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    from scipy.stats import binomtest

    known = [int(o) for o in outcomes if o is not None]
    n, k = len(known), sum(known)
    if n == 0:
        return Rate(float("nan"), (float("nan"), float("nan")), 0, 0, [], len(outcomes))
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Rate(k / n, (float(ci.low), float(ci.high)), n, k, known, len(outcomes) - n)


def outcome_string(outcomes: list[int | None]) -> str:
    """Per-sample outcomes in doc order as one compact string: '1', '0', '-' (unknown)."""
    return "".join("-" if o is None else str(int(o)) for o in outcomes)
