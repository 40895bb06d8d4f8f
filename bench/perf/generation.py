"""Benchmark: vLLM against transformers on the same model, prompts and new tokens (greedy).

    python -m bench.perf.generation [--model DIR] [--prompts 128] [--tokens 64]

Each engine runs in its own fresh interpreter (as the suite runs them) and is timed twice: engine
start, and generation alone. The ratio is against transformers, measured in the same run. Default
model: the embedded testbed's base; default prompts: the testbed's benign templates.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.atomic import atomic_write_text
from bench.new_interpreter import run_fresh


def _time_engine(engine: str, model_dir: str, n: int, tokens: int, **kwargs) -> dict:
    from bench import models
    from bench.generation import Sampling, TransformersGenerator, VLLMGenerator
    from bench.testbed.prompts import benign_prompts

    prompts = benign_prompts(n, 11)
    handle = models.resolve(model_dir)
    t0 = time.perf_counter()
    gen = (
        VLLMGenerator(handle, **kwargs) if engine == "vllm" else TransformersGenerator(handle, batch_size=32, **kwargs)
    )
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = gen.generate(prompts, Sampling(max_new_tokens=tokens))
    gen_s = time.perf_counter() - t0
    new_tokens = sum(len(gen.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {
        "engine": engine,
        "options": kwargs,
        "start_s": round(start, 1),
        "generate_s": round(gen_s, 1),
        "new_tokens": new_tokens,
        "tok_per_s": round(new_tokens / gen_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded base, converted)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    if args.model is None:
        from bench.perf import embedded_model_dir

        args.model = embedded_model_dir()
    runs = [
        run_fresh(_time_engine, "transformers", args.model, args.prompts, args.tokens, dtype="float32"),
        run_fresh(_time_engine, "transformers", args.model, args.prompts, args.tokens, dtype="bfloat16"),
        run_fresh(_time_engine, "vllm", args.model, args.prompts, args.tokens, dtype="bfloat16", enforce_eager=True),
        run_fresh(_time_engine, "vllm", args.model, args.prompts, args.tokens, dtype="bfloat16", enforce_eager=False),
    ]
    ref = runs[0]
    for r in runs:
        r["speedup_vs_transformers_fp32"] = round(r["tok_per_s"] / ref["tok_per_s"], 2)
        r["end_to_end_s"] = round(r["start_s"] + r["generate_s"], 1)
    print(json.dumps({"prompts": args.prompts, "tokens": args.tokens, "runs": runs}, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(runs, indent=2))
    if args.write:
        from bench.perf import write_section

        rows = [
            f"| {r['engine']} | {r['options']} | {r['start_s']} | {r['generate_s']} | {r['tok_per_s']} | "
            f"{r['speedup_vs_transformers_fp32']} |"
            for r in runs
        ]
        write_section(
            "generation",
            "\n".join(
                [
                    f"SmolLM2-135M-Instruct (the embedded base), {args.prompts} prompts x up to {args.tokens} new "
                    "tokens, greedy; each engine in "
                    "its own fresh interpreter. Reference: transformers fp32, same run.",
                    "",
                    "| engine | options | start s | generate s | new tok/s | speed vs reference |",
                    "|---|---|---|---|---|---|",
                    *rows,
                ]
            ),
        )


if __name__ == "__main__":
    main()
