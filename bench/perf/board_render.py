"""Benchmark: a board of 10,000 records, every format (Markdown, CSV, JSON, HTML, PNG + SVG).

    python -m bench.perf.board_render [--records 10000] [--methods 10]

Records (with per-sample files, 150 harmful + 100 task prompts each) are spread over
records / methods settings. Reference, measured in the same run: loading and schema-validating the
same records, the floor any board has to pay. Prints the ratio of the full build + render to it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make(folder: Path, n_records: int, n_methods: int, seed: int = 0) -> None:

    rng = np.random.default_rng(seed)
    for i in range(n_records):
        setting, method = divmod(i, n_methods)
        harm = (rng.random(150) < rng.uniform(0.02, 0.9)).astype(int)
        util = (rng.random(100) < rng.uniform(0.1, 0.7)).astype(int)
        rid = f"{i:016x}"

        def metric(x):  # as bench.evaluate writes it: the compact outcomes ride in the record
            return {
                "value": float(x.mean()),
                "ci": [0.0, 1.0],
                "n": int(len(x)),
                "k": int(x.sum()),
                "outcomes": "".join(map(str, x)),
            }

        cats = {f"cat{c}": [int(harm[c::5].sum()), len(harm[c::5])] for c in range(5)}
        rec = {
            "schema_version": 1,
            "record_id": rid,
            "created": "2026-01-01T00:00:00+00:00",
            "setting": {
                "model": f"model-{setting % 7}",
                "task": f"task-{setting // 7}",
                "harmful_n": 100,
                "judge": "keyword",
                "seed": 0,
            },
            "method": {
                "name": ["aligned", "none"][method] if method < 2 else f"method{method}",
                "label": ["aligned", "none"][method] if method < 2 else f"method{method}",
                "params": {},
            },
            "inputs": {"aligned": "a" * 64, "evaluated": "b" * 64},
            "metrics": {
                "harmful_rate": metric(harm) | {"by_category": cats},
                "over_refusal": metric(util[:50]),
                "task_metric": metric(util),
            },
            "samples_file": f"{rid}.samples.jsonl",
            "cost": {"wall_s": 1.0, "peak_rss_mb": 1.0, "device": "cpu"},
            "versions": {},
        }
        rows = [{"metric": "harmful_rate", "doc_id": j, "outcome": int(o)} for j, o in enumerate(harm)]
        rows += [{"metric": "task_metric", "doc_id": j, "outcome": int(o)} for j, o in enumerate(util)]
        (folder / f"{rid}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{rid}.json").write_text(json.dumps(rec))


def main() -> None:
    from bench.leaderboard.build import build, load
    from bench.leaderboard.render import write

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--methods", type=int, default=10, help="methods per setting")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "records"
        folder.mkdir()
        make(folder, args.records, args.methods)
        t0 = time.perf_counter()
        loaded = load([folder])
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load([folder])
        board = build(loaded, multi_setting=True)
        t_build = time.perf_counter() - t0
        t1 = time.perf_counter()
        files = write(board, Path(tmp) / "out")
        t_render = time.perf_counter() - t1
        total = t_build + t_render
        sizes = {k: v.stat().st_size for k, v in files.items() if not k.startswith("pareto-")}
    result = {
        "records": args.records,
        "settings": len(board.settings),
        "reference_load_validate_s": round(t_load, 2),
        "build_s": round(t_build, 2),
        "render_s": round(t_render, 2),
        "total_s": round(total, 2),
        "ratio_total_vs_reference": round(total / t_load, 2),
        "bytes": sizes,
    }
    print(json.dumps(result, indent=2))
    if args.write:
        from bench.perf import write_section

        write_section(
            "board_render",
            "\n".join(
                [
                    f"{args.records:,} records ({len(board.settings):,} settings x {args.methods} methods, 150 "
                    "harmful + 100 task outcomes each, "
                    "carried in the records); every format. Reference: loading and schema-validating the same records.",
                    "",
                    "| | seconds |",
                    "|---|---|",
                    f"| reference: load + validate | {t_load:.2f} |",
                    f"| build (load, Pareto ranks, bootstrap rank intervals, McNemar, CIs) | {t_build:.2f} |",
                    f"| render (Markdown, CSV, JSON, HTML, {min(len(board.settings), 4)} Pareto plots as PNG + SVG) "
                    f"| {t_render:.2f} |",
                    f"| **total** (target 5 s) | **{total:.2f}** ({total / t_load:.1f}x the reference) |",
                ]
            ),
        )


if __name__ == "__main__":
    main()
