"""Pareto ranking of (harmful rate: lower is better, utility: higher is better) points.

Written here because the two-axis case is small and exact: non-dominated sorting as one sweep in
sorted order (vectorised over bootstrap replicates), and the 2-D hypervolume as a sum of rectangles.
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

    A point's front is one more than the highest front among the points that dominate it (0 if
    none do): the longest chain of dominators, which is what peeling fronts off one by one gives.
    Sorted by harm, then by utility (higher first), every point's dominators come before it, so one
    sweep over the m sorted positions settles the ranks. The sweep runs over positions with every
    replicate at once, in (m, replicates) arrays: contiguous vectors, where the batched m x m
    dominance matrices of peeling spent their time on tiny strided blocks.
    """
    h, u = np.asarray(h, float), np.asarray(u, float)
    shape, m = h.shape, h.shape[-1]
    replicates = int(np.prod(shape[:-1], dtype=np.int64))
    order = np.lexsort((-u, h), axis=-1)
    H = np.moveaxis(np.take_along_axis(h, order, -1), -1, 0).reshape(m, replicates)
    U = np.moveaxis(np.take_along_axis(u, order, -1), -1, 0).reshape(m, replicates)
    small = np.int16 if m < 2**15 else np.int64  # ranks are at most m: half the memory traffic of int64
    R = np.ones(H.shape, small)
    for k in range(1, m):
        best = np.zeros(replicates, small)
        for j in range(k):
            # sorted so that H[j] <= H[k] and, where they are equal, U[j] >= U[k]: j dominates k
            # exactly when it is at least as useful and strictly better on one axis
            dominates_k = (U[j] >= U[k]) & ((U[j] > U[k]) | (H[j] < H[k]))
            np.maximum(best, R[j] * dominates_k, out=best)
        R[k] = best + 1
    ranks = np.empty(shape, np.int64)
    np.put_along_axis(ranks, order, np.moveaxis(R.reshape(m, *shape[:-1]), 0, -1), -1)
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
