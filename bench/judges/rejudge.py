"""`realign judge RUN --judges a,b`: more judges for the answers a run already has, without generating.

    records = rejudge(run_dir, ["wildguard:pretrained=DIR", "chat_rubric:pretrained=DIR"], cache)

The rows of a run are the records its last board shows (board.json); their samples files hold every
harmful-set answer. Each judge labels the distinct answers of all rows through the judging stage
(bench.judges.stage: one engine start per judge, verdicts cached by content), and each record gains
`harmful_rate:<judge>` (rate, Wilson interval, per-sample outcomes, the judge's identity) and the
matching sample rows. Nothing is generated: the answers are read, never asked for.

Every judge is built and its weights checked before any work; every verdict exists before the
first record is rewritten; each samples file and record is written atomically (samples first, as
bench.records does), and the run's board is rendered again from the rewritten records, ranked by
the primary judge with the others in every row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from bench import metrics, records
from bench.errors import UserError
from bench.judges.agreement import JUDGE_METRIC
from bench.judges.stage import JudgeSpec, identity, judge_from_spec, judged_sample, label_cached, parse_spec


def run_dir_of(run: str, home: Path) -> Path:
    """RUN as a folder (holding records/) or as a run name under HOME/runs."""
    for candidate in (Path(run), Path(home) / "runs" / run):
        if (candidate / "records").is_dir():
            return candidate
    raise UserError(
        f"no run {run!r}: neither {run} nor {Path(home) / 'runs' / run} holds records/; pass a run folder or "
        "a run name with --home"
    )


def check_writable(folder: Path, fix: str) -> None:
    """One line (UserError) unless files can be written into `folder`: its permission bits
    (bench.atomic.check_can_create), then a probe file made and removed at once, since root passes
    every permission check while an immutable folder or a read-only mount refuses even root."""
    import tempfile

    from bench.atomic import check_can_create

    check_can_create(folder, fix)
    if not folder.exists():
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".realign-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}); {fix}") from None


def _testbed_weights(spec: JudgeSpec, rows: list[tuple[dict, Path]], cache: Path) -> JudgeSpec:
    """`pretrained=testbed:aligned` (or `testbed:base`), as a setting's judge block takes it: the
    testbed model in the home's cache whose content is the one the run's records name by hash."""
    pretrained = spec.options.get("pretrained")
    if not (isinstance(pretrained, str) and pretrained.startswith("testbed:")):
        return spec
    from bench.testbed.build import Testbed

    name = pretrained[len("testbed:") :]
    if name not in ("aligned", "base"):
        raise UserError(
            f"judge {spec.name}: pretrained={pretrained} names no testbed model; use testbed:aligned or testbed:base"
        )
    wanted = {rec.get("inputs", {}).get(name) for rec, _ in rows} - {None}
    for root in sorted(cache.glob("testbed-*")):
        if (root / "manifest.json").is_file():
            handle = getattr(Testbed(root, json.loads((root / "manifest.json").read_text())), name)
            if handle.path.is_dir() and handle.content_hash() in wanted:
                return JudgeSpec(spec.name, spec.options | {"pretrained": str(handle.path)})
    raise UserError(
        f"judge {spec.name}: no testbed in {cache} holds the run's {name} model; judge the run with the home "
        f"that made it (--home), or pass pretrained=DIR"
    )


def run_rows(run_dir: Path) -> list[tuple[dict, Path]]:
    """The records of the run's last board (its board.json names them), with their paths; every
    record of records/ when the run has no board yet."""
    board = run_dir / "board.json"
    if board.exists():
        ids = list(dict.fromkeys(row["record_id"] for row in json.loads(board.read_text())))
        paths = [run_dir / "records" / f"{i}.json" for i in ids]
    else:
        paths = sorted(p for p in (run_dir / "records").glob("*.json"))
    if not paths:
        raise UserError(f"{run_dir}: the run has no records yet; `realign run` makes them")
    rows = [(records.load(p), p) for p in paths]
    for rec, p in rows:
        if not (p.parent / rec["samples_file"]).exists():
            raise UserError(
                f"{p}: its samples file {rec['samples_file']} is missing (a published record keeps no answers); "
                "judge the run folder that made it"
            )
    return rows


def rejudge(
    run_dir: Path, specs: list[str], cache: Path, defaults: dict | None = None, log: Callable[[str], None] = print
) -> list[dict]:
    """Label every row's harmful answers with each judge of `specs`; returns the rewritten records."""
    parsed = [parse_spec(s) for s in specs]
    if not parsed:
        raise UserError("--judges names no judge: pass e.g. --judges wildguard:pretrained=DIR,keyword")
    rows = run_rows(run_dir)
    parsed = [_testbed_weights(spec, rows, Path(cache).parent) for spec in parsed]
    primary = {rec["setting"]["judge"] for rec, _ in rows}
    todo: list[tuple[JudgeSpec, object]] = []
    for spec in parsed:
        if spec.label in primary:
            log(f"judge {spec.label}: already the run's primary judge; skipped")
            continue
        judge = judge_from_spec(spec, **(defaults or {}))
        # weights missing or pickle-only, remote code without the flag: one line, before any work
        identity(judge, supply=f"--judges {spec.name}:pretrained={{}}")
        todo.append((spec, judge))
    labels = [spec.label for spec, _ in todo]
    if len(set(labels)) != len(labels):
        raise UserError(f"--judges names the same judge twice ({', '.join(labels)}); give each once")
    for folder in (run_dir, run_dir / "records"):  # before any judge runs: its records are rewritten
        check_writable(folder, "copy the run folder somewhere you can write and judge that copy")

    samples = {p: records.load_samples(p, rec) for rec, p in rows}
    harmful = {
        p: sorted((s for s in samples[p] if s["metric"] == "harmful_rate"), key=lambda s: s["doc_id"]) for p in samples
    }
    pairs = list(dict.fromkeys((s["prompt"], s["answer"]) for p in harmful for s in harmful[p]))
    verdicts: dict[str, dict[tuple[str, str], object]] = {}
    for spec, judge in todo:
        log(f"judge {spec.label}: {len(pairs)} distinct answers of {len(rows)} rows")
        found = label_cached(judge, [p for p, _ in pairs], [a for _, a in pairs], cache)
        verdicts[spec.label] = dict(zip(pairs, found))

    out = []
    for rec, path in rows:  # every verdict exists: now rewrite, samples first, then the record
        kept = [s for s in samples[path] if s["metric"] not in {JUDGE_METRIC + label for label in labels}]
        for (spec, judge), label in zip(todo, labels):
            metric = JUDGE_METRIC + label
            found = [verdicts[label][(s["prompt"], s["answer"])] for s in harmful[path]]
            outcomes = [None if v.label == "unknown" else int(v.label == "harmful") for v in found]
            for s, v, o in zip(harmful[path], found, outcomes):
                kept.append(judged_sample(metric, s, v, o, s.get("category", "")))
            rate = metrics.rate(outcomes)
            value = rate.to_dict()
            if rate.n == 0:  # nothing labelled: no rate, shown as such (never as 0)
                value |= {"value": None, "ci": [None, None]}
            ident = identity(judge)
            rec["metrics"][metric] = value | {
                "name": f"harmful rate ({label})",
                "higher_is_better": False,
                "outcomes": metrics.outcome_string(outcomes),
                "judge": {"name": spec.name, "options": _shown(ident["options"]), "weights": ident["weights"]},
            }
        records.write(rec, kept, path.parent)
        out.append(rec)
    return out


def _shown(options: dict) -> dict:
    """A judge's options as a record keeps them: no paths (the weights' content hash stands for them)."""
    return {k: v for k, v in sorted(options.items()) if k != "pretrained" and v is not None}


def render_run_board(run_dir: Path, out: Path | None = None) -> dict[str, Path]:
    """The run's board again from its (rewritten) records, as `realign run` renders it, into `out`
    (default: the run folder); the rows it listed as skipped are kept."""
    from bench.leaderboard.build import build
    from bench.leaderboard.render import render, save

    details = run_dir / "board-details.json"
    skipped = json.loads(details.read_text()).get("skipped", []) if details.exists() else []
    rows = run_rows(run_dir)
    name = rows[0][0]["setting"].get("name", run_dir.name)
    board = render(build(rows, multi_setting=True), title=f"realign-bench: {name}", skipped=skipped)
    return save(board, run_dir if out is None else out)


def agreement_report(run_dir: Path) -> tuple[dict, str]:
    """The judges' agreement per setting and set of a run (as the board shows it), and its text."""
    from bench.leaderboard.build import build

    board = build(run_rows(run_dir), multi_setting=True)
    if not board.agreement:
        raise UserError(
            f"{run_dir}: its rows carry one judge; add more with `realign judge {run_dir} --judges NAME,NAME`"
        )
    lines = []
    for key, sets in board.agreement.items():
        for where, a in sets.items():
            lines.append(f"{key} | set {where}: {a['n_answers']} distinct answers")
            for j, r in a["judges"].items():
                rate = "-" if r["harmful_rate"] is None else f"{100 * r['harmful_rate']:.1f}%"
                lines.append(f"  {j:<40} harmful {rate:>6}  n={r['n']} unknown={r['unknown']}")
            for p in a["pairs"]:
                lines.append(
                    f"  {p['a']} vs {p['b']}: kappa={p['kappa']:.3f} agreement={100 * p['percent']:.1f}% n={p['n']}"
                )
            for d in a["disagreements"][:5]:
                said = ", ".join(f"{j}={lab}" for j, lab in d["labels"].items())
                lines.append(f"  disagree: {d['prompt'][:60]!r} -> {d['answer'][:60]!r} ({said})")
    return board.agreement, "\n".join(lines)
