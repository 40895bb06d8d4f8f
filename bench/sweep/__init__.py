"""Sweeps: a declarative grid (bench.sweep.spec) expanded into content-keyed jobs (bench.sweep.jobs)
that an executor runs (bench.sweep.executors: local, Ray, Slurm), with live progress per stage
(bench.sweep.progress).

    realign sweep examples/sweeps/smoke-grid.yaml --dry-run        # the jobs, and which are cached
    realign sweep examples/sweeps/smoke-grid.yaml --executor ray --ray-address auto

The jobs run the pipeline's own stages (attack, defense, generation and judging), each cached by
content: a new judge re-labels cached answers, a new defense reuses the attacked models, and a
second run of a sweep computes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.errors import UserError
from bench.progress import log
from bench.sweep.jobs import FAILED, KINDS, SKIPPED, Job, expand, is_cached
from bench.sweep.spec import SweepSpec, load_spec


@dataclass
class SweepRun:
    spec: SweepSpec
    jobs: list[Job]
    results: dict[str, dict]
    summary: str

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results.values() if r.get("state") == FAILED]


def prepare(spec_path: str | Path, home: str | Path) -> tuple[SweepSpec, list[Job]]:
    """The spec, checked, and its jobs (everything validated, nothing built or written)."""
    from bench.atomic import check_can_create

    spec = load_spec(spec_path)
    home = Path(home)
    for folder in (home / "cache", home / "runs", home / "sweeps"):
        check_can_create(folder, "pass --home a folder you can write")
    return spec, expand(spec, Path(spec_path).parent, home / "cache")


def dry_run(spec_path: str | Path, home: str | Path) -> str:
    """The expanded jobs as a table, each marked cached or not; nothing runs."""
    from tabulate import tabulate

    spec, jobs = prepare(spec_path, home)
    rows = [job.row() | {"cached": "yes" if is_cached(home, job) else "no"} for job in jobs]
    cached = sum(r["cached"] == "yes" for r in rows)
    return (
        f"sweep {spec.name}: {len(jobs)} jobs ({', '.join(f'{sum(j.kind == k for j in jobs)} {k}' for k in KINDS)}), "
        f"{cached} cached\n" + tabulate(rows, headers="keys")
    )


def run_sweep(
    spec_path: str | Path,
    home: str | Path,
    executor: str = "local",
    ray_address: str | None = None,
    slurm_cluster: str | None = None,
) -> SweepRun:
    """Run every job of the spec (settings, then attacks, then rows) through the executor; a job
    whose prerequisite failed is skipped. Returns the results and the summary table."""
    from bench.sweep.executors import make_executor
    from bench.sweep.progress import Progress, write_summary

    spec, jobs = prepare(spec_path, home)
    home = str(Path(home).absolute())
    sweep_dir = Path(home) / "sweeps" / spec.name
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
    runner = make_executor(executor, spec, sweep_dir, ray_address, slurm_cluster)
    progress = Progress(jobs, home, run_id)
    log.info(f"sweep {spec.name}: {len(jobs)} jobs on the {runner.name} executor; logs under {home}/sweeps/jobs")
    try:
        with progress:
            for kind in KINDS:
                wave = []
                for job in (j for j in jobs if j.kind == kind):
                    parent = progress.final.get(job.needs) if job.needs else None
                    if parent is not None and parent.get("state") != "done":
                        progress.final[job.key] = _not_run(job, parent)
                    else:
                        wave.append(job)
                for result in runner.map(wave, home, run_id):
                    progress.final[result["key"]] = result
    finally:
        runner.close()
    summary = progress.summary()
    write_summary(sweep_dir / "summary.json", progress)
    return SweepRun(spec, jobs, dict(progress.final), summary)


def _not_run(job: Job, parent: dict) -> dict:
    return {
        "key": job.key,
        "kind": job.kind,
        "label": job.label,
        "state": SKIPPED,
        "stages": {s: SKIPPED for s in job.stages},
        "reason": f"not run: its {parent['kind']} job ({parent['label']}) did not finish",
    }


__all__ = ["SweepRun", "dry_run", "prepare", "run_sweep", "UserError"]
