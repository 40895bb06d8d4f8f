"""The board's columns for judges beyond the primary one (added to records by `realign judge`).

The board ranks by the primary judge (the record's `harmful_rate`); every other judge's harmful
rate is shown in every row beside it, with its Wilson interval, n and unknown count, in Markdown,
HTML, CSV and JSON alike.
"""

from __future__ import annotations

from bench.judges.agreement import JUDGE_METRIC


def row_judges(record: dict) -> dict[str, dict]:
    """{judge label: {value, ci_low, ci_high, n, n_unknown}} of a record's extra judges."""
    out = {}
    for metric, m in sorted(record["metrics"].items()):
        if metric.startswith(JUDGE_METRIC):
            known = m.get("value") is not None and m.get("n", 0) > 0
            out[metric[len(JUDGE_METRIC) :]] = {
                "value": m["value"] if known else None,
                "ci_low": m["ci"][0] if known else None,
                "ci_high": m["ci"][1] if known else None,
                "n": m.get("n", 0),
                "n_unknown": m.get("n_unknown", 0),
            }
    return out


def judges_of(rows: list[dict]) -> list[str]:
    """The extra judges of a setting's rows, in a fixed order."""
    return sorted({j for r in rows for j in r.get("judges", {})})


def flat_columns(judge: str) -> list[str]:
    base = f"{JUDGE_METRIC}{judge}"
    return [base, f"{base}_ci_low", f"{base}_ci_high", f"{base}_n", f"{base}_unknown"]


def flat_values(row: dict, judge: str) -> list:
    j = row.get("judges", {}).get(judge)
    if j is None:
        return [None] * 5
    return [j["value"], j["ci_low"], j["ci_high"], j["n"], j["n_unknown"]]


def cell_text(row: dict, judge: str) -> tuple[str, str]:
    """(value %, interval and counts) of one judge in one row, '-' when it labelled nothing."""
    j = row.get("judges", {}).get(judge)
    if j is None:
        return "-", ""
    unknown = f" unknown={j['n_unknown']}" if j["n_unknown"] else ""
    if j["value"] is None:
        return "-", f"n=0{unknown}"
    return f"{100 * j['value']:.1f}", f"[{100 * j['ci_low']:.1f}, {100 * j['ci_high']:.1f}] n={j['n']}{unknown}"
