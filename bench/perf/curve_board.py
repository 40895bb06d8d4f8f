"""Benchmark: the curve board's cold time, stage by stage.

    python -m bench.perf.curve_board [--write]                      # the embedded default (hours here)
    python -m bench.perf.curve_board --preset smoke                 # the same pipeline at smoke sizes
    python -m bench.perf.curve_board --home DIR --defenses LIST     # other rows (realign run's syntax)

Runs `realign run --all-defenses --curves` (with both flagship modes: the default rows plus
gradient_restoration:mode=clean) as a user would, in a new home (cold: nothing cached), reads the
stage times the main job writes to runs/NAME/timings.json, and reports them grouped by stage kind
and by method curve: the testbed and attack, then per curve its defense applies and its
evaluations. The reference measured in the same run is the evaluation of the undefended row
(`none`): every stage's ratio to it says how many evaluations' worth of time the stage costs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = "gradient_restoration:mode=clean"  # with --all-defenses: every registered defense, both flagship modes
STAGE = re.compile(r"^(defense|evaluate) (?P<label>.+?) \(N=[^)]*\)$")


def run(home: Path, preset: str, defenses: str) -> dict:
    command = [sys.executable, "-m", "bench.cli", "run", "--home", str(home), "--preset", preset, "--curves"]
    command += ["--all-defenses", "--defenses", defenses] if defenses == ROWS else ["--defenses", defenses]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    name = "embedded-default" if preset == "default" else f"embedded-{preset}"
    timings = json.loads((home / "runs" / name / "timings.json").read_text())
    return timings | {"wall_s": round(time.perf_counter() - t0, 1), "command": command[3:]}


def curve_of_label(label: str) -> str:
    """'resta(gamma=0.5)' -> 'resta'; the row's curve as the board names it (defenses.curves)."""
    from defenses.curves import curve_label

    name, _, rest = label.partition("(")
    params = dict(item.split("=", 1) for item in rest.rstrip(")").split(",") if "=" in item)
    return curve_label(name, params)


def grouped(stages: dict[str, float]) -> dict:
    """Stage times by kind: pipeline stages as they are; defenses and evaluations summed per curve."""
    pipeline, curves = {}, {}
    for stage, secs in stages.items():
        m = STAGE.match(stage)
        if not m:
            pipeline[stage] = secs
            continue
        entry = curves.setdefault(curve_of_label(m["label"]), {"rows": 0, "defense_s": 0.0, "evaluate_s": 0.0})
        entry[f"{m[1]}_s"] = round(entry[f"{m[1]}_s"] + secs, 1)
        entry["rows"] += m[1] == "evaluate"
    evaluations = {m["label"]: s for k, s in stages.items() if (m := STAGE.match(k)) and m[1] == "evaluate"}
    if evaluations.get("none", 0) < 1:  # a cached record: the reference was not measured in this run
        raise SystemExit("the run did not evaluate `none` itself (its record was cached): time a run from a new home")
    return {"pipeline": pipeline, "curves": curves, "reference": ("the evaluation of `none`", evaluations["none"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", help="an empty folder for the run (default: a new temporary folder, removed after)")
    ap.add_argument("--preset", default="default", choices=("default", "smoke"), help="testbed and attack sizes")
    ap.add_argument(
        "--defenses",
        default=ROWS,
        help="rows in realign run's syntax (default: every registered defense and gradient_restoration:mode=clean)",
    )
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    ap.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="run nothing: report the stage times of a run already made (RUN_DIR/timings.json), e.g. the run that "
        "built a published board in a home whose testbed and attack were built before (their times are then absent)",
    )
    args = ap.parse_args()
    if args.from_run:
        timings = json.loads((Path(args.from_run) / "timings.json").read_text()) | {"command": None}
    else:
        home = Path(args.home or tempfile.mkdtemp(prefix="realign-curves-"))
        if (home / "cache").exists():
            ap.error(f"{home} already has a cache, so a run there is not cold; pass an empty folder")
        try:
            timings = run(home, args.preset, args.defenses)
        finally:
            if not args.home:
                shutil.rmtree(home, ignore_errors=True)
    result = grouped(timings["stages_s"]) | {"total_s": timings["total_s"], "command": timings["command"]}
    what, ref = result["reference"]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.write:
        from bench.perf import write_section

        made = (
            f"`realign {' '.join(result['command'])}`, cold"
            if result["command"]
            else f"The run `{Path(args.from_run).name}` (a stage it found cached shows ~0 s)"
        )
        lines = [
            f"{made}; stage times from the run's timings.json. Reference: {what} in the same run, {ref:.1f} s.",
            "",
            "| stage | seconds | x one evaluation |",
            "|---|---|---|",
            *[f"| {stage} | {s:.1f} | {s / ref:.1f} |" for stage, s in result["pipeline"].items()],
            "",
            "| curve | rows | defense s | evaluation s | x one evaluation |",
            "|---|---|---|---|---|",
            *[
                f"| {c} | {v['rows']} | {v['defense_s']:.1f} | {v['evaluate_s']:.1f} | "
                f"{(v['defense_s'] + v['evaluate_s']) / ref:.1f} |"
                for c, v in sorted(result["curves"].items(), key=lambda kv: -(kv[1]["defense_s"] + kv[1]["evaluate_s"]))
            ],
            f"| **total{', cold' if result['command'] else ''}** | | | **{result['total_s']:.0f}** "
            f"({result['total_s'] / 60:.1f} min) | "
            f"{result['total_s'] / ref:.0f} |",
        ]
        name = "curve_board" if args.preset == "default" else f"curve_board-{args.preset}"
        command = "python -m bench.perf.curve_board --write" + ("" if args.preset == "default" else " --preset smoke")
        command += f" --from-run {Path(args.from_run).name}" if args.from_run else ""
        write_section(name, "\n".join(lines), command=command)


if __name__ == "__main__":
    main()
