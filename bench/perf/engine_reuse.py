"""Benchmark: board evaluation with one vLLM engine for all rows against one engine a row.

    python -m bench.perf.engine_reuse --home HOME [--rows 4] [--write]

HOME is a realign home whose embedded default board is built; its models are only read. The rows
are the testbed's aligned model and the first ROWS - 1 defended models of HOME's cache
(defended-*/model): rows of one setting, as a board has them. Each row is evaluated as the runner
evaluates it (bench.evaluate.evaluate, the embedded default's sets and evaluation options), from an
EMPTY generation cache, twice in the same run:
- one engine a row (the reference): each row in a fresh interpreter of its own (run_fresh), as
  `generation.reuse_engine: false` does;
- one engine: every row in one kept interpreter (bench.new_interpreter.Interpreter) on the shared
  engine (bench.engine_pool): the first row starts it, each later row reloads its weights into it.
The two passes take turns row by row, and which of them goes first alternates: this machine's speed
drifts by up to 2x within an hour, and a pass run wholly after the other carried that drift into
the ratio (a reference pass in a slow phase made reuse look better than it is, and the other way).
Each row's time is its wall time as the runner waits for it (interpreter start and imports
included); every row's weights are read once before either pass, so neither pays cold disk reads.
The answers of the two passes are compared sample by sample. The ratio for a 20-row board is
projected from the measured parts: the first shared row, the mean of the later shared rows and
the mean row of the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.evaluate import EvalSets, evaluate
from bench.new_interpreter import Interpreter, run_fresh


def board_rows(home: Path, n: int) -> tuple[Path, list[Path]]:
    """(the testbed folder, the rows' model directories) of HOME's embedded default."""
    cache = home / "cache"
    testbeds = sorted(cache.glob("testbed-*/aligned"))
    if not testbeds:
        raise SystemExit(f"{home} holds no built testbed: run `realign run --home {home}` first")
    defended = sorted(p for p in cache.glob("defended-*/model") if (p / "config.json").exists())
    return testbeds[0].parent, [testbeds[0], *defended[: n - 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a realign home with the embedded board built (read only)")
    ap.add_argument("--rows", type=int, default=4, help="rows evaluated in each pass")
    ap.add_argument("--board-rows", type=int, default=20, help="rows of the board the ratio is projected to")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()

    from bench.runner import RunConfig

    testbed, rows = board_rows(args.home, args.rows)
    data = testbed / "data"
    sets = EvalSets(
        harmful=data / "harmful_evaluation.jsonl",
        over_refusal=data / "overrefusal_evaluation.jsonl",
        task=data / "sql_test.jsonl",
    )
    config = RunConfig(home=args.home).eval  # the embedded default's evaluation options
    names = [r.parent.name for r in rows]
    times: dict[str, list[float]] = {"per_row": [], "shared": []}
    answers: dict[str, list[list[str]]] = {"per_row": [], "shared": []}
    engines: list[str | None] = []
    for row in rows:  # both passes find the weights in the page cache: the first pass pays no cold reads
        for weights in row.glob("*.safetensors"):
            with open(weights, "rb") as f:
                while f.read(1 << 24):
                    pass
    with tempfile.TemporaryDirectory(prefix="realign-engine-reuse-") as tmp, Interpreter() as evaluator:
        for i, row in enumerate(rows):
            for mode in ("per_row", "shared") if i % 2 == 0 else ("shared", "per_row"):
                t0 = time.perf_counter()
                if mode == "per_row":
                    result = run_fresh(evaluate, str(row), sets, config, f"{tmp}/per_row")
                else:  # the kept interpreter's engine waits, idle, while a fresh one evaluates its row
                    result = evaluator.call(evaluate, str(row), sets, config, f"{tmp}/shared", reuse_engine=True)
                    engines.append(result["cost"]["generation"].get("engine"))
                times[mode].append(round(time.perf_counter() - t0, 1))
                answers[mode].append([s["answer"] for s in result["samples"]])
                how = f" ({engines[-1]})" if mode == "shared" else ""
                print(
                    f"{'one engine a row' if mode == 'per_row' else 'one engine'}: {row.parent.name}: "
                    f"{times[mode][-1]} s{how}",
                    flush=True,
                )

    same = [a == b for a, b in zip(answers["per_row"], answers["shared"])]
    total_ref, total_shared = sum(times["per_row"]), sum(times["shared"])
    first, later = times["shared"][0], times["shared"][1:]
    ref_mean = statistics.mean(times["per_row"])
    later_mean = statistics.mean(later) if later else first
    n = args.board_rows
    figures = {
        "rows": names,
        "seconds": times,
        "engine": engines,
        "answers_identical": same,
        "samples_per_row": len(answers["per_row"][0]),
        "ratio": round(total_shared / total_ref, 3),
        "projected_ratio": round((first + (n - 1) * later_mean) / (n * ref_mean), 3),
        "engine_start_and_first_row_extra_s": round(first - later_mean, 1),
        "saved_per_row_s": round(ref_mean - later_mean, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not all(same):
        raise SystemExit("the shared engine's answers differ from a fresh engine's: see answers_identical")
    if args.write:
        from bench.perf import write_section

        body = [
            f"{len(rows)} rows of the embedded default board (the testbed's aligned model and defended models of "
            f"its cache), each evaluated as the runner does ({figures['samples_per_row']} samples: harmful, "
            "over-refusal and SQL sets; vLLM bf16 eager, deterministic mode) from an empty generation cache, "
            "in the same run: one engine a row (each row in its own fresh interpreter) and one engine for all "
            "rows (one kept interpreter; each later row's weights reloaded into the live engine), the two taking "
            "turns row by row, each going first every other row.",
            "",
            "| row | one engine a row, s | one engine, s | engine | answers identical |",
            "|---|---|---|---|---|",
            *[
                f"| {name} | {a} | {b} | {e} | {'yes' if s else 'NO'} |"
                for name, a, b, e, s in zip(names, times["per_row"], times["shared"], engines, same)
            ],
            f"| **total** | **{total_ref:.1f}** | **{total_shared:.1f}** | | |",
            "",
            f"**One engine / one engine a row: {figures['ratio']:.2f}x** over these {len(rows)} rows. Projected to a "
            f"{n}-row board from the measured parts (first shared row {first} s, later shared rows "
            f"{later_mean:.1f} s on average, reference rows {ref_mean:.1f} s): **{figures['projected_ratio']:.2f}x** "
            "(target <= 0.6x).",
        ]
        write_section(
            "engine_reuse",
            "\n".join(body),
            command=f"python -m bench.perf.engine_reuse --home HOME --rows {args.rows} --write",
        )


if __name__ == "__main__":
    main()
