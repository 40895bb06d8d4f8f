"""How far two labelings agree, and how a judge scores against human labels (scikit-learn's metrics).

    agreement(a, b)          -> {"kappa": Cohen's kappa, "percent": share of equal labels, "n": ...}
    validation(judged, human) -> accuracy, F1 (harmful as positive) and kappa, unknowns counted apart

`unknown` is a label like any other in agreement (a judge that cannot decide disagrees with one
that does); in validation an unknown verdict counts as wrong, never as safe.
"""

from __future__ import annotations

from pathlib import Path

from bench.errors import UserError


def agreement(a: list[str], b: list[str]) -> dict:
    from sklearn.metrics import cohen_kappa_score

    if len(a) != len(b) or not a:
        raise ValueError(f"agreement needs two labelings of the same non-empty items, got {len(a)} and {len(b)}")
    percent = sum(x == y for x, y in zip(a, b)) / len(a)
    # both raters constant and equal: kappa is undefined (0/0); perfect agreement reads as 1
    kappa = 1.0 if len(set(a) | set(b)) == 1 else float(cohen_kappa_score(a, b))
    return {"kappa": kappa, "percent": percent, "n": len(a)}


def validation(judged: list[str], human: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    out = agreement(judged, human)
    # F1 of the harmful class; labels= keeps "unknown" out of the positives (micro over one label is that class's F1)
    return {
        "accuracy": float(accuracy_score(human, judged)),
        "f1": float(f1_score(human, judged, labels=["harmful"], average="micro", zero_division=0.0)),
        "kappa": out["kappa"],
        "n": out["n"],
        "unknown": sum(j == "unknown" for j in judged),
    }


def read_labels(path: str | Path) -> list[dict]:
    """A JSONL of {prompt, answer, label in harmful|safe}; the first bad line fails in one line
    (file, line, field). An empty answer is a valid row: judges must label non-answers too."""
    from bench.data import read_jsonl

    rows = read_jsonl(path, required=("prompt", "label"))
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("answer"), str):
            raise UserError(f"{path}: row {number}: missing field 'answer'; each line needs prompt, answer and label")
        if row["label"] not in ("harmful", "safe"):
            raise UserError(f"{path}: row {number}: field 'label' is {row['label']!r}; use 'harmful' or 'safe'")
    return rows


# ------------------------------------------------------------------ judges on a board's answers

JUDGE_METRIC = "harmful_rate:"  # a record's metric per extra judge: harmful_rate:<judge label>
TOP_DISAGREEMENTS = 10


def judge_labels(record: dict) -> list[str]:
    """The judges of a record's harmful answers: its primary judge first, then the ones added by
    `realign judge` (metrics harmful_rate:<label>)."""
    return [record["setting"]["judge"]] + sorted(
        m[len(JUDGE_METRIC) :] for m in record["metrics"] if m.startswith(JUDGE_METRIC)
    )


def board_agreement(items: list[tuple[dict, Path | None]]) -> dict:
    """Per harmful set of one board setting: each judge's harmful rate, pairwise Cohen's kappa and
    percent agreement, and the answers the judges disagree on most.

    Read from the records' samples files (answers and labels); an answer given by several rows (the
    same model twice, or two models that answer alike) counts once: the question is how far the
    judges agree on answers, not on rows. {} when fewer than two judges labelled every row or the
    samples are not there (a published board keeps its records' outcomes, not the answers)."""
    from bench.records import load_samples

    judges = None
    for rec, _ in items:
        have = judge_labels(rec)
        judges = have if judges is None else [j for j in judges if j in have]
    if not judges or len(judges) < 2:
        return {}
    metric_of = {j: "harmful_rate" if i == 0 else JUDGE_METRIC + j for i, j in enumerate(judges)}
    answers: dict[tuple[str, str, str], dict] = {}  # (set, prompt, answer) -> labels, rows
    for rec, path in items:
        if path is None or not (Path(path).parent / rec["samples_file"]).exists():
            return {}
        sets = rec["setting"].get("resolved", {}).get("harmful_sets") or ["harmful"]
        by_metric: dict[str, dict] = {}
        for row in load_samples(path, rec):
            by_metric.setdefault(row["metric"], {})[row["doc_id"]] = row
        for doc_id, row in by_metric.get("harmful_rate", {}).items():
            # several sets are joined with each row's category prefixed by its set's name (bench.runner)
            where = sets[0] if len(sets) == 1 else str(row.get("category", "")).split("/", 1)[0]
            entry = answers.setdefault((where, row["prompt"], row["answer"]), {"labels": {}, "rows": []})
            entry["rows"].append(rec["method"]["label"])
            for j, m in metric_of.items():
                judged = by_metric.get(m, {}).get(doc_id)
                if judged is not None:
                    entry["labels"][j] = judged["label"]
    out = {}
    for where in sorted({k[0] for k in answers}):
        rows = [(k, v) for k, v in answers.items() if k[0] == where and len(v["labels"]) == len(judges)]
        if rows:
            out[where] = _agreement_of(judges, rows)
    return out


def _agreement_of(judges: list[str], rows: list[tuple[tuple, dict]]) -> dict:
    labels = {j: [v["labels"][j] for _, v in rows] for j in judges}
    rates = {}
    for j in judges:
        known = [x for x in labels[j] if x != "unknown"]
        rates[j] = {
            "harmful_rate": (sum(x == "harmful" for x in known) / len(known)) if known else None,
            "n": len(known),
            "unknown": len(labels[j]) - len(known),
        }
    pairs = [{"a": a, "b": b} | agreement(labels[a], labels[b]) for i, a in enumerate(judges) for b in judges[i + 1 :]]

    def split(v):  # share of judges outside the largest camp: 0 when all agree, 0.5 at an even split of two
        counts = [list(v["labels"].values()).count(x) for x in set(v["labels"].values())]
        return 1 - max(counts) / len(judges)

    ranked = sorted(rows, key=lambda kv: (-split(kv[1]), -len(kv[1]["rows"]), kv[0][1], kv[0][2]))
    disagreements = [
        {
            "prompt": k[1],
            "answer": k[2],
            "labels": dict(v["labels"]),
            "disagreement": split(v),
            "rows": sorted(set(v["rows"])),
        }
        for k, v in ranked[:TOP_DISAGREEMENTS]
        if split(v) > 0
    ]
    return {"n_answers": len(rows), "judges": rates, "pairs": pairs, "disagreements": disagreements}
