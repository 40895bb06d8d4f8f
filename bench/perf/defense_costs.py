"""Benchmark table: what each defense cost on one run, read from its result records.

    python -m bench.perf.defense_costs leaderboards/embedded-default/records [--write]

Every record carries the defense's own wall time and its fresh process's peak RSS (the runner
applies each defense in a fresh interpreter), beside the three metrics. The reference is the
evaluation of the same row (`cost.wall_s`), measured in the same run: the ratio says whether a
defense costs more or less than measuring it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def table(folder: Path) -> str:
    from bench.leaderboard.build import load

    rows = []
    for record, _ in load([folder]):
        cost, m = record["cost"], record["metrics"]
        wall = cost.get("defense_wall_s") or 0.0
        rows.append(
            (
                record["method"]["label"],
                wall,
                cost.get("defense_peak_rss_mb"),
                cost.get("wall_s") or 0.0,
                m["harmful_rate"]["value"],
                m["task_metric"]["value"],
                m.get("over_refusal", {}).get("value"),
            )
        )
    rows.sort(key=lambda r: (-r[1], r[0]))
    lines = [
        "| defense | apply, s | peak RSS of its process, MB | evaluation, s | apply / evaluation | harmful % | task "
        "% | over-refusal % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, wall, rss, ev, harm, task, over in rows:
        lines.append(
            f"| `{label}` | {wall:.1f} | {f'{rss:.0f}' if rss else '-'} | {ev:.1f} | {wall / ev if ev else 0:.2f} | "
            f"{100 * harm:.1f} | {100 * task:.1f} | {'-' if over is None else f'{100 * over:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", help="a folder of result records (one run)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    body = table(Path(args.records))
    print(body)
    if args.write:
        from bench.perf import write_section

        write_section(
            "defense_costs",
            f"Records in `{args.records}` (one run: `realign run --all-defenses`, N = 100, keyword judge). "
            "Rows where apply is 0 reuse a model that exists already (reference rows, interpolation's end points, "
            "a defense cached from an earlier run of the same inputs).\n\n" + body,
            command=f"python -m bench.perf.defense_costs {args.records} --write",
        )


if __name__ == "__main__":
    main()
