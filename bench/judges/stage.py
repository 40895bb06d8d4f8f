"""The judging stage: a judge named by a spec, and its verdicts cached apart from generation.

    judge = judge_from_spec("chat_rubric:pretrained=DIR:rubric=xstest")
    verdicts = label_cached(judge, prompts, answers, cache_root)      # list[Verdict]

A spec is `name` or `name:key=value:...`, written as a board row is (`realign list judges` names
the judges; values are read as YAML scalars, so 0.5, 64 and false are numbers and booleans).

Judging is a stage of its own, after generation: it reads answers and writes verdicts, keyed by
the content of both. The distinct (prompt, answer) pairs of a call are cut into content-defined
batches (bench.generation.fixed_batches) and each batch is looked up in a SQLite cache under the
judge's identity (its name, its options, the content hash of its weights, the code and templates
it runs); the batches missed go to the judge together, one engine start for all of them. A
verdict therefore depends on its batch's content alone, and a cache key names exactly one
content: re-judging a run relabels nothing it labelled before and generates nothing.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from bench.errors import UserError
from bench.generation import GenerationCache, fixed_batches
from bench.hashing import hash_value
from bench.judges import JUDGES, Verdict
from bench.killpoints import checkpoint

# options that say how a judge runs, not what it decides: kept out of its board label
_RUN_OPTIONS = (
    "pretrained",
    "engine",
    "dtype",
    "trust_remote_code",
    "fresh_process",
    "mode",
    "tensor_parallel_size",
    "max_model_len",
    "enforce_eager",
    "gpu_memory_utilization",
    "max_num_seqs",
)


@dataclasses.dataclass
class JudgeSpec:
    """A judge as the user wrote it: its registered name and its options."""

    name: str
    options: dict

    @property
    def label(self) -> str:
        """What the board calls it: the name, with the options that change its verdicts (a rubric, a
        threshold); never a path."""
        shown = {k: v for k, v in sorted(self.options.items()) if k not in _RUN_OPTIONS}
        return self.name + (f"({','.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


def parse_spec(text: str) -> JudgeSpec:
    import yaml

    name, *items = [part.strip() for part in str(text).split(":")]
    if not name:
        raise UserError(f"a judge is written name or name:key=value:...; got {text!r} (see `realign list judges`)")
    JUDGES.get(name)  # an unknown name fails here, listing the known ones
    raw: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep and raw:  # a value holding colons: pretrained=testbed:aligned, a hub-style id
            last = next(reversed(raw))
            raw[last] += ":" + item
            continue
        if not sep or not key.strip():
            raise UserError(f"judge options are written {name}:key=value:...; got {item!r} in {text!r}")
        raw[key.strip()] = value
    return JudgeSpec(name, {k: yaml.safe_load(v) if v.strip() else "" for k, v in raw.items()})


def judge_from_spec(text: str | JudgeSpec, **defaults):
    """The judge a spec names, built with its options over `defaults` (engine, trust_remote_code
    from the command line); a rule-based judge takes no options."""
    from bench.judges import make_judge

    spec = text if isinstance(text, JudgeSpec) else parse_spec(text)
    cls = JUDGES.get(spec.name)
    if not getattr(cls, "takes_options", False):
        return make_judge(spec.name, **spec.options)
    try:
        return make_judge(spec.name, **({k: v for k, v in defaults.items() if v is not None} | spec.options))
    except TypeError as exc:  # an option the judge does not take
        raise UserError(f"judge {spec.name!r}: {exc}; see `realign list judges`") from None


class JudgementCache(GenerationCache):
    """Verdicts per batch of (prompt, answer) pairs, in their own SQLite file beside the answers."""

    FILE = "judgements.sqlite"


@lru_cache(maxsize=1)
def judges_code_hash() -> str:
    """The judges' code and templates: a change to a prompt or a rule changes every judge's key."""
    root = resources.files("bench.judges")
    files = sorted(
        [p for p in root.iterdir() if p.name.endswith(".py")]
        + [p for p in root.joinpath("templates").iterdir() if p.name.endswith(".txt")],
        key=lambda p: p.name,
    )
    return hash_value({p.name: p.read_text(encoding="utf-8") for p in files})


def identity(judge, supply: str | None = None) -> dict:
    """What decides a verdict besides its batch: the judge, its options, its weights' content, the code.
    `supply` says where this command takes the weights' folder, for the line when they are missing."""
    from bench import reproducibility

    options = dict(judge.options()) if hasattr(judge, "options") else {}
    weights = None
    if hasattr(judge, "check"):
        checked = judge.check(supply=supply) if supply else judge.check()
        weights = checked.content_hash()  # one line (and no work) when the weights are missing
        options.pop("pretrained", None)  # the path is where the content lives, not what it is
    return {
        "judge": judge.name,
        "options": options,
        "weights": weights,
        "code": judges_code_hash(),
        "compute": reproducibility.compute_fingerprint(),
    }


def label_cached(judge, prompts: list[str], answers: list[str], cache_root: Path | str) -> list[Verdict]:
    """judge's verdicts on (prompt, answer) pairs, through the judgement cache."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return []
    keys = [json.dumps([p, a], ensure_ascii=False) for p, a in zip(prompts, answers)]
    ident = identity(judge)
    cache = JudgementCache(Path(cache_root))
    found: dict[str, Verdict] = {}
    todo: list[list[str]] = []
    for batch in fixed_batches(keys):
        stored = cache.lookup(ident, batch)
        if stored is None:
            todo.append(batch)
        else:
            found.update(zip(batch, (Verdict(**v) for v in stored)))
    if todo:
        pairs = [[tuple(json.loads(k)) for k in batch] for batch in todo]
        if hasattr(judge, "label_batches"):
            labelled = judge.label_batches(pairs)  # one engine for every batch missed
        else:
            labelled = [judge.label([p for p, _ in b], [a for _, a in b]) for b in pairs]
        for batch, verdicts in zip(todo, labelled):
            checkpoint("judge", JudgementCache.key(ident, batch)[:16])  # judged, not yet stored
            cache.store(ident, batch, [dataclasses.asdict(v) for v in verdicts])
            found.update(zip(batch, verdicts))
    return [found[k] for k in keys]


def judged_sample(metric: str, sample: dict, verdict: Verdict, outcome: int | None, category: str) -> dict:
    """One judged harmful answer as a record's samples file keeps it: the evaluation writes the
    primary judge's rows, `realign judge` each later judge's (the same fields, so a reader never
    needs to know which wrote a row)."""
    return {
        "metric": metric,
        "doc_id": sample["doc_id"],
        "prompt": sample["prompt"],
        "answer": sample["answer"],
        "label": verdict.label,
        "outcome": outcome,
        "judge_raw": verdict.raw,
        **({"score": verdict.score} if verdict.score is not None else {}),
        "category": category,
    }
