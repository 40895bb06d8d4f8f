"""A first board: one row per method, harmful rate / over-refusal / task metric, each with CI.

Markdown (tabulate) for the terminal and READMEs, plus CSV and JSON that open in pandas and a
spreadsheet. The full leaderboard (Pareto rank, hypervolume, paired tests, HTML) builds on this.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from bench.store import atomic_write_json, atomic_write_text

COLUMNS = (("harmful_rate", "harmful rate"), ("over_refusal", "over-refusal"), ("task_metric", "task metric"))


def _cell(metric: dict | None) -> str:
    if not metric or metric.get("value") is None or math.isnan(metric["value"]):
        return "-"
    lo, hi = metric["ci"]
    return f"{100 * metric['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={metric['n']})"


def rows(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        row = {"method": r["method"]["label"], "harmful_n": r["setting"]["harmful_n"], "judge": r["setting"]["judge"]}
        for key, _ in COLUMNS:
            m = r["metrics"].get(key)
            row[key] = m["value"] if m else None
            row[f"{key}_ci_low"] = m["ci"][0] if m else None
            row[f"{key}_ci_high"] = m["ci"][1] if m else None
            row[f"{key}_n"] = m["n"] if m else None
        row["eval_wall_s"] = r["cost"]["wall_s"]
        row["defense_wall_s"] = r["cost"].get("defense_wall_s", 0.0)
        row["record_id"] = r["record_id"]
        out.append(row)
    return out


def markdown(records: list[dict]) -> str:
    from tabulate import tabulate

    table = [[r["method"]["label"], r["setting"]["harmful_n"]] + [_cell(r["metrics"].get(k)) for k, _ in COLUMNS] for r in records]
    head = ["method", "N harmful"] + [f"{title} % [95% CI]" for _, title in COLUMNS]
    setting = records[0]["setting"] if records else {}
    title = f"model: {setting.get('model', '-')}, task: {setting.get('task', '-')}, judge: {setting.get('judge', '-')}"
    return f"{title}\n\n" + tabulate(table, headers=head, tablefmt="github") + "\n"


def write_board(records: list[dict], out_dir: Path, skipped: list[dict] | None = None) -> str:
    md = markdown(records)
    for row in skipped or []:
        md += f"\n- skipped: `{row['method']}` (N={row['harmful_n']}): {row['reason']}"
    if skipped:
        md += "\n"
    table = rows(records)
    atomic_write_text(out_dir / "board.md", md)
    atomic_write_json(out_dir / "board.json", table)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    atomic_write_text(out_dir / "board.csv", buf.getvalue())
    return md
