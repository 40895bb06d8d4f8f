"""Benchmark: board evaluation with one vLLM engine for all rows against one engine a row.

    python -m bench.perf.engine_reuse --home HOME [--run-args "--all-defenses ..."] [--rows N] [--write]

The rows are the board of `realign run --home HOME RUN_ARGS` (default: the 20-row embedded board,
`--all-defenses --defenses gradient_restoration:mode=clean`), in the board's order, listed by the
runner itself (bench.runner.defended_rows): a defense HOME's cache lacks is applied first, outside
the timing, as the runner would. `--rows N` keeps the board's first N rows. Rows that answer with
one model folder (aligned and interpolation at alpha 0, none and alpha 1) stay in the board as
they do in the runner: the later of two finds its answers in the pass's generation cache.
Each row is evaluated as the runner evaluates it (bench.evaluate.evaluate, the setting's sets and
evaluation options), from an EMPTY generation cache for each pass, twice in the same run:
- one engine a row (the reference): each row in a fresh interpreter of its own (run_fresh), as
  the runner does with `generation.reuse_engine: false`;
- one engine: every row in one kept interpreter (bench.new_interpreter.Interpreter) on the shared
  engine (bench.engine_pool), as the runner does by default: the first row starts it, each later
  row reloads its weights into it.
The two passes take turns row by row, and which of them goes first alternates: this machine's speed
drifts by up to 2x within an hour, and a pass run wholly after the other carried that drift into
the ratio (a reference pass in a slow phase made reuse look better than it is, and the other way).
Each row's time is its wall time as the runner waits for it (interpreter start and imports
included); every row's weights are read once before either pass, so neither pays cold disk reads.
The answers of the two passes are compared sample by sample. With fewer rows than the board
named by --board-rows, the ratio for that board is also projected from the measured parts: the
first shared row, the mean of the later shared rows and the mean row of the reference.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

from bench.evaluate import EvalConfig, EvalSets, evaluate
from bench.new_interpreter import Interpreter, run_fresh

DEFAULT_RUN_ARGS = "--all-defenses --defenses gradient_restoration:mode=clean"


def board_rows(home: Path, run_args: str) -> tuple[EvalSets, EvalConfig, list[tuple[str, Path]]]:
    """(the sets, the evaluation options, the rows as (label, model folder)) of the first fine-tuned
    model's board of `realign run --home HOME RUN_ARGS`, listed by the runner's own code."""
    from bench import models
    from bench.cli import build_parser, main_job_config
    from bench.runner import Clock, _timed_variants, defended_rows, eval_config, eval_sets, row_label
    from bench.settings.resolve import resolve

    cfg = main_job_config(build_parser().parse_args(["run", "--home", str(home), *shlex.split(run_args)]))
    clock = Clock()
    resolved = resolve(cfg.setting, cfg.cache, log=clock.say)
    variant = next(_timed_variants(resolved, cfg, clock))
    rows = []
    for name, params, _, model_dir in defended_rows(resolved, variant, cfg, clock, skipped=[]):
        rows.append((row_label(name, params), models.resolve(model_dir).path))
    return eval_sets(resolved, cfg.cache), eval_config(resolved, cfg), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a realign home whose testbed and attack are built")
    ap.add_argument(
        "--run-args",
        default=DEFAULT_RUN_ARGS,
        help=f"the `realign run` options whose board is evaluated (default: {DEFAULT_RUN_ARGS!r}, the 20-row board)",
    )
    ap.add_argument("--rows", type=int, default=None, help="evaluate only the board's first ROWS rows")
    ap.add_argument("--board-rows", type=int, default=20, help="rows of the board a shorter run is projected to")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()

    sets, config, rows = board_rows(args.home, args.run_args)
    rows = rows[: args.rows] if args.rows else rows
    labels = [label for label, _ in rows]
    times: dict[str, list[float]] = {"per_row": [], "shared": []}
    answers: dict[str, list[list[str]]] = {"per_row": [], "shared": []}
    engines: list[str | None] = []
    for folder in dict.fromkeys(path for _, path in rows):  # the first pass pays no cold reads
        for weights in Path(folder).glob("*.safetensors"):
            with open(weights, "rb") as f:
                while f.read(1 << 24):
                    pass
    with tempfile.TemporaryDirectory(prefix="realign-engine-reuse-") as tmp, Interpreter() as evaluator:
        for i, (label, path) in enumerate(rows):
            for mode in ("per_row", "shared") if i % 2 == 0 else ("shared", "per_row"):
                t0 = time.perf_counter()
                if mode == "per_row":
                    result = run_fresh(evaluate, str(path), sets, config, f"{tmp}/per_row")
                else:  # the kept interpreter's engine waits, idle, while a fresh one evaluates its row
                    result = evaluator.call(evaluate, str(path), sets, config, f"{tmp}/shared", reuse_engine=True)
                    engines.append(result["cost"]["generation"].get("engine") or "cached")
                times[mode].append(round(time.perf_counter() - t0, 1))
                answers[mode].append([s["answer"] for s in result["samples"]])
                how = f" ({engines[-1]})" if mode == "shared" else ""
                print(
                    f"{'one engine a row' if mode == 'per_row' else 'one engine'}: {label}: {times[mode][-1]} s{how}",
                    flush=True,
                )

    same = [a == b for a, b in zip(answers["per_row"], answers["shared"])]
    total_ref, total_shared = sum(times["per_row"]), sum(times["shared"])
    n = args.board_rows
    figures = {
        "run_args": args.run_args,
        "rows": labels,
        "folders": [Path(path).parent.name for _, path in rows],
        "seconds": times,
        "engine": engines,
        "answers_identical": same,
        "samples_per_row": len(answers["per_row"][0]),
        "ratio": round(total_shared / total_ref, 3),
    }
    projection = ""
    if len(rows) < n:  # a shorter run: project to the board, from rows that each generate (none cached)
        first, later = times["shared"][0], times["shared"][1:]
        ref_mean = statistics.mean(times["per_row"])
        later_mean = statistics.mean(later) if later else first
        figures["projected_ratio"] = round((first + (n - 1) * later_mean) / (n * ref_mean), 3)
        projection = (
            f" Projected to a {n}-row board from the measured parts (first shared row {first} s, later shared rows "
            f"{later_mean:.1f} s on average, reference rows {ref_mean:.1f} s): **{figures['projected_ratio']:.2f}x**."
        )
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not all(same):
        raise SystemExit("the shared engine's answers differ from a fresh engine's: see answers_identical")
    if args.write:
        from bench.perf import write_section

        body = [
            f"The {len(rows)} rows of the board of `realign run {args.run_args}` on the embedded default, in the "
            f"board's order (the runner's own row list; rows that answer with one model folder find their answers "
            f"in the pass's cache, as in the runner), each evaluated as the runner does "
            f"({figures['samples_per_row']} samples: harmful, over-refusal and SQL sets; vLLM bf16 eager, "
            "deterministic mode) from an empty generation cache, in the same run: one engine a row (each row in its "
            "own fresh interpreter) and one engine for all rows (one kept interpreter; each later row's weights "
            "reloaded into the live engine), the two taking turns row by row, each going first every other row.",
            "",
            "| row | model folder | one engine a row, s | one engine, s | engine | answers identical |",
            "|---|---|---|---|---|---|",
            *[
                f"| `{label}` | {folder} | {a} | {b} | {e} | {'yes' if ok else 'NO'} |"
                for label, folder, a, b, e, ok in zip(
                    labels, figures["folders"], times["per_row"], times["shared"], engines, same
                )
            ],
            f"| **total** | | **{total_ref:.1f}** | **{total_shared:.1f}** | | |",
            "",
            f"**One engine / one engine a row: {figures['ratio']:.2f}x** over these {len(rows)} rows (target <= 0.6x "
            f"for the {n}-row board).{projection}",
        ]
        rows_flag = f" --rows {args.rows}" if args.rows else ""
        if args.run_args != DEFAULT_RUN_ARGS:
            rows_flag += f" --run-args {shlex.quote(args.run_args)}"
        write_section(
            "engine_reuse",
            "\n".join(body),
            command=f"python -m bench.perf.engine_reuse --home HOME{rows_flag} --write",
        )


if __name__ == "__main__":
    main()
