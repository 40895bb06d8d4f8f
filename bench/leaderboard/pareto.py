"""Pareto ranking of (harmful rate: lower is better, utility: higher is better) points.

Written here because the two-axis case is small and exact: non-dominated sorting by peeling
fronts (vectorised over bootstrap replicates), and the 2-D hypervolume as a sum of rectangles.
"""

from __future__ import annotations

import numpy as np


def dominates(h, u):
    """D[..., i, j] = point i dominates point j (no worse on both axes, better on one)."""
    h, u = np.asarray(h, float), np.asarray(u, float)
    hi, hj = h[..., :, None], h[..., None, :]
    ui, uj = u[..., :, None], u[..., None, :]
    return (hi <= hj) & (ui >= uj) & ((hi < hj) | (ui > uj))


def pareto_ranks(h, u) -> np.ndarray:
    """Front index per point (1 = frontier); works on [..., m] arrays (e.g. bootstrap replicates).

    Peels fronts while keeping, per point, the count of remaining points that dominate it; a
    front's removal subtracts its rows of the dominance matrix (one batched matrix product)."""
    D = dominates(h, u)
    dominators = D.sum(-2, dtype=np.int32)
    Df = D.astype(np.float32)
    shape = np.shape(h)
    ranks = np.zeros(shape, int)
    remaining = np.ones(shape, bool)
    front = 0
    while remaining.any():
        front += 1
        new = remaining & (dominators == 0)
        ranks[new] = front
        remaining &= ~new
        dominators = dominators - np.matmul(new[..., None, :].astype(np.float32), Df)[..., 0, :].astype(np.int32)
    return ranks


def front(h, u) -> list[bool]:
    """Whether each point is on the frontier (pareto_ranks(h, u) == 1), in plain Python: one sort and
    one sweep. A board of a thousand settings asks this of every method curve, most of one to six
    points, where numpy's per-call overhead costs more than the comparisons.

    Sorted by harm, a point is dominated by a point of the same harm and higher utility, or by any
    point of lower harm and at least its utility; equal points do not dominate each other."""
    order = sorted(range(len(h)), key=lambda i: (h[i], -u[i]))
    on = [False] * len(h)
    best_before = float("-inf")  # the best utility among points of strictly lower harm
    at = 0
    while at < len(order):
        same = at
        while same < len(order) and h[order[same]] == h[order[at]]:
            same += 1
        top = u[order[at]]  # the best utility at this harm (sorted first)
        for i in order[at:same]:
            on[i] = u[i] == top and u[i] > best_before
        best_before = max(best_before, top)
        at = same
    return on


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by ref = (harm_ref, util_ref), exact in 2-D.

    A point counts only where it is better than ref on both axes (harm < harm_ref, util > util_ref).
    """
    h_ref, u_ref = ref
    pts = [(h, u) for h, u in points if h < h_ref and u > u_ref]
    # the union of boxes [h, h_ref] x [u_ref, u]: sweep harm upwards; on each strip the height is
    # the best utility among points at or left of it
    xs = sorted({h for h, _ in pts} | {h_ref})
    area = 0.0
    for a, b in zip(xs, xs[1:]):
        top = max((u for h, u in pts if h <= a), default=u_ref)
        area += (b - a) * (top - u_ref)
    return area


def curve_value(curve: list[tuple[float, float]], utility: float) -> float | None:
    """Harmful rate of the interpolation curve at `utility` (piecewise linear), None outside it."""
    pts = sorted(curve, key=lambda p: p[1])
    if not pts or utility < pts[0][1] or utility > pts[-1][1]:
        return None
    us = np.array([u for _, u in pts])
    hs = np.array([h for h, _ in pts])
    return float(np.interp(utility, us, hs))
