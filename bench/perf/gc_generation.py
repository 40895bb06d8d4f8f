"""Benchmark: vLLM generation with the cyclic garbage collector paused (as the suite runs it) against running.

    python -m bench.perf.gc_generation [--model DIR] [--prompts 150] [--tokens 64] [--rounds 4] [--write]

One engine (vLLM bf16, eager, deterministic mode: the suite's own VLLMGenerator) answers the same
prompts, cut into the suite's fixed batches, in alternating rounds: the collector running (the
reference; each batch through the generator's undecorated method), then paused (bench.gc_pause, as
`VLLMGenerator.generate` runs). Alternation spreads the machine's drift over both. Every round's
answers must equal the first round's, else nothing is written. Default model: the embedded
testbed's base; default prompts: the testbed's benign templates.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time


def _rounds(model_dir: str, n: int, tokens: int, rounds: int) -> dict:
    from bench import models
    from bench.generation import Sampling, VLLMGenerator, fixed_batches
    from bench.testbed.prompts import benign_prompts

    batches = fixed_batches(benign_prompts(n, 11))
    sampling = Sampling(max_new_tokens=tokens)
    seconds: dict[str, list[float]] = {"running": [], "paused": []}
    with VLLMGenerator(models.resolve(model_dir)) as gen:
        unpaused = VLLMGenerator._generate.__wrapped__  # the method as it was before the pause
        gen.generate(batches[0][:4], sampling)  # warm-up: the first step's one-off costs in neither
        first = None
        for _ in range(rounds):
            for mode in ("running", "paused"):
                assert gc.isenabled()
                t0 = time.perf_counter()
                if mode == "paused":
                    answers = [gen.generate(b, sampling) for b in batches]
                else:
                    answers = [unpaused(gen, b, sampling) for b in batches]
                seconds[mode].append(round(time.perf_counter() - t0, 2))
                first = first or answers
                if answers != first:
                    raise SystemExit("answers changed between rounds: nothing written")
                print(f"{mode}: {seconds[mode][-1]} s", flush=True)
    return {"batches": len(batches), "prompts": n, "tokens": tokens, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded base, converted)")
    ap.add_argument("--prompts", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of each mode, alternating")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    if args.model is None:
        from bench.perf import embedded_model_dir

        args.model = embedded_model_dir()
    from bench.new_interpreter import run_fresh

    out = run_fresh(_rounds, args.model, args.prompts, args.tokens, args.rounds)
    running, paused = (statistics.median(out["seconds"][m]) for m in ("running", "paused"))
    out["ratio"] = round(paused / running, 3)
    print(json.dumps(out, indent=2))
    if args.write:
        from bench.perf import write_section

        body = [
            f"The embedded base, {args.prompts} benign prompts in {out['batches']} fixed batches x up to {args.tokens} "
            f"new tokens, greedy; one vLLM engine (bf16, eager, deterministic mode); {args.rounds} alternating "
            "rounds of each mode, the same answers in every round. Reference: the collector running, same run.",
            "",
            "| collector | rounds, s | median, s | time vs reference |",
            "|---|---|---|---|",
            f"| running (reference) | {', '.join(map(str, out['seconds']['running']))} | {running:.2f} | 1.0 |",
            f"| paused (the suite) | {', '.join(map(str, out['seconds']['paused']))} | {paused:.2f} | "
            f"{out['ratio']:.2f} |",
        ]
        write_section(
            "gc_generation",
            "\n".join(body),
            command=f"python -m bench.perf.gc_generation --rounds {args.rounds} --write",
        )


if __name__ == "__main__":
    main()
