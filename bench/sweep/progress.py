"""A sweep's progress: per stage, done / running / failed / left, as live bars while it runs and as
a table at the end, with each failure's one-line reason and log path.

The jobs report through their status files (bench.sweep.jobs), so the same bars follow jobs run
here, in Ray workers or in Slurm jobs, as long as the home folder is shared.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tabulate import tabulate

from bench.sweep.jobs import COMPUTED, FAILED, LEFT, REUSED, RUNNING, SKIPPED, STAGES, Job, job_files


class Progress:
    """Live tqdm bars, one per stage, refreshed from the jobs' status files twice a second."""

    def __init__(self, jobs: list[Job], home: str, run_id: str, interval: float = 0.5):
        self.jobs, self.home, self.run_id, self.interval = jobs, home, run_id, interval
        self.final: dict[str, dict] = {}  # results the executor returned (and jobs skipped by the sweep)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: dict = {}

    def stage_states(self) -> dict[str, dict[str, str]]:
        """job key -> stage -> state, in this run (a job this run has not started yet: left)."""
        out = {}
        for job in self.jobs:
            status = self.final.get(job.key) or self._status(job) or {}
            # a job whose process died reported no stages: each unfinished one counts as failed
            missing = FAILED if status.get("state") == FAILED else LEFT
            out[job.key] = {s: (status.get("stages") or {}).get(s, missing) for s in job.stages}
        return out

    def _status(self, job: Job) -> dict | None:
        path = job_files(self.home, job.key).status
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return status if status.get("run_id") == self.run_id else None

    def counts(self) -> dict[str, dict[str, int]]:
        table = {s: {COMPUTED: 0, REUSED: 0, SKIPPED: 0, FAILED: 0, RUNNING: 0, LEFT: 0} for s in STAGES}
        for states in self.stage_states().values():
            for stage, state in states.items():
                table[stage][state if state in table[stage] else LEFT] += 1
        return {s: c for s, c in table.items() if sum(c.values())}

    # ------------------------------------------------------------------ live bars

    def __enter__(self):
        from tqdm.auto import tqdm

        # the bars write to the terminal as it was when the sweep started: a job run in this process
        # sends its own output (fds 1 and 2) to its log file meanwhile
        self._out = os.fdopen(os.dup(2), "w", buffering=1)
        for i, (stage, c) in enumerate(self.counts().items()):
            self._bars[stage] = tqdm(
                total=sum(c.values()),
                desc=f"{stage:<10}",
                position=i,
                file=self._out,
                unit="job",
                leave=True,
                disable=None,  # live bars on a terminal; the summary table at the end everywhere
            )
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        for stage, c in self.counts().items():
            bar = self._bars.get(stage)
            if bar is None:
                continue
            bar.n = c[COMPUTED] + c[REUSED] + c[SKIPPED]
            bar.set_postfix_str(
                f"done {bar.n} (computed {c[COMPUTED]}, reused {c[REUSED]}, skipped {c[SKIPPED]}) "
                f"running {c[RUNNING]} failed {c[FAILED]} left {c[LEFT]}",
                refresh=False,
            )
            bar.refresh()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.refresh()
        for bar in self._bars.values():
            bar.close()
        self._out.close()

    # ------------------------------------------------------------------ the end

    def summary(self) -> str:
        rows = [
            [stage, sum(c.values()), c[COMPUTED], c[REUSED], c[SKIPPED], c[FAILED], c[LEFT] + c[RUNNING]]
            for stage, c in self.counts().items()
        ]
        text = tabulate(rows, headers=["stage", "jobs", "computed", "reused", "skipped", "failed", "left"])
        failures = [r for r in self.final.values() if r.get("state") == FAILED]
        if failures:
            text += f"\n\n{len(failures)} failed job{'s' * (len(failures) > 1)}:\n" + "\n".join(
                f"- {r['kind']} {r['label']}: {r.get('reason', 'unknown')} (log: {r.get('log')})" for r in failures
            )
        skipped = [r for r in self.final.values() if r.get("state") == SKIPPED and r.get("reason")]
        if skipped:
            text += "\n\nskipped:\n" + "\n".join(f"- {r['kind']} {r['label']}: {r['reason']}" for r in skipped)
        return text


def write_summary(path: Path, progress: Progress) -> None:
    from bench.atomic import atomic_write_json

    atomic_write_json(path, {"counts": progress.counts(), "jobs": list(progress.final.values())})
