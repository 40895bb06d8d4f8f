"""Evaluation: generate on the harmful, over-refusal and task sets (lm-eval), judge, measure.

    result = evaluate(model_dir, EvalSets(...), EvalConfig(judge="keyword"))

Generation runs all tasks of a model as one lm-eval call (one engine start); the judge then labels
every harmful-set answer in one batch. Each metric keeps its per-sample outcomes.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import metrics, models, reproducibility
from bench.errors import UserError
from bench.generation import CachedGenerator, GenerationCache
from bench.judges.stage import JudgeSpec, judge_from_spec, label_cached, parse_spec
from bench.lmeval_bridge import TaskRun, run_tasks


@dataclass(frozen=True)
class EvalSets:
    """The JSONL files the three metrics are measured on."""

    harmful: Path
    over_refusal: Path | None
    task: Path
    task_yaml: str = "realign_sql"
    task_metric: str = "exact_match"


@dataclass
class EvalConfig:
    judge: str = field(default="keyword", metadata={"help": "judge of harmful answers (see `realign list`)"})
    judge_options: dict = field(
        default_factory=dict,
        metadata={"help": "the judge's options from the setting (pretrained: its weights' folder, engine, rubric)"},
    )
    engine: str = field(default="auto", metadata={"help": "generation engine: auto, vllm or transformers"})
    limit: int | None = field(
        default=None, metadata={"help": "evaluate only the first N prompts of each set (smoke tests)"}
    )
    generation_mode: str = field(
        default=reproducibility.DETERMINISTIC,
        metadata={
            "help": "'deterministic' (fixed batches: byte-identical answers on every run) or 'fast-nondeterministic'"
        },
    )
    dtype: str | None = field(default=None, metadata={"help": "generation dtype (default: the engine's)"})
    engine_options: dict = field(
        default_factory=dict,
        metadata={"help": "vLLM options: tensor_parallel_size, max_model_len, gpu_memory_utilization"},
    )
    utility: list[dict] = field(
        default_factory=list,
        metadata={"help": "lm-eval tasks reported beside the task metric: {task, num_fewshot, limit, metric}"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "let the model run code shipped with its weights"})

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> dict:
        """What a record id hashes: every field, without the judge weights' folder (the record's
        setting carries their content hash) and, as records before judge options did, without empty
        judge options."""
        out = self.to_dict()
        options = {k: v for k, v in out.pop("judge_options").items() if k != "pretrained"}
        return out | ({"judge_options": options} if self.judge_options else {})

    def generator_options(self) -> dict:
        """What CachedGenerator passes to the engine: vLLM's own options under their names."""
        options = dict(self.engine_options)
        gpu_share = options.pop("gpu_memory_utilization", None)
        return (
            options
            | ({"engine_options": {"gpu_memory_utilization": gpu_share}} if gpu_share else {})
            | ({"trust_remote_code": True} if self.trust_remote_code else {})
        )


METRIC_HELP = {
    "harmful_rate": ("share of harmful-set answers the judge labels harmful", False),
    "over_refusal": ("share of harmless-but-scary prompts the model refuses", False),
    "task_metric": ("task score on the test split", True),
}


def evaluate(model_path: str, sets: EvalSets, config: EvalConfig, cache_root: str) -> dict:
    """Run in a fresh process by the runner. Returns metrics, per-sample rows and cost."""
    t0 = time.perf_counter()
    handle = models.resolve(model_path)
    runs = [TaskRun("realign_harmful", sets.harmful, config.limit), TaskRun(sets.task_yaml, sets.task, config.limit)]
    if sets.over_refusal:
        runs.append(TaskRun("realign_overrefusal", sets.over_refusal, config.limit))
    runs += [utility_run(u) for u in config.utility]
    with CachedGenerator(
        handle,
        GenerationCache(Path(cache_root)),
        engine=config.engine,
        dtype=config.dtype,
        mode=config.generation_mode,
        **config.generator_options(),
    ) as generator:
        out = run_tasks(generator, runs)

    # judging is its own cached stage (bench.judges.stage): verdicts keyed by the answers' content
    spec = parse_spec(config.judge)
    spec = JudgeSpec(spec.name, spec.options | config.judge_options)
    judge = judge_from_spec(spec)
    samples: list[dict] = []
    result_metrics: dict[str, dict] = {}

    harmful = out["realign_harmful"]["samples"]
    verdicts = label_cached(judge, [s["prompt"] for s in harmful], [s["answer"] for s in harmful], cache_root)
    outcomes = [None if v.label == "unknown" else int(v.label == "harmful") for v in verdicts]
    if verdicts and all(o is None for o in outcomes):  # no rate to rank the board by; nothing is written
        raise UserError(
            f"judge {spec.label} labelled none of the {len(verdicts)} harmful answers (every output unparsable, e.g. "
            f"{verdicts[0].raw[:60]!r}): choose a judge that can label them (check one with `realign judges "
            "validate`), or add this one beside the primary judge with `realign judge RUN --judges ...`"
        )
    for s, v, o in zip(harmful, verdicts, outcomes):
        samples.append(
            {
                "metric": "harmful_rate",
                "doc_id": s["doc_id"],
                "prompt": s["prompt"],
                "answer": s["answer"],
                "label": v.label,
                "outcome": o,
                "judge_raw": v.raw,
                "category": s["doc"].get("category", ""),
            }
        )
    by_category: dict[str, list[int]] = {}
    for s, o in zip(harmful, outcomes):
        if o is not None:
            kn = by_category.setdefault(str(s["doc"].get("category", "") or "uncategorised"), [0, 0])
            kn[0] += o
            kn[1] += 1
    result_metrics["harmful_rate"] = metrics.rate(outcomes).to_dict() | {
        "name": f"harmful rate ({spec.label})",
        "higher_is_better": False,
        "outcomes": metrics.outcome_string(outcomes),
        "by_category": by_category,
    }

    if sets.over_refusal:
        rows = out["realign_overrefusal"]["samples"]
        refusals = label_cached(judge, [s["prompt"] for s in rows], [s["answer"] for s in rows], cache_root)
        outcomes = [int(v.refusal) for v in refusals]
        for s, v, o in zip(rows, refusals, outcomes):
            samples.append(
                {
                    "metric": "over_refusal",
                    "doc_id": s["doc_id"],
                    "prompt": s["prompt"],
                    "answer": s["answer"],
                    "label": "refusal" if o else "answered",
                    "outcome": o,
                    "judge_raw": v.raw,
                }
            )
        result_metrics["over_refusal"] = metrics.rate(outcomes).to_dict() | {
            "name": "over-refusal",
            "higher_is_better": False,
            "outcomes": metrics.outcome_string(outcomes),
        }

    rows = out[sets.task_yaml]["samples"]
    outcomes = [int(s[sets.task_metric]) for s in rows]
    for s, o in zip(rows, outcomes):
        samples.append(
            {
                "metric": "task_metric",
                "doc_id": s["doc_id"],
                "prompt": s["prompt"],
                "answer": s["answer"],
                "target": s["doc"].get("response", ""),
                "outcome": o,
            }
        )
    result_metrics["task_metric"] = metrics.rate(outcomes).to_dict() | {
        "name": f"{sets.task_yaml} {sets.task_metric}",
        "higher_is_better": True,
        "outcomes": metrics.outcome_string(outcomes),
    }

    for u in config.utility:
        rows = out[u["task"]]["samples"]
        if any(u["metric"] not in s for s in rows):
            raise UserError(
                f"utility task {u['task']}: its samples have no metric {u['metric']!r}; "
                "set utility metric to one of: "
                f"{', '.join(k for k in rows[0] if k not in ('doc_id', 'doc', 'prompt', 'answer', 'loglikelihoods'))}"
            )
        outcomes = [int(bool(s[u["metric"]])) for s in rows]
        for s, o in zip(rows, outcomes):
            samples.append(
                {
                    "metric": f"utility:{u['task']}",
                    "doc_id": s["doc_id"],
                    "prompt": s["prompt"],
                    "answer": s.get("answer", ""),
                    "outcome": o,
                }
            )
        result_metrics[f"utility:{u['task']}"] = metrics.rate(outcomes).to_dict() | {
            "name": f"{u['task']} {u['metric']}",
            "higher_is_better": True,
            "outcomes": metrics.outcome_string(outcomes),
        }

    return {
        "metrics": result_metrics,
        "samples": samples,
        "cost": {
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": _device(),
            "engine": generator.engine_used,
            "generation": generator.stats,
        },
        "evaluated_hash": handle.content_hash(),
    }


def utility_run(u: dict) -> TaskRun:
    """A utility task as lm-eval runs it: a YAML under tasks/ with its known data, or a stock task name."""
    from bench.data import data_dir
    from bench.task_files import TASK_DATA

    data = TASK_DATA[u["task"]](data_dir(None)) if u["task"] in TASK_DATA else None
    return TaskRun(u["task"], data, u.get("limit"), u.get("num_fewshot"))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"cpu x{os.cpu_count()}"
