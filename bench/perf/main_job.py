"""Benchmark: the main job on the embedded default, cold (nothing cached) and warm (everything cached).

    python -m bench.perf.main_job [--home DIR] [--write]          # cold run in a new folder, then warm
    python -m bench.perf.main_job --home DIR --cold-done --write  # DIR holds a cold run of this benchmark: warm only

Runs `realign run` as a user would (a subprocess), reads the stage times the main job writes to
runs/embedded-default/timings.json, and reports them against the issue's targets (cold <= 15 min on
an idle machine; a fully cached rerun <= 2 min, which is the stage cache's and manifests' overhead).
The reference is the cold run itself: the warm run's ratio to it is the cache's saving. Cold runs
take about 20 minutes here; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.atomic import atomic_write_text


def _run(home: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--home", str(home)], check=True, stdout=subprocess.DEVNULL
    )
    timings = json.loads((home / "runs" / "embedded-default" / "timings.json").read_text())
    return timings | {"wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", help="folder for the run (default: a new temporary folder, removed after)")
    ap.add_argument(
        "--cold-done", action="store_true", help="HOME already holds a cold run: take its timings.json, run warm only"
    )
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="realign-mainjob-"))
    try:
        kept = home / "perf-main-job-cold.json"  # the warm run rewrites the run's timings.json: keep the cold ones
        if args.cold_done:
            if not kept.exists():
                ap.error(f"{kept} is missing: --cold-done needs a home where this benchmark ran cold")
            cold = json.loads(kept.read_text())
        else:
            if (home / "cache").exists():
                ap.error(
                    f"{home} already has a cache, so a run there is not cold; pass an empty folder, or --cold-done"
                )
            cold = _run(home)
            atomic_write_text(kept, json.dumps(cold, indent=2))
        warm = _run(home)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    result = {"cold": cold, "warm": warm, "warm_over_cold": round(warm["total_s"] / cold["total_s"], 4)}
    print(json.dumps(result, indent=2))
    if args.write:
        from bench.perf import write_section

        rows = [f"| {stage} | {secs:.1f} |" for stage, secs in cold["stages_s"].items()]
        # what no stage timed (starting the run, rendering the board), so that the table sums to its total
        rows.append(f"| outside the stages | {cold['total_s'] - sum(cold['stages_s'].values()):.1f} |")
        write_section(
            "main_job",
            "\n".join(
                [
                    "`realign run` on the embedded default (aligned, none, flagship; N = 100), stage times from the "
                    "run's timings.json.",
                    "",
                    "| stage (cold) | seconds |",
                    "|---|---|",
                    *rows,
                    f"| **total, cold** (target 900 s) | **{cold['total_s']:.0f}** ({cold['total_s'] / 60:.1f} min; "
                    f"wall {cold['wall_s']:.0f} s with the interpreter's start) |",
                    f"| **total, warm: every stage cached** (target 120 s) | **{warm['total_s']:.1f}** "
                    f"({result['warm_over_cold']:.4f}x cold; wall {warm['wall_s']:.1f} s: start, imports, manifests "
                    "and content hashes checked, board rendered) |",
                ]
            ),
        )


if __name__ == "__main__":
    main()
