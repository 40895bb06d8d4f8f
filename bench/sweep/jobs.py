"""A sweep's jobs: the grid expanded into independent, idempotent jobs, and the function that runs one.

    jobs = expand(spec, spec_dir, cache)       # names and parameters checked here, before any work
    result = run_job(jobs[0], home, run_id)    # what every executor calls, in whatever process it has

A job is keyed by the content hash of its inputs (the validated setting, the content of every
file and model it names, its defense row). It runs the pipeline's own stages (bench.runner,
bench.settings.resolve): each is cached by content, so running a job again, or a job retried
after its worker died, redoes only what had not finished. Three kinds, run in this order (each
kind after the ones it needs):
- setting: resolve the setting (builds the testbed, merges a LoRA adapter, writes named sets);
- attack: one fine-tuned model per (setting, harmful N, seed);
- row: one board row: the defense, then the evaluation (generation and judging) and its record.

Each job writes, under HOME/sweeps/jobs/KEY/: status.json (its stages as they pass, for the live
progress), log.txt (everything it and its fresh interpreters print) and, once finished,
result.json (what it made; `realign sweep --dry-run` reads it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bench.errors import UserError
from bench.hashing import hash_file, hash_model_dir, hash_value, short
from bench.progress import log
from bench.sweep.spec import DefenseEntry, SettingEntry, SweepSpec

STAGES = ("setting", "attack", "defense", "evaluation")
KIND_STAGES = {"setting": ("setting",), "attack": ("attack",), "row": ("defense", "evaluation")}
KINDS = tuple(KIND_STAGES)
# outcomes of a stage: made now, found in the cache (or nothing to make), not applicable to its inputs, failed
COMPUTED, REUSED, SKIPPED, FAILED, RUNNING, LEFT = "computed", "reused", "skipped", "failed", "running", "left"
# test hook: "STAGE:MARKER" makes the first job that finishes STAGE (the one that creates MARKER) end its
# process with os._exit, as a worker killed mid-job; used to show that an executor's retry finishes the job
EXIT_AFTER_ENV = "REALIGN_SWEEP_EXIT_AFTER"


@dataclass
class Job:
    key: str  # content hash of the inputs
    kind: str  # setting | attack | row
    label: str
    setting: dict  # the validated setting of this job, as plain data
    harmful_n: int | None = None
    seed: int = 0
    judge: str = "keyword"
    defense: str | None = None
    params: dict = field(default_factory=dict)
    needs: str | None = None  # key of the job that must finish first
    num_cpus: int | None = None  # torch threads (the executor's CPU request)

    @property
    def stages(self) -> tuple[str, ...]:
        return KIND_STAGES[self.kind]

    def row(self) -> dict:
        """The job as the dry-run table and the summary show it."""
        return {
            "job": short(self.key)[:10],
            "kind": self.kind,
            "setting": self.setting["name"],
            "N": "-" if self.harmful_n is None else self.harmful_n,
            "seed": self.seed,
            "judge": self.judge if self.kind == "row" else "-",
            "defense": self.label if self.kind == "row" else "-",
        }


# ------------------------------------------------------------------------------------------ expansion


def expand(spec: SweepSpec, spec_dir: Path, cache: Path) -> list[Job]:
    """The grid as jobs (settings, then attacks, then rows; duplicates once). Every setting is
    resolved without building anything, every defense, parameter and judge name checked: bad input
    is one line (UserError) before any work starts."""
    from bench.judges import JUDGES
    from bench.settings import load_setting
    from bench.settings.resolve import resolve

    jobs: dict[str, Job] = {}
    for judge in spec.judges or []:
        JUDGES.get(judge)
    for entry in spec.settings:
        entry = SettingEntry(setting=entry) if isinstance(entry, str) else entry
        base = load_setting(_setting_source(entry.setting, spec_dir), entry.set)
        ns = entry.harmful_n if entry.harmful_n is not None else spec.harmful_n
        if ns is not None and base.attack is None:
            raise UserError(
                f"sweep spec: harmful_n is given, but setting {base.name!r} gives its fine-tuned model (no attack "
                "section); give that setting its own harmful_n: [] entry or drop harmful_n"
            )
        if ns is None:
            ns = list(base.attack.harmful_n) if base.attack else [None]
        if any(n is not None and n < 0 for n in ns):
            raise UserError(f"sweep spec: harmful_n takes non-negative integers, found {ns}")
        _check_gpus(base, spec)
        resolve(base, cache, log=log.debug, check=True)  # files, sets, models, names: checked, nothing built
        rows = _rows(spec.defenses if spec.defenses is not None else base.defenses)
        files = file_hashes(base.model_dump(mode="json"))
        plain = _plain(base, defenses=[])
        setting_job = _job("setting", f"setting {base.name}", _without(plain, "judge", "seed", "notes"), files, spec)
        jobs.setdefault(setting_job.key, setting_job)
        for n, seed in itertools.product(ns, spec.seeds or [base.seed]):
            variant = _with_variant(plain, n, seed)
            parent = setting_job
            if base.attack is not None:
                atk = _job("attack", f"attack N={n} seed={seed}", _without(variant, "judge", "notes"), files, spec)
                atk = dataclasses.replace(atk, harmful_n=n, seed=seed, needs=setting_job.key)
                jobs.setdefault(atk.key, atk)
                parent = atk
            for judge in spec.judges or [base.judge]:
                judged = variant | {"judge": judge}
                for name, params in rows:
                    label = name + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
                    row = _job("row", label, judged, files, spec, {"defense": name, "params": params})
                    row = dataclasses.replace(
                        row, harmful_n=n, seed=seed, judge=judge, defense=name, params=params, needs=parent.key
                    )
                    jobs.setdefault(row.key, row)
    return sorted(jobs.values(), key=lambda j: KINDS.index(j.kind))


def _setting_source(text: str, spec_dir: Path) -> str:
    """A setting entry: a file beside the spec, a file as given, or a shipped name."""
    beside = (spec_dir / text).expanduser()
    return str(beside) if beside.is_file() else text


def _check_gpus(setting, spec: SweepSpec) -> None:
    g = setting.generation
    need = (g.tensor_parallel_size or 1) * (g.pipeline_parallel_size or 1)
    if need > 1 and spec.resources.num_gpus < need:
        raise UserError(
            f"setting {setting.name!r} asks vLLM for {need} GPUs (tensor_parallel_size x pipeline_parallel_size) "
            f"but the sweep gives a job {spec.resources.num_gpus:g}; set resources.num_gpus: {need}"
        )


def _rows(entries: list) -> list[tuple[str, dict]]:
    """(name, params) per board row, each checked against the defense's parameters; a defense's own
    sweep (interpolation's alpha) applies where the entry does not sweep or fix that parameter."""
    from bench.runner import expand as expand_rows
    from defenses import DEFENSES
    from defenses.base import parse_params

    rows: list[tuple[str, dict]] = []
    for entry in entries:
        if isinstance(entry, str):
            rows += expand_rows([entry], {})
            continue
        entry: DefenseEntry
        cls = DEFENSES.get(entry.name)
        if not entry.sweep:
            rows += expand_rows([entry.name], {entry.name: dict(entry.params)})
            continue
        keys = list(entry.sweep)
        for values in itertools.product(*(entry.sweep[k] for k in keys)):
            params = dict(entry.params) | dict(zip(keys, values))
            parse_params(cls.Params, params)
            rows.append((entry.name, params))
    for name, params in rows:
        parse_params(DEFENSES.get(name).Params, params)
    return list({hash_value(r): r for r in rows}.values())


def _plain(setting, **changes) -> dict:
    return setting.model_dump(mode="json") | changes


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _with_variant(plain: dict, n: int | None, seed: int) -> dict:
    out = dict(plain) | {"seed": seed}
    if n is not None:
        out["attack"] = dict(out["attack"]) | {"harmful_n": [n]}
    return out


def _job(kind: str, label: str, setting: dict, files: dict, spec: SweepSpec, row: dict | None = None) -> Job:
    from bench.evaluate import scoring_identity

    # a row's record names the scoring code (bench.evaluate.scoring_identity): so does its job
    scoring = {"scoring": scoring_identity()} if kind == "row" else {}
    key = hash_value({"kind": kind, "setting": setting, "files": files, "row": row} | scoring)
    return Job(key, kind, label, setting, seed=setting.get("seed", 0), num_cpus=spec.resources.num_cpus)


def file_hashes(value: Any) -> dict[str, str]:
    """The content hash of every local file and model folder a setting names (hub ids, named sets and
    testbed: entries are not paths; the stages key those by their content when they resolve them)."""
    out: dict[str, str] = {}

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and not v.startswith("testbed:"):
            path = Path(v).expanduser()
            if path.is_file():
                out[v] = hash_file(path)
            elif path.is_dir() and any((path / f).exists() for f in ("config.json", "adapter_config.json")):
                out[v] = hash_model_dir(path)

    walk(value)
    return out


# ------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class JobFiles:
    root: Path

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts"


def job_files(home: Path | str, key: str) -> JobFiles:
    return JobFiles(Path(home) / "sweeps" / "jobs" / short(key))


def run_job(job: Job, home: str, run_id: str, gpu_ids: list[str] | None = None) -> dict:
    """Run one job here (the executor chose the process); never raises for a failure of the job
    itself: the result says failed, with a one-line reason and the log's path. `gpu_ids`: the GPUs
    the executor gave it (default: CUDA_VISIBLE_DEVICES)."""
    from bench.atomic import atomic_write_json

    files = job_files(home, job.key)
    files.root.mkdir(parents=True, exist_ok=True)
    status = {
        "key": job.key,
        "kind": job.kind,
        "label": job.label,
        "run_id": run_id,
        "attempt": _attempt(files, run_id),
        "state": RUNNING,
        "stage": None,
        "stages": {s: LEFT for s in job.stages},
        "log": str(files.log),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "gpu_ids": _visible_gpus() if gpu_ids is None else [str(i) for i in gpu_ids],
        "started": time.time(),
    }
    atomic_write_json(files.status, status)
    with _output_to(files.log), _threads(job.num_cpus), _info_lines():
        log.info(f"job {short(job.key)} ({job.kind} {job.label}) attempt {status['attempt']} on {status['host']}")
        try:
            RUNNERS[job.kind](job, Path(home), _Stages(status, files))
            status["state"] = SKIPPED if SKIPPED in status["stages"].values() else "done"
        except Exception as exc:  # a job's failure is its result; the sweep goes on with the others
            status["state"] = FAILED
            status["reason"] = one_line(exc)
            if status["stage"]:
                status["stages"][status["stage"]] = FAILED
            log.error(f"job failed: {status['reason']}\n{traceback.format_exc()}")
    status["ended"] = time.time()
    atomic_write_json(files.status, status)
    if status["state"] != FAILED:
        atomic_write_json(files.result, status)
    return status


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}"


class _Stages:
    """A job's stages as they pass: written to status.json at each change (the live progress reads it)."""

    def __init__(self, status: dict, files: JobFiles):
        self.status, self.files = status, files

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """The block's `outcome` key says computed / reused / skipped (computed if it does not)."""
        from bench.atomic import atomic_write_json

        self.status["stage"] = name
        self.status["stages"][name] = RUNNING
        atomic_write_json(self.files.status, self.status)
        outcome = {"outcome": COMPUTED}
        yield outcome
        self.status["stages"][name] = outcome["outcome"]
        self.status["stage"] = None
        atomic_write_json(self.files.status, self.status)
        _exit_if_asked(name)

    def skip_rest(self) -> None:
        for s, v in self.status["stages"].items():
            if v == LEFT:
                self.status["stages"][s] = SKIPPED

    def note(self, **values) -> None:
        self.status.update(values)


def _exit_if_asked(stage: str) -> None:
    spec = os.environ.get(EXIT_AFTER_ENV)
    if not spec:
        return
    wanted, _, marker = spec.partition(":")
    if wanted != stage:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


def _cache_entries(cache: Path) -> set[str]:
    """The stage folders and files of the cache, by name (models/ and sets/ one level down)."""
    out: set[str] = set()
    for sub in ("", "models", "sets"):
        folder = cache / sub
        if folder.is_dir():
            out |= {str(Path(sub) / p.name) for p in folder.iterdir() if not p.name.startswith(".")}
    return out


def _entries_of(paths: list[Path], cache: Path) -> set[str]:
    """The cache entries (as _cache_entries names them) that hold these paths."""
    out = set()
    cache = cache.resolve()
    for p in paths:
        try:
            parts = Path(p).resolve().relative_to(cache).parts
        except ValueError:
            continue  # the user's own file, outside the cache
        if parts:
            out.add(str(Path(*parts[:2])) if parts[0] in ("models", "sets") and len(parts) > 1 else parts[0])
    return out


def _setting_of(job: Job):
    from bench.settings import validate

    return validate(dict(job.setting), f"(job {short(job.key)})")


def run_setting(job: Job, home: Path, stages: _Stages) -> None:
    from bench.settings.resolve import resolve

    cache = home / "cache"
    with stages.stage("setting") as out:
        before = _cache_entries(cache)
        resolved = resolve(_setting_of(job), cache, log=log.info)
        used = [resolved.aligned.path, *resolved.files.values(), *resolved.harmful.values()]
        used += list(resolved.over_refusal.values()) + ([resolved.base.path] if resolved.base else [])
        if resolved._user_finetuned is not None:
            used.append(resolved._user_finetuned.finetuned.path)
        entries = _entries_of([p for p in used if p], cache)
        out["outcome"] = COMPUTED if entries - before else REUSED
        stages.note(outputs=sorted(str(cache / e) for e in entries))


def run_attack(job: Job, home: Path, stages: _Stages) -> None:
    from bench.settings.resolve import resolve

    cache = home / "cache"
    resolved = resolve(_setting_of(job), cache, log=log.info)
    with stages.stage("attack") as out:
        before = _cache_entries(cache)
        variant = next(resolved.variants(cache, log.info))
        root = variant.finetuned.path.parent
        out["outcome"] = REUSED if root.name in before else COMPUTED
        stages.note(outputs=[str(root)])


def run_row(job: Job, home: Path, stages: _Stages) -> None:
    from bench import runner
    from bench.settings.resolve import resolve
    from defenses import DEFENSES

    setting = _setting_of(job)
    cfg = runner.RunConfig(home=home, setting=setting)
    clock = runner.Clock()
    resolved = resolve(setting, cfg.cache, log=log.info)
    variant = next(resolved.variants(cfg.cache, log.info))
    ctx = runner.build_context(resolved, variant, cfg, clock)
    with stages.stage("defense") as out:
        cls = DEFENSES.get(job.defense)
        cached = (
            cls.role == "reference"
            or (runner.defense_dir(job.defense, cls(**job.params), ctx, cfg) / "info.json").exists()
        )
        model_dir, info, reason = runner.run_defense(job.defense, dict(job.params), ctx, cfg)
        out["outcome"] = SKIPPED if reason else (REUSED if cached else COMPUTED)
    if reason:
        stages.note(reason=f"skipped: {reason}")
        stages.skip_rest()
        return
    records = cfg.run_dir / "records"
    with stages.stage("evaluation") as out:
        before = set(os.listdir(records)) if records.is_dir() else set()
        record = runner.record_for(job.defense, dict(job.params), info, model_dir, resolved, variant, cfg, clock)
        name = f"{record['record_id']}.json"
        out["outcome"] = REUSED if name in before else COMPUTED
        generation = record.get("cost", {}).get("generation", {})
        stages.note(
            record=str(records / name),
            record_id=record["record_id"],
            outputs=[str(records / name)],
            answers_generated=generation.get("generated", 0) if name not in before else 0,
        )


RUNNERS = {"setting": run_setting, "attack": run_attack, "row": run_row}


def is_cached(home: Path | str, job: Job) -> bool:
    """Whether a job finished before and everything it made is still there (the dry run's answer)."""
    files = job_files(home, job.key)
    if not files.result.exists():
        return False
    try:
        result = json.loads(files.result.read_text())
    except ValueError:
        return False
    return result.get("key") == job.key and all(Path(p).exists() for p in result.get("outputs", []))


def _attempt(files: JobFiles, run_id: str) -> int:
    """This run's attempt number of the job (a retried job counts up): one appended line per start."""
    with open(files.attempts, "a") as f:
        f.write(f"{run_id} {socket.gethostname()} {os.getpid()}\n")
    return sum(line.split(" ", 1)[0] == run_id for line in files.attempts.read_text().splitlines())


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [x for x in visible.split(",") if x]


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Everything the job prints, and its fresh interpreters (they inherit the descriptors), goes to
    its log file; restored after, so a job run in the sweep's own process leaves the terminal as it was."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    old = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        try:
            yield
        finally:
            f.flush()
            sys.stdout, sys.stderr = old
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """The job's torch threads (and its fresh interpreters', through OMP_NUM_THREADS): what it asked
    the executor for. The thread count decides the bits (bench.reproducibility), so a job gives the
    same records under every executor."""
    if not n:
        yield
        return
    import torch

    from bench.reproducibility import compute_fingerprint

    saved_threads, saved_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    compute_fingerprint.cache_clear()
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
        compute_fingerprint.cache_clear()


@contextlib.contextmanager
def _info_lines() -> Iterator[None]:
    """A job's log holds its INFO lines whatever the sweep's own verbosity (and in a bare worker)."""
    import logging

    from bench import progress

    saved = log.level
    progress.configure(logging.INFO)
    try:
        yield
    finally:
        log.setLevel(saved)
