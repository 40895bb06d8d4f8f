"""Build a leaderboard from result records: one board per setting, ranked by safety versus utility.

Rows are told apart by the role their record declares (method.role: reference, frontier, method),
never by name; of the reference rows, the one that evaluated the aligned model is the safety
ceiling and the one that evaluated the fine-tuned model is the undefended row ("none").

Per setting (model, task, harmful N, judge):
- Pareto rank on (harmful rate, task utility), then hypervolume against a fixed reference point
  (harmful rate of the undefended row, utility of the ceiling, unless given); harm reduction share
  and utility kept share only break ties;
- every rate with its Wilson 95% interval and n (the interval its record shows); rank intervals
  from a paired bootstrap over prompts; two rows are tied only when their rank intervals overlap
  AND the paired test between them (McNemar on each axis; a two-proportion test where outcomes
  do not pair) rejects on neither axis at TIE_ALPHA, Holm-corrected over the two axes;
- methods as curves (bench.leaderboard.curves): each method's rows ranked by the hypervolume of
  its own frontier, with its best point under a utility floor and its best point overall;
- paired tests against the undefended row and against the next method in the ranking (McNemar on
  binary outcomes), and each row's position against the interpolation curve at its utility.
Across settings: HELM-style mean win rate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import records as records_mod
from bench.data import read_jsonl
from bench.errors import UserError
from bench.gc_pause import without_cyclic_gc
from bench.judges.agreement import board_agreement
from bench.leaderboard import pareto, stats
from bench.leaderboard.curves import curve_of
from bench.leaderboard.judges import row_judges
from bench.metrics import wilson_interval

AXES = ("harmful_rate", "task_metric")
SHOWN = ("harmful_rate", "over_refusal", "task_metric")
UTILITY_PREFIX = "utility:"  # a record's lm-eval utility tasks: metrics "utility:TASK" (bench.evaluate)
N_BOOT = 200
TIE_ALPHA = 0.05  # a pair differs when its paired tests, Holm-corrected over the two axes, reject at this level


def setting_key(record: dict) -> str:
    s = record["setting"]
    # records of a resolved setting carry its content key: two settings that differ in any model,
    # file or option are two boards even when their names agree
    where = f"{s['name']} [{s['key'][:8]}] | " if "key" in s else ""
    return f"{where}{s['model']} | {s['task']} | N={s['harmful_n']} | judge={s['judge']}"


@dataclass
class Board:
    settings: dict[str, list[dict]]  # setting key -> rows in rank order
    aggregate: list[dict]
    reference_points: dict[str, tuple[float, float]]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    categories: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    agreement: dict[str, dict] = field(default_factory=dict)  # setting key -> per set: judges' agreement
    methods: dict[str, list[dict]] = field(default_factory=dict)  # setting key -> method curves in rank order
    utility_floor: float | None = None  # the share of the undefended row's task metric a "best under floor" keeps


@without_cyclic_gc
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
    return _one_per_id([(records_mod.load(f), f) for f in files])


def _one_per_id(loaded: list[tuple[dict, Path]]) -> list[tuple[dict, Path]]:
    """The first of each record id: a run's records built beside a board that already holds them
    (the same id names the same evaluation) are one row, not a duplicate method. The same id with
    other metrics (a fast, nondeterministic rerun) cannot be one row: that is an error."""
    first: dict[str, tuple[dict, Path]] = {}
    for rec, path in loaded:
        seen = first.setdefault(rec["record_id"], (rec, path))
        if seen[0] is not rec and seen[0]["metrics"] != rec["metrics"]:
            raise UserError(
                f"record {rec['record_id']} is in {seen[1]} and {path} with different metrics (a nondeterministic "
                "rerun?); keep one of them"
            )
    return list(first.values())


_OUTCOME_CODE = np.full(256, np.nan)  # a compact outcome character's value: '1' 1, '0' 0, '-' (unknown) nan
_OUTCOME_CODE[ord("0")], _OUTCOME_CODE[ord("1")] = 0.0, 1.0


def outcomes(record: dict, path: Path | None) -> dict[str, np.ndarray] | None:
    """Per-metric outcomes in doc order as floats (1, 0, nan = unknown): from the record's compact
    outcome strings when it has them, else from its samples file; None when neither exists."""
    compact = {m: v["outcomes"] for m, v in record["metrics"].items() if "outcomes" in v}
    if compact:
        return {m: _OUTCOME_CODE[np.frombuffer(text.encode("ascii"), np.uint8)] for m, text in compact.items()}
    rows = _sample_rows(record, path)
    if rows is None:
        return None
    by: dict[str, list] = {}
    for row in rows:
        by.setdefault(row["metric"], []).append(
            (row.get("doc_id", 0), np.nan if row.get("outcome") is None else float(row["outcome"]))
        )
    return {m: np.array([o for _, o in sorted(v)], float) for m, v in by.items()}


def _sample_rows(record: dict, path: Path | None) -> list[dict] | None:
    if path is None or not (path.parent / record["samples_file"]).exists():
        return None
    return read_jsonl(path.parent / record["samples_file"], required=("metric",))


@without_cyclic_gc
def build(
    loaded: list[tuple[dict, Path | None]],
    multi_setting: bool = False,
    reference: tuple[float, float] | None = None,
    seed: int = 0,
    utility_floor: float | None = None,
) -> Board:
    """`utility_floor`: share of the undefended row's task metric a method's "best under the floor"
    point keeps (default curves.DEFAULT_FLOOR, 0.95)."""
    from bench.leaderboard.curves import DEFAULT_FLOOR, method_curves

    floor_share = DEFAULT_FLOOR if utility_floor is None else utility_floor
    if not 0 <= floor_share <= 1:
        raise UserError(
            f"the utility floor is a share of the undefended row's task metric in [0, 1], got {floor_share}"
        )
    groups: dict[str, list[tuple[dict, Path | None]]] = {}
    for rec, path in loaded:
        groups.setdefault(setting_key(rec), []).append((rec, path))
    if len(groups) > 1 and not multi_setting:
        raise UserError(
            f"records come from {len(groups)} different settings ({'; '.join(sorted(groups))}); "
            "pass --multi-setting to build one board per setting, or select records of one setting"
        )
    settings = []
    for key, items in sorted(groups.items()):
        labels = [r["method"]["label"] for r, _ in items]
        dupes = sorted({l for l in labels if labels.count(l) > 1})
        if dupes:
            raise UserError(
                f"setting {key}: method {dupes[0]!r} appears in {labels.count(dupes[0])} records; keep one record "
                "per method"
            )
        settings.append(_Setting(key, items))
    # the statistics run once over the whole board (vectorised across settings): per-setting calls
    # cost more in overhead than in arithmetic on a board of a thousand settings
    _confidence_intervals(settings)
    _pareto_ranks(settings)
    _rank_intervals(settings, seed)
    board = Board({}, [], {}, utility_floor=floor_share)
    for st in settings:
        rows, ref, curve = _rows(st, reference)
        board.settings[st.key], board.reference_points[st.key], board.curves[st.key] = rows, ref, curve
        board.categories[st.key] = _categories(st.items)
        agreement = board_agreement(st.items)  # {} unless `realign judge` added judges to every row
        if agreement:
            board.agreement[st.key] = agreement
        u_none = st.value["task_metric"][st.undefended] if st.undefended is not None else np.nan
        floor = None if np.isnan(u_none) else float(floor_share * u_none)
        board.methods[st.key] = method_curves(rows, ref, floor)
        for c in board.methods[st.key]:
            c["utility_floor"] = floor
    board.aggregate = _win_rates(board.settings)
    return board


class _Setting:
    """One setting's records as arrays: metric values, k and n per shown metric, per-sample outcomes."""

    def __init__(self, key: str, items: list[tuple[dict, Path | None]]):
        self.key, self.items = key, items
        self.recs = [r for r, _ in items]
        self.samples = [outcomes(r, p) for r, p in items]
        self.names = [r["method"]["name"] for r in self.recs]
        self.roles = [r["method"].get("role", "method") for r in self.recs]
        self.undefended = self._reference_row("finetuned")
        self.ceiling = self._reference_row("aligned")
        metrics = [r["metrics"] for r in self.recs]
        self.value = {a: np.array([m[a]["value"] if a in m else np.nan for m in metrics]) for a in SHOWN}
        self.k = {
            a: np.array(
                [m.get(a, {}).get("k", round(m.get(a, {}).get("value", 0) * m.get(a, {}).get("n", 0))) for m in metrics]
            )
            for a in SHOWN
        }
        self.n = {a: np.array([m.get(a, {}).get("n", 0) for m in metrics]) for a in SHOWN}
        self.ci: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.rank_interval = (np.zeros(len(items)), np.zeros(len(items)))

    def _reference_row(self, model: str) -> int | None:
        """The reference row that evaluated the setting's `model` ('aligned' or 'finetuned'), if any."""
        for i, r in enumerate(self.recs):
            if self.roles[i] == "reference" and r["inputs"].get(model) == r["inputs"]["evaluated"]:
                return i
        return None

    def outcome_matrix(self, axis: str) -> np.ndarray | None:
        """methods x prompts, when every method has outcomes on the same number of prompts."""
        mats = [s[axis] if s and axis in s else None for s in self.samples]
        if any(x is None for x in mats) or len({len(x) for x in mats}) != 1 or len(mats[0]) == 0:
            return None
        return np.stack(mats)


def _confidence_intervals(settings: list[_Setting]) -> None:
    """Wilson interval of every shown rate of every record (as in the records), one call per metric."""
    for a in SHOWN:
        lo, hi = wilson_interval(
            np.concatenate([st.k[a] for st in settings]), np.concatenate([st.n[a] for st in settings])
        )
        at = 0
        for st in settings:
            m = len(st.recs)
            st.ci[a] = (lo[at : at + m], hi[at : at + m])
            at += m


def _pareto_ranks(settings: list[_Setting]) -> None:
    """Each record's Pareto rank within its setting, one vectorised call per method count."""
    by_m: dict[int, list[_Setting]] = {}
    for st in settings:
        by_m.setdefault(len(st.recs), []).append(st)
    for group in by_m.values():
        ranks = pareto.pareto_ranks(
            np.stack([st.value["harmful_rate"] for st in group]), np.stack([st.value["task_metric"] for st in group])
        )
        for st, r in zip(group, ranks):
            st.pareto_rank = r


def _rank_intervals(settings: list[_Setting], seed: int) -> None:
    """95% interval of each method's Pareto rank under a paired bootstrap over prompts.

    Settings whose outcome matrices have the same shape are resampled together: replicate b of
    prompt set T draws counts[t, b] copies of prompt t, and every method's resampled rate is
    (outcomes @ counts) / (known @ counts), one matrix product for all settings and replicates.
    A setting without per-sample outcomes falls back to independent binomial draws per method.

    Every draw is seeded by what it resamples (the seed, the axis, the number of prompts; the
    setting's key for the binomial fallback), never by its place among the board's settings: a
    setting's intervals are the same alone as beside a thousand others, in any order. The bounds
    are order statistics of the replicates (the 2.5th percentile rounded down, the 97.5th up):
    ranks are whole numbers, and an interpolated "1.98" shown as "2" claimed a narrower interval.
    """
    batches: dict[tuple, list[tuple[_Setting, dict]]] = {}
    for st in settings:
        mats = {a: st.outcome_matrix(a) for a in AXES}
        if all(x is not None for x in mats.values()):
            batches.setdefault(tuple(mats[a].shape for a in AXES), []).append((st, mats))
        else:
            m = len(st.recs)
            rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(st.key.encode()).digest()[:8], "big")])
            boot = {
                a: rng.binomial(np.maximum(st.n[a], 1), np.clip(np.nan_to_num(st.value[a]), 0, 1), size=(N_BOOT, m))
                / np.maximum(st.n[a], 1)
                for a in AXES
            }
            _set_rank_interval([st], pareto.pareto_ranks(boot["harmful_rate"], boot["task_metric"])[None])
    for shapes, group in batches.items():
        boot = {}
        for axis, (a, (m, T)) in enumerate(zip(AXES, shapes)):
            X = np.concatenate([mats[a] for _, mats in group])  # (settings * m, T)
            known = ~np.isnan(X)
            rng = np.random.default_rng([seed, axis, T])
            counts = rng.multinomial(T, np.full(T, 1.0 / T), size=N_BOOT).T.astype(float)  # (T, B)
            # with no unknown outcome, every replicate's denominator is its T draws
            answered = known.astype(float) @ counts if not known.all() else np.full((len(X), N_BOOT), float(T))
            rates = (np.where(known, X, 0.0) @ counts) / np.maximum(answered, 1)
            boot[a] = rates.reshape(len(group), m, N_BOOT).transpose(0, 2, 1)  # (settings, B, m)
        _set_rank_interval([st for st, _ in group], pareto.pareto_ranks(boot["harmful_rate"], boot["task_metric"]))


def _set_rank_interval(group: list[_Setting], boot_ranks: np.ndarray) -> None:
    lo = np.percentile(boot_ranks, 2.5, axis=1, method="lower")
    hi = np.percentile(boot_ranks, 97.5, axis=1, method="higher")
    for st, l, h in zip(group, lo, hi):
        st.rank_interval = (l, h)


def _rows(st: _Setting, reference):
    m, recs, names, roles = len(st.recs), st.recs, st.names, st.roles
    value, n = st.value, st.n
    h, u = value["harmful_rate"], value["task_metric"]
    none, ceiling = st.undefended, st.ceiling
    if reference is None:
        h_ref = h[none] if none is not None else float(np.nanmax(h))
        u_ref = u[ceiling] if ceiling is not None else float(np.nanmin(u))
        reference = (float(h_ref), float(u_ref))
    ranks = st.pareto_rank
    # a single point's hypervolume (pareto.hypervolume of one point, the same two products), for all rows at once
    h_ref, u_ref = reference
    with np.errstate(invalid="ignore"):
        hv = np.where((h < h_ref) & (u > u_ref), (h_ref - h) * (u - u_ref), 0.0)
    h_none = h[none] if none is not None else np.nan
    h_al = h[ceiling] if ceiling is not None else np.nan
    u_none = u[none] if none is not None else np.nan
    reduction = (h_none - h) / (h_none - h_al) if h_none != h_al else np.full(m, np.nan)
    kept = u / u_none if u_none else np.full(m, np.nan)
    keys = list(
        zip(
            ranks.tolist(),
            (-hv).tolist(),
            (-np.nan_to_num(reduction, nan=-1e9)).tolist(),
            (-np.nan_to_num(kept, nan=-1e9)).tolist(),
            [r["method"]["label"] for r in recs],
        )
    )
    order = sorted(range(m), key=keys.__getitem__)
    lo_rank, hi_rank = st.rank_interval

    # the interpolation curve: the frontier rows, with the ceiling (alpha 0) and the undefended row
    # (alpha 1) as its ends
    curve = [(float(h[i]), float(u[i])) for i in range(m) if roles[i] == "frontier"]
    if curve:
        curve += [(float(h[i]), float(u[i])) for i in (ceiling, none) if i is not None]

    ci = st.ci
    pairs = [(i, none) for i in range(m) if none is not None and i != none]
    pairs += [(order[q], order[q + 1]) for q in range(m - 1)]
    # candidates for a tie: rank intervals overlap, Pareto ranks differ (rows of one rank share it)
    overlapping = [
        (i, j)
        for i in range(m)
        for j in range(i + 1, m)
        if lo_rank[i] <= hi_rank[j] and lo_rank[j] <= hi_rank[i] and ranks[i] != ranks[j]
    ]
    tests = _paired_many(st.samples, list(dict.fromkeys(pairs + overlapping)))
    tied = {i: [] for i in range(m)}
    for i, j in overlapping:
        if not _differ(tests[(i, j)], st, i, j):
            tied[i].append(j)
            tied[j].append(i)
    rows = []
    for pos, i in enumerate(order):
        row = {
            "setting": st.key,
            "position": pos + 1,
            "method": recs[i]["method"]["label"],
            "name": names[i],
            "role": roles[i],
            "pareto_rank": int(ranks[i]),
            "rank_interval": [float(lo_rank[i]), float(hi_rank[i])],
            "hypervolume": float(hv[i]),
            "harm_reduction_share": _f(reduction[i]),
            "utility_kept_share": _f(kept[i]),
            "record_id": recs[i]["record_id"],
            "judges": row_judges(recs[i]),  # the other judges' harmful rates, shown beside the primary's
            "curve": curve_of(recs[i]) if roles[i] != "reference" else recs[i]["method"]["label"],
            "params": recs[i]["method"].get("params") or {},
            "apply_s": (recs[i]["method"].get("info") or {}).get("apply_s"),
            "peak_rss_mb": (recs[i]["method"].get("info") or {}).get("peak_rss_mb"),
        }
        for a in SHOWN:
            row[a] = _f(value[a][i])
            row[f"{a}_ci_low"] = _f(ci[a][0][i]) if n[a][i] else None
            row[f"{a}_ci_high"] = _f(ci[a][1][i]) if n[a][i] else None
            row[f"{a}_n"] = int(n[a][i])
        row["vs_none"] = tests.get((i, none)) if none is not None and i != none else None
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        row["vs_next"] = tests[(i, nxt)] | {"next": recs[nxt]["method"]["label"]} if nxt is not None else None
        on_curve = roles[i] in ("frontier", "reference")
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
        row["utility"] = _utility(recs[i])
        rows.append(row)
    for row, i in zip(rows, order):
        row["tied_with"] = [recs[j]["method"]["label"] for j in sorted(tied[i], key=order.index)]
    return rows, reference, curve


def _differ(test: dict, st: _Setting, i: int, j: int) -> bool:
    """Whether rows i and j differ significantly on either axis: the paired McNemar result, or a
    two-proportion test from k and n where their outcomes do not pair (samples missing). Two axes
    are two tests: Holm over them rejects somewhere exactly when the smaller p is below alpha / 2
    (each at alpha, two rows that differ on neither would be told apart ~10% of the time)."""
    ps = []
    for a in AXES:
        p = test.get(a, {}).get("p")
        if p is None:
            p = stats.two_proportion_p(int(st.k[a][i]), int(st.n[a][i]), int(st.k[a][j]), int(st.n[a][j]))
        ps.append(p)
    return min(ps) < TIE_ALPHA / len(AXES)


def _paired_many(samples, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    """McNemar per pair and axis, batched per axis and prompt count over the pairs whose prompts line up."""
    out: dict[tuple[int, int], dict] = {pair: {} for pair in pairs}
    for a in AXES:
        length = [len(s[a]) if s and a in s else None for s in samples]  # None: no outcomes on this axis
        by_length: dict[int, list[tuple[int, int]]] = {}
        for i, j in pairs:
            out[(i, j)][a] = {"test": "n/a (samples missing or prompts differ)", "p": None}
            if length[i] is not None and length[i] == length[j]:
                by_length.setdefault(length[i], []).append((i, j))
        for ok in by_length.values():
            idx = sorted({x for pair in ok for x in pair})
            where = {x: r for r, x in enumerate(idx)}
            X = np.stack([samples[x][a] for x in idx])
            for (i, j), res in zip(ok, stats.mcnemar_many(X, [where[i] for i, _ in ok], [where[j] for _, j in ok])):
                out[(i, j)][a] = res
    return out


def _utility(record: dict) -> dict[str, dict]:
    """Every utility metric of a record (the setting's lm-eval tasks beside the task metric), by
    task: value, Wilson 95% interval and n, as the record has them."""
    out = {}
    for key, m in sorted(record["metrics"].items()):
        if key.startswith(UTILITY_PREFIX):
            n = int(m.get("n", 0))
            lo, hi = m.get("ci") or wilson_interval(m.get("k", round((m.get("value") or 0) * n)), n)
            out[key[len(UTILITY_PREFIX) :]] = {
                "name": m.get("name", key),
                "value": _f(m.get("value")),
                "ci_low": _f(lo),
                "ci_high": _f(hi),
                "n": n,
            }
    return out


def utility_tasks(board: Board) -> list[str]:
    """The utility tasks any row of the board reports, in name order (one set of columns each)."""
    return sorted({t for rows in board.settings.values() for r in rows for t in r.get("utility", {})})


def _categories(items) -> dict[str, dict[str, float]]:
    """Harmful rate per prompt category, per method: the record's by_category, else its samples."""
    out: dict[str, dict[str, float]] = {}
    for rec, path in items:
        by_category = rec["metrics"]["harmful_rate"].get("by_category")
        if by_category:
            out[rec["method"]["label"]] = {c: k / n for c, (k, n) in sorted(by_category.items()) if n}
            continue
        rows = _sample_rows(rec, path)
        if not rows:
            continue
        by: dict[str, list] = {}
        for row in rows:
            if row["metric"] == "harmful_rate" and row.get("outcome") is not None:
                by.setdefault(row.get("category") or "uncategorised", []).append(row["outcome"])
        out[rec["method"]["label"]] = {c: float(np.mean(v)) for c, v in sorted(by.items())}
    return dict(sorted(out.items()))  # method order, whatever order the records were read in


def _win_rates(settings: dict[str, list[dict]]) -> list[dict]:
    """HELM's mean win rate: share of the other methods beaten, a tie counting half (as HELM's
    compute_aggregate_row_win_rates), averaged over settings x axes."""
    wins: dict[str, list[float]] = {}
    for rows in settings.values():
        if len(rows) < 2:
            continue
        for r in rows:
            for a, better in (("harmful_rate", lambda x, y: x < y), ("task_metric", lambda x, y: x > y)):
                others = [o for o in rows if o is not r and o[a] is not None]
                if r[a] is None or not others:
                    continue
                won = sum(better(r[a], o[a]) + 0.5 * (r[a] == o[a]) for o in others)
                wins.setdefault(r["method"], []).append(won / len(others))
    agg = [{"method": mth, "mean_win_rate": float(np.mean(v)), "settings_x_axes": len(v)} for mth, v in wins.items()]
    return sorted(agg, key=lambda r: -r["mean_win_rate"])


def _f(x) -> float | None:
    """A JSON-able float, None for missing or nan."""
    if x is None:
        return None
    x = float(x)
    return None if x != x else x
