"""Paired tests on per-sample outcomes: exact McNemar, one pair or many at once (scipy.special)."""

from __future__ import annotations

import numpy as np


def _binom_cdf_half(k, n) -> np.ndarray:
    """scipy.stats.binom.cdf(k, n, 0.5) through scipy.special.bdtr: importing scipy.stats costs
    about a second, most of a board's budget."""
    from scipy.special import bdtr

    return bdtr(np.asarray(k, np.int64), np.asarray(n, np.int64), 0.5)


def mcnemar(x, y, alternative: str = "two-sided") -> dict:
    """Exact McNemar test on paired binary outcomes (binomial test on the discordant pairs).
    alternative="greater": one-sided, that x has more 1s (x worse, 1 = bad) than y."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
        raise ValueError("McNemar needs the same prompts on both sides")
    b = int(((x == 1) & (y == 0)).sum())  # x worse (1 = harmful) where y is not
    c = int(((x == 0) & (y == 1)).sum())
    if b + c == 0:
        p = 1.0
    elif alternative == "greater":  # P(B >= b) for B ~ Binomial(b + c, 1/2)
        p = float(1.0 - _binom_cdf_half(b - 1, b + c)) if b > 0 else 1.0
    else:  # two-sided exact binomial test at 1/2 (what scipy.stats.binomtest computes, 20x cheaper)
        p = float(min(1.0, 2 * _binom_cdf_half(min(b, c), b + c)))
    return {"test": "mcnemar-exact", "b": b, "c": c, "p": p}


def mcnemar_many(X: np.ndarray, I, J) -> list[dict]:
    """mcnemar(X[i], X[j]) for every pair (i, j) at once; X is methods x prompts (nan = unknown)."""
    I, J = np.asarray(I, int), np.asarray(J, int)
    if len(I) == 0:
        return []
    known = ~(np.isnan(X[I]) | np.isnan(X[J]))
    b = ((X[I] == 1) & (X[J] == 0) & known).sum(1)
    c = ((X[I] == 0) & (X[J] == 1) & known).sum(1)
    p = np.where(b + c == 0, 1.0, np.minimum(1.0, 2 * _binom_cdf_half(np.minimum(b, c), b + c)))
    return [{"test": "mcnemar-exact", "b": int(bb), "c": int(cc), "p": float(pp)} for bb, cc, pp in zip(b, c, p)]


def two_proportion_p(k1: int, n1: int, k2: int, n2: int, alternative: str = "two-sided") -> float:
    """Pooled z-test of k1/n1 against k2/n2, for rows whose outcomes do not pair (the board's pairs of
    rows and `board check`), through math.erfc: scipy.stats' import costs a second.
    alternative="greater": one-sided, that k1/n1 is the larger."""
    import math

    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = (p * (1 - p) * (1 / n1 + 1 / n2)) ** 0.5
    diff = k1 / n1 - k2 / n2
    if se == 0:
        return 1.0 if diff == 0 or (alternative == "greater" and diff < 0) else 0.0
    if alternative == "greater":
        return 0.5 * math.erfc(diff / se / math.sqrt(2))
    return math.erfc(abs(diff) / se / math.sqrt(2))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error at the level they are compared with).
    Written here because scipy ships only false-discovery corrections; the tests hold it to
    statsmodels' multipletests(method="holm")."""
    p = np.asarray(p_values, float)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted
