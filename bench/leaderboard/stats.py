"""Uncertainty: bootstrap intervals and paired tests on per-sample outcomes (scipy)."""

from __future__ import annotations

import numpy as np


def proportion_bootstrap_ci(k: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of a proportion over prompts, in closed form.

    Resampling n binary outcomes with replacement makes the resampled count Binomial(n, k/n), so
    the percentile bootstrap's limit (infinitely many resamples) is the binomial quantile pair.
    Exact, vectorised (one call for a whole board), and free of Monte-Carlo noise.
    """
    k, n = np.asarray(k, np.int64), np.asarray(n, np.int64)
    # a board repeats the same few (k, n) pairs thousands of times: solve each pair once
    pairs, where = np.unique(np.stack([k.ravel(), n.ravel()]), axis=1, return_inverse=True)
    uk, un = pairs
    p = np.divide(uk, un, out=np.zeros(len(uk)), where=un > 0)
    a = (1 - confidence) / 2
    lo, hi = binom_ppf(a, un, p) / np.maximum(un, 1), binom_ppf(1 - a, un, p) / np.maximum(un, 1)
    return lo[where.ravel()].reshape(k.shape), hi[where.ravel()].reshape(k.shape)


def binom_ppf(q, n, p) -> np.ndarray:
    """scipy.stats.binom.ppf, computed the way scipy computes it (bdtrik, then one bdtr check), on
    scipy.special alone: importing scipy.stats costs about a second, most of a board's budget.
    Tested equal to scipy.stats.binom.ppf."""
    from scipy.special import bdtr, bdtrik

    n, p = np.asarray(n, np.int64), np.asarray(p, float)
    q = np.broadcast_to(np.asarray(q, float), np.broadcast(n, p).shape)
    with np.errstate(invalid="ignore"):
        vals = np.ceil(bdtrik(q, n, p))
    below = np.maximum(vals - 1, 0)
    out = np.where(bdtr(np.nan_to_num(below).astype(np.int64), n, p) >= q, below, vals)
    return np.where((p <= 0) | (n == 0), 0.0, np.clip(np.nan_to_num(out), 0, n))


def _binom_cdf_half(k, n) -> np.ndarray:
    """scipy.stats.binom.cdf(k, n, 0.5) through scipy.special.bdtr (see binom_ppf for why)."""
    from scipy.special import bdtr

    return bdtr(np.asarray(k, np.int64), np.asarray(n, np.int64), 0.5)


def bootstrap_ci(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean of any per-sample metric (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, float)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    res = bootstrap((values,), np.mean, confidence_level=confidence, method="percentile", n_resamples=2000, random_state=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar(x, y) -> dict:
    """Exact McNemar test on paired binary outcomes (binomial test on the discordant pairs)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
        raise ValueError("McNemar needs the same prompts on both sides")
    b = int(((x == 1) & (y == 0)).sum())  # x worse (1 = harmful) where y is not
    c = int(((x == 0) & (y == 1)).sum())
    # two-sided exact binomial test at 1/2 (what scipy.stats.binomtest computes, 20x cheaper)
    p = 1.0 if b + c == 0 else float(min(1.0, 2 * _binom_cdf_half(min(b, c), b + c)))
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


def paired_bootstrap_p(x, y, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Two-sided paired bootstrap p-value for mean(x) - mean(y) (non-binary metrics)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    d = x - y
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
    means = d[idx].mean(1) - d.mean()  # resampled under the null of no difference
    p = float((np.abs(means) >= abs(d.mean())).mean())
    return {"test": "paired-bootstrap", "diff": float(d.mean()), "p": max(p, 1.0 / n_resamples)}
