"""Evaluation: generate on the harmful, over-refusal and task sets (lm-eval), judge, measure.

    result = evaluate(model_dir, EvalSets(...), EvalConfig(judge="keyword"))

Generation runs all tasks of a model as one lm-eval call (one engine start); the judge then labels
every harmful-set answer in one batch. Each metric keeps its per-sample outcomes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import engine_pool, metrics, models, reproducibility
from bench.errors import UserError
from bench.generation import BATCH_TARGET, CachedGenerator, GenerationCache
from bench.hashing import hash_folder, hash_value
from bench.judges.stage import JudgeSpec, judge_from_spec, judged_sample, label_cached, parse_spec
from bench.lmeval_bridge import TaskRun, run_tasks
from bench.new_interpreter import own_peak_rss_mb


@dataclass(frozen=True)
class EvalSets:
    """The JSONL files the three metrics are measured on."""

    harmful: Path
    over_refusal: Path | None
    task: Path
    task_yaml: str = "realign_sql"
    task_metric: str = "exact_match"
    utility: dict[str, Path] = field(default_factory=dict)  # a suite utility task -> its documents


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
    batch_target: int = field(
        default=BATCH_TARGET,
        metadata={"help": "deterministic mode: prompts per fixed batch, on average (every answer depends on it)"},
    )
    engine_options: dict = field(
        default_factory=dict,
        metadata={
            "help": "vLLM options: tensor_parallel_size, pipeline_parallel_size, max_model_len, gpu_memory_utilization"
        },
    )
    utility: list[dict] = field(
        default_factory=list,
        metadata={"help": "lm-eval tasks reported beside the task metric: {task, num_fewshot, limit, metric}"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "let the model run code shipped with its weights"})
    max_new_tokens: dict = field(
        default_factory=dict,
        metadata={"help": "tokens per answer by kind of set (harmful, over_refusal, task, utility); else the YAML's"},
    )
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature (None: the YAML's)"})
    chat_template: str | None = field(default=None, metadata={"help": "chat template text (None: the tokenizer's)"})
    system_prompt: str | None = field(default=None, metadata={"help": "system turn before every prompt"})

    # fields added after records existed: at their defaults they stay out of to_dict (and so out of
    # every record id), so the records of a setting that does not use them keep their ids
    _LATER = {
        "max_new_tokens": {},
        "temperature": None,
        "chat_template": None,
        "system_prompt": None,
        "judge_options": {},
        "batch_target": BATCH_TARGET,
    }

    def later_set(self, *names: str) -> dict:
        """Those of the named later fields that differ from their defaults (the rest stay out of keys)."""
        return {k: getattr(self, k) for k in names if getattr(self, k) != self._LATER[k]}

    def to_dict(self) -> dict:
        out = asdict(self)
        # a task folder by its content hash: record ids name content, not where it lives
        out["utility"] = [
            u | {"include_path": hash_folder(Path(u["include_path"]).expanduser())} if u.get("include_path") else u
            for u in out["utility"]
        ]
        if out["chat_template"] is not None:  # records carry its hash (the text is in the setting's file)
            out["chat_template"] = hash_value(out["chat_template"])
        return {k: v for k, v in out.items() if k not in self._LATER or v != self._LATER[k]}

    @property
    def chat(self) -> models.ChatFormat:
        return models.ChatFormat(self.chat_template, self.system_prompt)

    def generation(self, kind: str) -> tuple[tuple[str, object], ...]:
        """lm-eval gen_kwargs over the task YAML's for one kind of set (TaskRun.generation)."""
        out = {}
        if kind in self.max_new_tokens:
            out["max_gen_toks"] = int(self.max_new_tokens[kind])
        if self.temperature is not None:
            out |= {"temperature": float(self.temperature), "do_sample": self.temperature > 0}
        return tuple(sorted(out.items()))

    def key(self) -> dict:
        """What a record id hashes: every field, without the judge weights' folder (the record's
        setting carries their content hash) and, as records before judge options did, without empty
        judge options."""
        out = self.to_dict()
        options = {k: v for k, v in out.pop("judge_options", {}).items() if k != "pretrained"}
        return out | ({"judge_options": options} if self.judge_options else {})

    def judge_spec(self) -> JudgeSpec:
        """The judge as this evaluation runs it: its name, with the setting's options (its weights'
        folder among them) over those written into the name."""
        spec = parse_spec(self.judge)
        return JudgeSpec(spec.name, spec.options | self.judge_options)

    def generator_options(self) -> dict:
        """What CachedGenerator passes to the engine: vLLM's own options under their names (those
        VLLMGenerator takes as arguments, the rest in engine_options, which go to vllm.LLM as they are)."""
        options = dict(self.engine_options)
        passed = {k: options.pop(k) for k in ("gpu_memory_utilization", "pipeline_parallel_size") if k in options}
        return (
            options
            | ({"engine_options": passed} if passed else {})
            | ({"trust_remote_code": True} if self.trust_remote_code else {})
            | ({} if self.chat.is_default else {"chat": self.chat})
        )


@functools.lru_cache(maxsize=1)
def scoring_identity(tasks_dir: Path | None = None) -> dict:
    """What turns a row's cached answers into its record's numbers, besides the row's inputs: the
    task YAMLs and their utils under tasks/, the judges' code and templates, the metrics (outcome
    rules, intervals) and lm-eval's version. Every record id names it, so that other scoring code
    scores again (from the cached answers: nothing is generated) instead of reusing a record it
    would not have written. Files by name and content, never by path or bytecode."""
    from importlib.metadata import version

    from bench.judges.stage import judges_code_hash
    from tasks import TASKS_DIR

    root = tasks_dir or TASKS_DIR
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".py"))
    return {
        "tasks": hash_value({p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in files}),
        "judges": judges_code_hash(),
        "metrics": hash_value(Path(metrics.__file__).read_text(encoding="utf-8")),
        "lm_eval": version("lm_eval"),
    }


METRIC_HELP = {
    "harmful_rate": ("share of harmful-set answers the judge labels harmful", False),
    "over_refusal": ("share of harmless-but-scary prompts the model refuses", False),
    "task_metric": ("task score on the test split", True),
}


def evaluate(model_path: str, sets: EvalSets, config: EvalConfig, cache_root: str, reuse_engine: bool = False) -> dict:
    """Run in a fresh process by the runner. Returns metrics, per-sample rows and cost.
    `reuse_engine`: generate on this process's shared vLLM engine (bench.engine_pool), with this
    model's weights loaded into it, when the runner evaluates several rows in one process."""
    t0 = time.perf_counter()
    pool = engine_pool.shared() if reuse_engine else None
    if pool is not None:
        pool.last = None
    handle = models.resolve(model_path)
    runs = task_runs(sets, config)
    with CachedGenerator(
        handle,
        GenerationCache(Path(cache_root)),
        engine=config.engine,
        dtype=config.dtype,
        mode=config.generation_mode,
        pool=pool,
        batch_target=config.batch_target,
        **config.generator_options(),
    ) as generator:
        out = run_tasks(generator, runs)

    # judging is its own cached stage (bench.judges.stage): verdicts keyed by the answers' content
    spec = config.judge_spec()
    judge = judge_from_spec(spec)
    if pool is not None and engine_pool.judge_needs_the_device(judge):
        pool.close()
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
        samples.append(judged_sample("harmful_rate", s, v, o, s["doc"].get("category", "")))
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
    outcomes = metrics.binary_outcomes(rows, sets.task_metric, sets.task_yaml)
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
        outcomes = metrics.binary_outcomes(rows, u["metric"], u["task"])
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

    # how this row got its engine (started, reloaded, kept); a row whose answers were all cached took none
    how_engine = {"engine": pool.last} if pool is not None and generator.started_engine else {}
    return {
        "metrics": result_metrics,
        "samples": samples,
        "cost": {
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": own_peak_rss_mb(),
            "device": _device(),
            "engine": generator.engine_used,
            "generation": generator.stats | how_engine,
        },
        "evaluated_hash": handle.content_hash(),
    }


def task_runs(sets: EvalSets, config: EvalConfig) -> list[TaskRun]:
    """What lm-eval runs for one model: the harmful, task, over-refusal and utility tasks, each with
    the setting's generation options for its kind of set."""
    runs = [
        TaskRun("realign_harmful", sets.harmful, config.limit, generation=config.generation("harmful")),
        TaskRun(sets.task_yaml, sets.task, config.limit, generation=config.generation("task")),
    ]
    if sets.over_refusal:
        runs.append(
            TaskRun(
                "realign_overrefusal", sets.over_refusal, config.limit, generation=config.generation("over_refusal")
            )
        )
    runs += [
        dataclasses.replace(utility_run(u, sets.utility.get(u["task"])), generation=config.generation("utility"))
        for u in config.utility
    ]
    return runs


def utility_run(u: dict, documents: Path | None = None) -> TaskRun:
    """A utility task as lm-eval runs it: a YAML under tasks/ with its documents (the setting
    resolved them), a task of the user's include_path, or a stock task name."""
    if u.get("include_path"):  # the user's own task folder
        return TaskRun(u["task"], None, u.get("limit"), u.get("num_fewshot"), include_path=u["include_path"])
    return TaskRun(u["task"], documents, u.get("limit"), u.get("num_fewshot"))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"cpu x{os.cpu_count()}"
