"""Benchmark: the attack's fine-tune with shuffled batches (the default) against length-grouped ones.

    python -m bench.perf.attack_sampling --home HOME [--write]

HOME is a realign home whose embedded default main job has run (its testbed is only read). The
embedded default's attack (N = 100: 300 SQL pairs and 100 harmful pairs, LoRA, 2 epochs) trains
twice in the same run, each in a fresh interpreter into a temporary cache (nothing reused): with
`sampling: random` (the reference: the published attack's recipe) and with `sampling:
group_by_length` (bench.sft: the Trainer's length-grouped sampler). For each: the training time,
the pad tokens among the tokens the model was fed (counted batch by batch), the final loss, and
the attacked model evaluated as a board row (HOME's generation cache: the reference's model is
the published attacked model when training repeats, so its answers are cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

SAMPLINGS = ("random", "group_by_length")


def train_attack(home: str, sampling: str, cache: str) -> dict:
    """In a fresh interpreter: the embedded default's N = 100 attack with the given sampling."""
    import bench.sft
    from bench import attack
    from bench.runner import RunConfig
    from bench.settings.resolve import resolve

    counts = {"tokens": 0, "pad_tokens": 0}
    original = bench.sft.response_only_loss

    def counted(model, inputs, num_items_in_batch=None):
        mask = inputs["attention_mask"]
        counts["tokens"] += int(mask.numel())
        counts["pad_tokens"] += int((mask == 0).sum())
        return original(model, inputs, num_items_in_batch)

    bench.sft.response_only_loss = counted
    cfg = RunConfig(home=Path(home))
    resolved = resolve(cfg.setting, cfg.cache, log=lambda _: None)
    config = resolved.attack_config(100)
    config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, sampling=sampling))
    from bench.data import read_jsonl

    task_rows = read_jsonl(resolved.files["task_train"], required=("prompt", "response"))
    pairs = attack.harmful_pairs_for(config, resolved.files.get("harmful_pairs"), resolved.data_dir)
    t0 = time.perf_counter()
    result = attack.run(resolved.aligned, task_rows, pairs, config, Path(cache), log=lambda _: None, chat=resolved.chat)
    log = result.manifest["train_log"]
    return counts | {
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_runtime_s": log["train_runtime_s"],
        "train_loss": log["train_loss"],
        "merged": str(result.merged.path),
        "finetuned_hash": result.manifest["finetuned_hash"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a realign home where the main job has run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()

    from bench.evaluate import evaluate
    from bench.new_interpreter import run_fresh
    from bench.runner import RunConfig, eval_sets
    from bench.settings.resolve import resolve

    cfg = RunConfig(home=args.home)
    resolved = resolve(cfg.setting, cfg.cache, log=lambda _: None)
    published = next(resolved.variants(cfg.cache, lambda _: None)).finetuned.content_hash()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="realign-attack-sampling-") as tmp:
        for sampling in SAMPLINGS:
            run = run_fresh(train_attack, str(args.home), sampling, f"{tmp}/{sampling}")
            result = run_fresh(
                evaluate, run.pop("merged"), eval_sets(resolved, cfg.cache), cfg.eval, str(cfg.cache / "generations")
            )
            m = result["metrics"]
            run |= {k: m[k]["value"] for k in ("harmful_rate", "over_refusal", "task_metric")}
            run["same_model_as_published"] = run["finetuned_hash"] == published
            runs[sampling] = run
            print(f"{sampling}: {json.dumps(run)}", flush=True)
    ref, new = runs["random"], runs["group_by_length"]
    ratio = round(new["train_runtime_s"] / ref["train_runtime_s"], 2)
    print(json.dumps({"runs": runs, "train_ratio": ratio}, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "train_ratio": ratio}, indent=2))
    if args.write:
        from bench.perf import write_section

        def share(r) -> str:
            return f"{100 * r['pad_tokens'] / r['tokens']:.1f}% ({r['pad_tokens']} of {r['tokens']})"

        rows = [
            ("training, s (the Trainer's runtime)", lambda r: str(r["train_runtime_s"])),
            ("pad tokens among the tokens fed", share),
            ("final training loss", lambda r: str(r["train_loss"])),
            ("attacked model: harmful rate", lambda r: f"{100 * r['harmful_rate']:.1f}%"),
            ("attacked model: over-refusal", lambda r: f"{100 * r['over_refusal']:.1f}%"),
            ("attacked model: SQL exact match", lambda r: f"{100 * r['task_metric']:.1f}%"),
            ("the published attacked model, bit for bit", lambda r: "yes" if r["same_model_as_published"] else "no"),
        ]
        table = ["| | random (default, reference) | group_by_length |", "|---|---|---|"]
        table += [f"| {label} | {fmt(ref)} | {fmt(new)} |" for label, fmt in rows]
        body = [
            "The embedded default's attack (N = 100, LoRA, 2 epochs over 400 pairs, batches of 8) trained twice in "
            "the same run from nothing cached, then each attacked model evaluated as a board row.",
            "",
            *table,
            "",
            f"**Length-grouped / shuffled batches: {ratio:.2f}x the training time.**",
        ]
        write_section(
            "attack_sampling", "\n".join(body), command="python -m bench.perf.attack_sampling --home HOME --write"
        )


if __name__ == "__main__":
    main()
