"""Benchmark: the flagship with its utility probe on transformers (the default) against vLLM.

    python -m bench.perf.probe_engine --home HOME [--write]

HOME is a realign home whose embedded default main job has run (the testbed and the N = 100 attack
are cached; they are only read). The flagship (gradient_restoration, default parameters) runs on
that attacked model twice in the same run, each as the runner runs a defense (bench.runner.
apply_and_save in a fresh interpreter, into a temporary folder, so nothing cached is reused):
first with `generation.probe_engine: transformers` (the reference), then `vllm` (bench.probe).
For each: the wall time as the runner waits for it, the defense's own split (info.json's
`timing_s`), its peak RSS, the probe's scores (s0, the floor, each checkpoint's) and the chosen
step; then each defended model is evaluated as a board row is (HOME's generation cache, so a
model the board already answered costs little) for its harmful rate and task metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

ENGINES = ("transformers", "vllm")


def flagship(home: Path, engine: str, out: Path) -> dict:
    """One flagship run with the given probe engine, then its defended model evaluated."""
    from bench.new_interpreter import run_fresh
    from bench.runner import Clock, RunConfig, apply_and_save, build_context, eval_sets
    from bench.settings import EMBEDDED_DEFAULT, load_setting
    from bench.settings.resolve import resolve

    setting = load_setting(EMBEDDED_DEFAULT, [f"generation.probe_engine={engine}"])
    cfg = RunConfig(home=home, setting=setting)
    resolved = resolve(setting, cfg.cache, log=lambda _: None)
    variant = next(resolved.variants(cfg.cache, lambda _: None))  # cached: HOME's main job made it
    ctx = build_context(resolved, variant, cfg, Clock())
    t0 = time.perf_counter()
    fresh_ctx = dataclasses.replace(ctx, _loaded={})
    info, skipped, _ = run_fresh(apply_and_save, "gradient_restoration", {}, fresh_ctx, str(out))
    wall = round(time.perf_counter() - t0, 1)
    figures = {
        "wall_s": wall,
        "timing_s": info["timing_s"],
        "peak_rss_mb": info["peak_rss_mb"],
        "s0": info["s0"],
        "floor": round(info["min_score"], 3),
        "checkpoint_scores": info["checkpoint_scores"],
        "chosen_step": info["chosen_step"],
        "skipped": skipped,
    }
    if skipped is None:
        from bench.evaluate import evaluate

        sets = eval_sets(resolved, cfg.cache)
        result = run_fresh(evaluate, str(out / "model"), sets, cfg.eval, str(cfg.cache / "generations"))
        m = result["metrics"]
        figures |= {"harmful_rate": m["harmful_rate"]["value"], "task_metric": m["task_metric"]["value"]}
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a realign home where the main job has run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory(prefix="realign-probe-engine-") as tmp:
        for engine in ENGINES:
            runs[engine] = flagship(args.home, engine, Path(tmp) / engine)
            print(f"probe on {engine}: {json.dumps(runs[engine])}", flush=True)
    ref, new = runs["transformers"], runs["vllm"]
    ratios = {
        "wall": round(new["wall_s"] / ref["wall_s"], 2),
        "probe": round(new["timing_s"]["probe_s"] / ref["timing_s"]["probe_s"], 2),
        "peak_rss": round(new["peak_rss_mb"] / ref["peak_rss_mb"], 2),
    }
    print(json.dumps({"runs": runs, "ratios": ratios}, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratios": ratios}, indent=2))
    if args.write:
        from bench.perf import write_section

        def pct(x) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        rows = [
            ("wall, s (the runner's wait)", "wall_s", str),
            ("utility probe, s (`timing_s.probe_s`)", None, lambda r: str(r["timing_s"]["probe_s"])),
            ("gradient passes, s", None, lambda r: str(r["timing_s"]["gradient_s"])),
            ("peak RSS, MB", "peak_rss_mb", lambda x: f"{x:.0f}"),
            ("s0 (the attacked model's dev score) / floor", None, lambda r: f"{r['s0']:.3f} / {r['floor']:.3f}"),
            ("checkpoint scores", "checkpoint_scores", lambda d: ", ".join(f"{k}: {v:.2f}" for k, v in d.items())),
            ("chosen step", "chosen_step", str),
            ("harmful rate (board evaluation)", None, lambda r: pct(r.get("harmful_rate"))),
            ("SQL exact match (board evaluation)", None, lambda r: pct(r.get("task_metric"))),
        ]
        table = ["| | transformers fp32 (default, reference) | vLLM bf16 |", "|---|---|---|"]
        for label, key, fmt in rows:
            cells = [fmt(r[key]) if key else fmt(r) for r in (ref, new)]
            table.append(f"| {label} | {cells[0]} | {cells[1]} |")
        body = [
            "The flagship (default parameters) on the embedded default's attacked model (N = 100), run as the "
            "runner runs a defense (a fresh interpreter, nothing cached), once with each utility probe engine "
            "in the same run; then its defended model evaluated as a board row.",
            "",
            *table,
            "",
            f"**vLLM probe / transformers probe: {ratios['probe']:.2f}x the probe's time, {ratios['wall']:.2f}x "
            f"the flagship's wall time, {ratios['peak_rss']:.2f}x its peak RSS.**",
        ]
        write_section("probe_engine", "\n".join(body), command="python -m bench.perf.probe_engine --home HOME --write")


if __name__ == "__main__":
    main()
