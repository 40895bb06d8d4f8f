"""Benchmark: where greedy answers diverge, and what deterministic generation costs.

    python -m bench.perf.determinism [--prompts 130] [--tokens 96] [--write]

The same prompts (the testbed's harmful attack prompts, whose answers the attack trains on) go
through the generator in fresh interpreters, several times and at several batch shapes; each
pair of runs is compared answer by answer. Then the cost: the default deterministic mode
(fixed content-defined batches, vLLM's engine core in-process) against the fast mode (vLLM's own
scheduling), generation time on the same prompts in the same run. Last, training: a LoRA
fine-tune of the base on the testbed's SQL pairs, twice with torch's deterministic algorithms
and twice without; each run's adapter weights are hashed and timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.new_interpreter import run_fresh

# (label, engine, mode, how the batches are made, generator options); the two modes alternate so
# that a machine getting busier or quieter during the run weighs on both alike
RUNS = [
    ("fast, run 1", "vllm", "fast-nondeterministic", "cache", {}),
    ("deterministic, run 1", "vllm", "deterministic", "cache", {}),
    ("fast, run 2", "vllm", "fast-nondeterministic", "cache", {}),
    ("deterministic, run 2", "vllm", "deterministic", "cache", {}),
    ("in-process, all prompts as one batch", "vllm", "deterministic", "one", {}),
    ("in-process, at most 8 sequences a step", "vllm", "deterministic", "one", {"engine_options": {"max_num_seqs": 8}}),
    (
        "transformers bf16, batches of 16",
        "transformers",
        "deterministic",
        "one",
        {"dtype": "bfloat16", "batch_size": 16},
    ),
    ("transformers bf16, batches of 8", "transformers", "deterministic", "one", {"dtype": "bfloat16", "batch_size": 8}),
    (
        "transformers fp32, batches of 16",
        "transformers",
        "deterministic",
        "one",
        {"dtype": "float32", "batch_size": 16},
    ),
    ("transformers fp32, batches of 8", "transformers", "deterministic", "one", {"dtype": "float32", "batch_size": 8}),
]


def _generate(
    model_dir: str, prompts: list[str], tokens: int, engine: str, mode: str, batching: str, options: dict
) -> dict:
    """One run in a fresh interpreter: 'cache' goes through CachedGenerator (the suite's path, an
    empty cache), 'one' hands every prompt to the engine as one batch."""
    from bench import models
    from bench.generation import CachedGenerator, GenerationCache, Sampling, make_generator

    handle = models.resolve(model_dir)
    sampling = Sampling(max_new_tokens=tokens)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if batching == "cache":
            with CachedGenerator(handle, GenerationCache(Path(tmp)), engine=engine, mode=mode, **options) as gen:
                texts = gen.generate(prompts, sampling)
                generate_s = gen.stats["seconds"]
        else:
            dtype = options.pop("dtype", None)
            with make_generator(handle, engine, dtype, mode=mode, **options) as gen:
                t1 = time.perf_counter()
                texts = gen.generate(prompts, sampling)
                generate_s = time.perf_counter() - t1
    return {"texts": texts, "generate_s": round(generate_s, 1), "total_s": round(time.perf_counter() - t0, 1)}


def _train(model_dir: str, pairs: list[dict], deterministic: bool) -> dict:
    """One LoRA fine-tune in a fresh interpreter: the sha256 of its adapter weights and its time."""
    import hashlib

    from bench import models
    from bench.sft import SFTConfig, train

    handle = models.resolve(model_dir)
    config = SFTConfig(method="lora", epochs=1.0, lr=2e-4, batch_size=8, max_length=192, deterministic=deterministic)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = train(
            models.load_model(handle, "float32"),
            models.load_tokenizer(handle),
            pairs,
            config,
            Path(tmp),
            progress=False,
        )
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return {"sha256": digest.hexdigest()[:16], "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded base, converted)")
    ap.add_argument("--prompts", type=int, default=130, help="how many of the testbed's attack prompts")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per answer (greedy)")
    ap.add_argument("--train-pairs", type=int, default=96, help="SQL pairs of the training comparison (0 = skip it)")
    ap.add_argument("--engines", default="vllm,transformers", help="which engines' runs to make, comma-separated")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    from bench.testbed import prompts as testbed_prompts
    from bench.testbed.build import TestbedConfig, embedded_base

    model = args.model or str(embedded_base(Path("realign-home/cache")).path)
    tb = TestbedConfig()
    split = testbed_prompts.split_harmful(
        testbed_prompts.harmful_pool(), tb.seed, tb.n_attack, tb.n_calibration, tb.n_eval
    )
    prompts = [r["prompt"] for r in split.attack][: args.prompts]
    results = {}
    for label, engine, mode, batching, options in [r for r in RUNS if r[1] in args.engines.split(",")]:
        results[label] = run_fresh(_generate, model, prompts, args.tokens, engine, mode, batching, dict(options))
        print(f"{label}: {results[label]['generate_s']} s", flush=True)

    def differ(a: str, b: str) -> int:
        return sum(x != y for x, y in zip(results[a]["texts"], results[b]["texts"]))

    pairs = [
        ("fast, run 1", "fast, run 2"),
        ("deterministic, run 1", "deterministic, run 2"),
        ("in-process, all prompts as one batch", "deterministic, run 1"),
        ("in-process, all prompts as one batch", "in-process, at most 8 sequences a step"),
        ("transformers bf16, batches of 16", "transformers bf16, batches of 8"),
        ("transformers fp32, batches of 16", "transformers fp32, batches of 8"),
    ]
    pairs = [(a, b) for a, b in pairs if a in results and b in results]
    training = []
    if args.train_pairs:
        from bench.testbed import sql_task

        sql_pairs = sql_task.generate(args.train_pairs, 0)
        for deterministic in (True, True, False, False):
            training.append({"deterministic": deterministic} | run_fresh(_train, model, sql_pairs, deterministic))
            print(f"training, deterministic={deterministic}: {training[-1]}", flush=True)

    fast = (results["fast, run 1"]["generate_s"] + results["fast, run 2"]["generate_s"]) / 2
    det = (results["deterministic, run 1"]["generate_s"] + results["deterministic, run 2"]["generate_s"]) / 2
    ratio = det / fast
    print(
        json.dumps(
            {"differ": {f"{a} | {b}": differ(a, b) for a, b in pairs}, "deterministic_over_fast": round(ratio, 2)},
            indent=2,
        )
    )
    if args.write:
        from bench.perf import write_section

        n = len(prompts)
        body = [
            f"{n} prompts (the testbed's harmful attack prompts) x up to {args.tokens} new tokens, greedy, "
            "SmolLM2-135M-Instruct "
            "(the embedded base); each run in its own fresh interpreter with an empty cache.",
            "",
            "| runs compared | answers that differ |",
            "|---|---|",
            *[f"| {a} / {b} | {differ(a, b)} of {n} |" for a, b in pairs],
            "",
            "| run | generation s |",
            "|---|---|",
            *[f"| {label} | {r['generate_s']} |" for label, r in results.items()],
            "",
            f"**Deterministic / fast generation time: {ratio:.2f}x** (mean of two runs each; target <= 1.3x).",
        ]
        if training:
            det_s = [t["seconds"] for t in training if t["deterministic"]]
            free_s = [t["seconds"] for t in training if not t["deterministic"]]
            body += [
                "",
                f"Training: LoRA (r 8, all linear layers), 1 epoch over {args.train_pairs} SQL pairs, batch 8, from "
                "the base; "
                "adapter weights hashed.",
                "",
                "| torch deterministic algorithms | adapter sha256 | seconds |",
                "|---|---|---|",
                *[f"| {t['deterministic']} | `{t['sha256']}` | {t['seconds']} |" for t in training],
                "",
                f"Deterministic / free training time: {sum(det_s) / sum(free_s):.2f}x.",
            ]
        write_section("determinism", "\n".join(body))


if __name__ == "__main__":
    main()
