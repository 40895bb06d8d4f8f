"""Build a leaderboard from result records: one board per setting, ranked by safety versus utility.

Per setting (model, task, harmful N, judge):
- Pareto rank on (harmful rate, task utility), then hypervolume against a fixed reference point
  (harmful rate of `none`, utility of `aligned`, unless given); harm reduction share and utility
  kept share only break ties;
- every rate with its bootstrap CI over prompts and n; rank intervals from a paired bootstrap over
  prompts; ranks whose intervals overlap are marked tied;
- paired tests against `none` and against the next method in the ranking (McNemar on binary
  outcomes), and each row's position against the interpolation curve at its utility.
Across settings: HELM-style mean win rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import records as records_mod
from bench.data import read_jsonl
from bench.errors import UserError
from bench.leaderboard import pareto, stats

AXES = ("harmful_rate", "task_metric")
SHOWN = ("harmful_rate", "over_refusal", "task_metric")
N_BOOT = 200


def setting_key(record: dict) -> str:
    s = record["setting"]
    return f"{s['model']} | {s['task']} | N={s['harmful_n']} | judge={s['judge']}"


@dataclass
class Board:
    settings: dict[str, list[dict]]  # setting key -> rows in rank order
    aggregate: list[dict]
    reference_points: dict[str, tuple[float, float]]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    categories: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def load(paths: list[Path]) -> list[tuple[dict, Path]]:
    """Records (validated) with their paths; folders are searched for *.json records."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.json") if not f.name.startswith("board"))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"{p}: no such record file or folder")
    if not files:
        raise UserError("no records found: pass record files or folders that hold them")
    return [(records_mod.load(f), f) for f in files]


def outcomes(record: dict, path: Path | None) -> dict[str, np.ndarray] | None:
    """Per-metric 0/1 outcomes in doc order, or None when the samples file is absent."""
    if path is None:
        return None
    sfile = path.parent / record["samples_file"]
    if not sfile.exists():
        return None
    by: dict[str, list] = {}
    for row in read_jsonl(sfile, required=("metric",)):
        by.setdefault(row["metric"], []).append((row.get("doc_id", 0), row.get("outcome"), row.get("category", "")))
    return {m: sorted(v) for m, v in by.items()}


def build(loaded: list[tuple[dict, Path | None]], multi_setting: bool = False, reference: tuple[float, float] | None = None,
          seed: int = 0) -> Board:
    groups: dict[str, list[tuple[dict, Path | None]]] = {}
    for rec, path in loaded:
        groups.setdefault(setting_key(rec), []).append((rec, path))
    if len(groups) > 1 and not multi_setting:
        raise UserError(f"records come from {len(groups)} different settings ({'; '.join(sorted(groups))}); "
                        "pass --multi-setting to build one board per setting, or select records of one setting")
    board = Board({}, [], {})
    for key, items in sorted(groups.items()):
        labels = [r["method"]["label"] for r, _ in items]
        dupes = sorted({l for l in labels if labels.count(l) > 1})
        if dupes:
            raise UserError(f"setting {key}: method {dupes[0]!r} appears in {labels.count(dupes[0])} records; keep one record per method")
        rows, ref, curve, cats = _rank_setting(items, reference, seed)
        board.settings[key], board.reference_points[key], board.curves[key], board.categories[key] = rows, ref, curve, cats
    board.aggregate = _win_rates(board.settings)
    return board


def _rank_setting(items, reference, seed):
    m = len(items)
    recs = [r for r, _ in items]
    samples = [outcomes(r, p) for r, p in items]
    value = {a: np.array([r["metrics"][a]["value"] if a in r["metrics"] else np.nan for r in recs]) for a in SHOWN}
    k = {a: np.array([r["metrics"].get(a, {}).get("k", round(r["metrics"].get(a, {}).get("value", 0) * r["metrics"].get(a, {}).get("n", 0))) for r in recs]) for a in SHOWN}
    n = {a: np.array([r["metrics"].get(a, {}).get("n", 0) for r in recs]) for a in SHOWN}
    names = [r["method"]["name"] for r in recs]
    h, u = value["harmful_rate"], value["task_metric"]
    if reference is None:
        h_ref = h[names.index("none")] if "none" in names else float(np.nanmax(h))
        u_ref = u[names.index("aligned")] if "aligned" in names else float(np.nanmin(u))
        reference = (float(h_ref), float(u_ref))
    ranks = pareto.pareto_ranks(h, u)
    hv = np.array([pareto.hypervolume([(h[i], u[i])], reference) for i in range(m)])
    h_none = h[names.index("none")] if "none" in names else np.nan
    h_al = h[names.index("aligned")] if "aligned" in names else np.nan
    u_none = u[names.index("none")] if "none" in names else np.nan
    reduction = (h_none - h) / (h_none - h_al) if h_none != h_al else np.full(m, np.nan)
    kept = u / u_none if u_none else np.full(m, np.nan)
    order = sorted(range(m), key=lambda i: (ranks[i], -hv[i], -np.nan_to_num(reduction[i], nan=-1e9), -np.nan_to_num(kept[i], nan=-1e9), recs[i]["method"]["label"]))

    # rank intervals: paired bootstrap over prompts when every method has its samples, else
    # independent binomial draws per method
    rng = np.random.default_rng(seed)
    boot = {}
    for a in AXES:
        mats = [s[a] if s and a in s else None for s in samples]
        lengths = {len(x) for x in mats if x is not None}
        if all(x is not None for x in mats) and len(lengths) == 1 and lengths.pop() > 0:
            X = np.array([[np.nan if o is None else o for _, o, _ in x] for x in mats], float)
            idx = rng.integers(0, X.shape[1], size=(N_BOOT, X.shape[1]))
            boot[a] = np.nanmean(X[:, idx], axis=2).T  # (B, m)
        else:
            boot[a] = rng.binomial(np.maximum(n[a], 1), np.clip(np.nan_to_num(value[a]), 0, 1), size=(N_BOOT, m)) / np.maximum(n[a], 1)
    boot_ranks = pareto.pareto_ranks(boot["harmful_rate"], boot["task_metric"])
    lo_rank = np.percentile(boot_ranks, 2.5, axis=0)
    hi_rank = np.percentile(boot_ranks, 97.5, axis=0)

    # the interpolation curve: its rows, with `aligned` (alpha 0) and `none` (alpha 1) as its ends
    curve = [(float(h[i]), float(u[i])) for i in range(m) if names[i] == "interpolation"]
    if curve:
        curve += [(float(h[i]), float(u[i])) for i in range(m) if names[i] in ("aligned", "none")]

    ci = {a: stats.proportion_bootstrap_ci(k[a], n[a]) for a in SHOWN}
    rows = []
    for pos, i in enumerate(order):
        row = {"setting": setting_key(recs[i]), "position": pos + 1, "method": recs[i]["method"]["label"], "name": names[i],
               "pareto_rank": int(ranks[i]), "rank_interval": [float(lo_rank[i]), float(hi_rank[i])], "hypervolume": float(hv[i]),
               "harm_reduction_share": _f(reduction[i]), "utility_kept_share": _f(kept[i]), "record_id": recs[i]["record_id"]}
        for a in SHOWN:
            row[a] = _f(value[a][i])
            row[f"{a}_ci_low"] = _f(ci[a][0][i]) if n[a][i] else None
            row[f"{a}_ci_high"] = _f(ci[a][1][i]) if n[a][i] else None
            row[f"{a}_n"] = int(n[a][i])
        row["vs_none"] = _paired(samples, i, names.index("none")) if "none" in names and names[i] != "none" else None
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        row["vs_next"] = _paired(samples, i, nxt) | {"next": recs[nxt]["method"]["label"]} if nxt is not None else None
        on_curve = names[i] in ("interpolation", "aligned", "none")
        cv = pareto.curve_value(curve, float(u[i])) if curve and not on_curve else None
        if cv is None:
            row["vs_interpolation"] = "curve" if on_curve and curve else "n/a"
        elif row["harmful_rate_ci_high"] is not None and row["harmful_rate_ci_high"] < cv:
            row["vs_interpolation"] = "beats the curve"
        elif row["harmful_rate_ci_low"] is not None and row["harmful_rate_ci_low"] > cv:
            row["vs_interpolation"] = "worse than the curve"
        else:
            row["vs_interpolation"] = "on the curve"
        row["wall_s"] = recs[i]["cost"]["wall_s"] + recs[i]["cost"].get("defense_wall_s", 0.0)
        rows.append(row)
    for row in rows:
        lo, hi = row["rank_interval"]
        row["tied_with"] = [o["method"] for o in rows if o is not row and o["rank_interval"][0] <= hi and lo <= o["rank_interval"][1]
                            and o["pareto_rank"] != row["pareto_rank"]]
    cats = _categories(recs, samples)
    return rows, reference, curve, cats


def _paired(samples, i, j) -> dict:
    out = {}
    for a in AXES:
        si, sj = samples[i], samples[j]
        if not si or not sj or a not in si or a not in sj or len(si[a]) != len(sj[a]):
            out[a] = {"test": "n/a (samples missing or prompts differ)", "p": None}
            continue
        x = [o for _, o, _ in si[a]]
        y = [o for _, o, _ in sj[a]]
        keep = [t for t, (p, q) in enumerate(zip(x, y)) if p is not None and q is not None]
        out[a] = stats.mcnemar([x[t] for t in keep], [y[t] for t in keep])
    return out


def _categories(recs, samples) -> dict[str, dict[str, float]]:
    """Harmful rate per prompt category, per method (from the samples)."""
    out: dict[str, dict[str, float]] = {}
    for rec, s in zip(recs, samples):
        if not s or "harmful_rate" not in s:
            continue
        by: dict[str, list] = {}
        for _, o, cat in s["harmful_rate"]:
            if o is not None:
                by.setdefault(cat or "uncategorised", []).append(o)
        out[rec["method"]["label"]] = {c: float(np.mean(v)) for c, v in sorted(by.items())}
    return out


def _win_rates(settings: dict[str, list[dict]]) -> list[dict]:
    """HELM-style mean win rate: share of the other methods beaten, averaged over settings x axes."""
    wins: dict[str, list[float]] = {}
    for rows in settings.values():
        if len(rows) < 2:
            continue
        for r in rows:
            for a, better in (("harmful_rate", lambda x, y: x < y), ("task_metric", lambda x, y: x > y)):
                others = [o for o in rows if o is not r and o[a] is not None]
                if r[a] is None or not others:
                    continue
                wins.setdefault(r["method"], []).append(sum(better(r[a], o[a]) for o in others) / len(others))
    agg = [{"method": mth, "mean_win_rate": float(np.mean(v)), "settings_x_axes": len(v)} for mth, v in wins.items()]
    return sorted(agg, key=lambda r: -r["mean_win_rate"])


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) or (isinstance(x, np.floating) and np.isnan(x)) else float(x)
