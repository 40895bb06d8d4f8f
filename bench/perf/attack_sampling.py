"""Benchmark: a fine-tune with shuffled batches against length-grouped ones (the attack's default).

    python -m bench.perf.attack_sampling --home HOME [--stage attack|alignment] [--write]

HOME is a realign home whose embedded default main job has run (its testbed is only read). One of
the main job's two fine-tunes trains twice in the same run, each in a fresh interpreter into a
temporary folder (nothing reused): with `sampling: random` (the reference: the safety fine-tune's recipe)
and with `sampling: group_by_length` (bench.sft: the Trainer's length-grouped sampler).
- `attack`: the embedded default's attack (N = 100: 300 SQL pairs and 100 harmful pairs, LoRA,
  2 epochs) on the testbed's aligned model;
- `alignment`: the testbed's safety fine-tune (full weights, 1 epoch over its alignment pairs) of
  the base model.
For each: the training time, the pad tokens among the tokens the model was fed (counted batch by
batch), the final loss, which of the two retrained the home's model bit for bit, and the
model evaluated as a board row (HOME's generation cache: a model the board already answered costs
little).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

SAMPLINGS = ("random", "group_by_length")


def _count_padding(counts: dict) -> None:
    """Count the tokens and pad tokens of every batch the fine-tune feeds the model."""
    import bench.sft

    original = bench.sft.response_only_loss

    def counted(model, inputs, num_items_in_batch=None):
        mask = inputs["attention_mask"]
        counts["tokens"] += int(mask.numel())
        counts["pad_tokens"] += int((mask == 0).sum())
        return original(model, inputs, num_items_in_batch)

    bench.sft.response_only_loss = counted


def train_once(home: str, stage: str, sampling: str, out: str) -> dict:
    """In a fresh interpreter: one of the main job's fine-tunes with the given sampling; returns its
    figures and the trained model's folder."""
    from bench import attack, models
    from bench.data import read_jsonl
    from bench.runner import RunConfig
    from bench.settings.resolve import resolve

    counts = {"tokens": 0, "pad_tokens": 0}
    _count_padding(counts)
    cfg = RunConfig(home=Path(home))
    resolved = resolve(cfg.setting, cfg.cache, log=lambda _: None)
    t0 = time.perf_counter()
    if stage == "attack":
        config = resolved.attack_config(100)
        config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, sampling=sampling))
        task_rows = read_jsonl(resolved.files["task_train"], required=("prompt", "response"))
        pairs = attack.harmful_pairs_for(config, resolved.files.get("harmful_pairs"), resolved.data_dir)
        result = attack.run(
            resolved.aligned, task_rows, pairs, config, Path(out), log=lambda _: None, chat=resolved.chat
        )
        log, model_dir, model_hash = result.manifest["train_log"], result.merged.path, result.manifest["finetuned_hash"]
    else:
        from bench.testbed.build import Testbed, TestbedConfig, _fine_tune

        testbed = resolved.aligned.path.parent  # the testbed's folder: aligned/, data/, manifest.json
        manifest = json.loads((testbed / "manifest.json").read_text())
        sft = dataclasses.replace(TestbedConfig(**manifest["config"]).alignment, sampling=sampling)
        pairs = read_jsonl(testbed / "data" / "alignment_pairs.jsonl", required=("prompt", "response"))
        model_dir = Path(out) / "aligned"
        base = Testbed(testbed, manifest).base
        log = _fine_tune(base, pairs, sft, model_dir, Path(out) / "trainer")
        model_hash = models.ModelHandle("aligned", model_dir).content_hash()
    return counts | {
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_runtime_s": log["train_runtime_s"],
        "train_loss": log["train_loss"],
        "model": str(model_dir),
        "model_hash": model_hash,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a realign home where the main job has run")
    ap.add_argument("--stage", choices=("attack", "alignment"), default="attack", help="which fine-tune to train")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()

    from bench.evaluate import evaluate
    from bench.new_interpreter import run_fresh
    from bench.runner import RunConfig, eval_sets
    from bench.settings.resolve import resolve

    cfg = RunConfig(home=args.home)
    resolved = resolve(cfg.setting, cfg.cache, log=lambda _: None)
    if args.stage == "attack":
        home_model = next(resolved.variants(cfg.cache, lambda _: None)).finetuned.content_hash()
    else:
        home_model = resolved.aligned.content_hash()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="realign-sampling-") as tmp:
        sets = eval_sets(resolved, cfg.cache)
        for sampling in SAMPLINGS:
            run = run_fresh(train_once, str(args.home), args.stage, sampling, f"{tmp}/{sampling}")
            result = run_fresh(evaluate, run.pop("model"), sets, cfg.eval, str(cfg.cache / "generations"))
            m = result["metrics"]
            run |= {k: m[k]["value"] for k in ("harmful_rate", "over_refusal", "task_metric")}
            run["same_model_as_home"] = run["model_hash"] == home_model
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

        model = "attacked model" if args.stage == "attack" else "aligned model"
        rows = [
            ("training, s (the Trainer's runtime)", lambda r: str(r["train_runtime_s"])),
            ("pad tokens among the tokens fed", share),
            ("final training loss", lambda r: str(r["train_loss"])),
            (f"{model}: harmful rate", lambda r: f"{100 * r['harmful_rate']:.1f}%"),
            (f"{model}: over-refusal", lambda r: f"{100 * r['over_refusal']:.1f}%"),
            (f"{model}: SQL exact match", lambda r: f"{100 * r['task_metric']:.1f}%"),
            (f"HOME's {model}, bit for bit", lambda r: "yes" if r["same_model_as_home"] else "no"),
        ]
        table = ["| | random (reference) | group_by_length |", "|---|---|---|"]
        table += [f"| {label} | {fmt(ref)} | {fmt(new)} |" for label, fmt in rows]
        trained = (
            "The embedded default's attack (N = 100, LoRA, 2 epochs over 400 pairs, batches of 8)"
            if args.stage == "attack"
            else "The testbed's safety fine-tune of the base model (full weights, 1 epoch over the alignment pairs, "
            "batches of 8)"
        )
        body = [
            f"{trained} trained twice in the same run from nothing cached, then each {model} evaluated as a board row.",
            "",
            *table,
            "",
            f"**Length-grouped / shuffled batches: {ratio:.2f}x the training time.**",
        ]
        stage_flag = "" if args.stage == "attack" else " --stage alignment"
        write_section(
            f"{args.stage}_sampling",
            "\n".join(body),
            command=f"python -m bench.perf.attack_sampling --home HOME{stage_flag} --write",
        )


if __name__ == "__main__":
    main()
