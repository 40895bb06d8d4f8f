"""Where a sweep's jobs run: here one after another, as Ray tasks, or as Slurm jobs through submitit.

Every executor calls the same bench.sweep.jobs.run_job and yields each job's result as it ends.
None schedules anything itself: Ray places the tasks by their resource requests and retries a task
whose worker died (`max_retries`); Slurm (or submitit's local stand-in) runs the submitted jobs,
and a job whose process died is submitted again, up to the spec's `retries`. The stage caches
make a retried job skip what had finished. On a cluster the home folder must be on a filesystem
every node sees (its cache is what the jobs share).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Iterator

from bench.errors import UserError
from bench.sweep.jobs import FAILED, Job, job_files, run_job
from bench.sweep.spec import SweepSpec

EXECUTORS = ("local", "ray", "slurm")
# the driver's environment a worker needs: the suite's own variables, the hub's and vLLM's switches
FORWARDED_ENV = ("REALIGN_", "HF_", "VLLM_", "TRANSFORMERS_", "TOKENIZERS_")


def died(job: Job, home: str, why: str) -> dict:
    """The result of a job whose process never reported back."""
    return {
        "key": job.key,
        "kind": job.kind,
        "label": job.label,
        "state": FAILED,
        "stages": {},
        "reason": why,
        "log": str(job_files(home, job.key).log),
    }


class LocalExecutor:
    """The jobs one after another in this process (each stage still starts its fresh interpreters)."""

    name = "local"

    def map(self, jobs: list[Job], home: str, run_id: str) -> Iterator[dict]:
        for job in jobs:
            yield run_job(job, home, run_id)

    def close(self) -> None:
        pass


class RayExecutor:
    """Each job a Ray task with the spec's resource requests; a task whose worker dies is run again
    by Ray (max_retries). Connects to `address` (a running cluster), else to the one this process
    already joined, else ray.init() starts or finds one as Ray does."""

    name = "ray"

    def __init__(self, spec: SweepSpec, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs ray: pip install 'realign-bench[scale]'") from None
        self.ray, self.spec = ray, spec
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as exc:
                raise UserError(f"cannot reach the Ray cluster at {address!r} ({exc}); check --ray-address") from None
            self.started = True

    def map(self, jobs: list[Job], home: str, run_id: str) -> Iterator[dict]:
        ray, r = self.ray, self.spec.resources
        options = {
            "num_gpus": r.num_gpus,
            "max_retries": self.spec.retries,
            "retry_exceptions": False,  # a job's own failure is its result; only a dead worker is retried
            "runtime_env": {"env_vars": forwarded_env()},
        }
        if r.num_cpus:
            options["num_cpus"] = r.num_cpus
        if r.memory_gb:
            options["memory"] = int(r.memory_gb * 2**30)
        task = ray.remote(run_ray_task).options(**options)
        refs = {task.remote(job, home, run_id): job for job in jobs}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as exc:
                    why = f"its Ray worker died {self.spec.retries + 1} times ({type(exc).__name__})"
                    yield died(refs[ref], home, why)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class SlurmExecutor:
    """Each job a Slurm job through submitit's AutoExecutor (`cluster="local"`: local processes, the
    same path without Slurm). A job whose process died without a result is submitted again, up to
    the spec's `retries`."""

    name = "slurm"

    def __init__(self, spec: SweepSpec, folder: Path, cluster: str | None = None):
        try:
            import submitit
        except ImportError:
            raise UserError("the slurm executor needs submitit: pip install 'realign-bench[scale]'") from None
        self.spec = spec
        if cluster is None and submitit.AutoExecutor.which() != "slurm":
            # submitit falls back to local processes where it finds no Slurm: a grid meant for a
            # cluster would quietly run here, one job after another (checked before submitit makes its folder)
            raise UserError(
                "--executor slurm: no Slurm on this machine (submitit finds no srun); run the sweep on a Slurm "
                "login node, or pass --slurm-cluster local to run the same path as local processes"
            )
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.unfinished: list = []  # submitit jobs submitted and not yet collected
        r = spec.resources
        params: dict = {"timeout_min": r.timeout_min, "name": f"realign-{spec.name}"}
        if r.num_gpus:
            params["gpus_per_node"] = math.ceil(r.num_gpus)
        if r.num_cpus:
            params["cpus_per_task"] = r.num_cpus
        if r.memory_gb:
            params["mem_gb"] = r.memory_gb
        if self.executor.cluster == "slurm":
            if spec.slurm.partition:
                params["slurm_partition"] = spec.slurm.partition
            if spec.slurm.additional:
                params["slurm_additional_parameters"] = dict(spec.slurm.additional)
        self.executor.update_parameters(**params)

    def map(self, jobs: list[Job], home: str, run_id: str) -> Iterator[dict]:
        import submitit

        attempts = {job.key: 1 for job in jobs}
        with self.executor.batch():
            submitted = [(self.executor.submit(run_job, job, home, run_id), job) for job in jobs]
        pending = [(s, j) for s, j in submitted]
        self.unfinished = [s for s, _ in pending]
        while pending:
            still = []
            for sub, job in pending:
                if not sub.done():
                    still.append((sub, job))
                    continue
                try:
                    yield sub.result()
                except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
                    if attempts[job.key] <= self.spec.retries:
                        attempts[job.key] += 1
                        still.append((self.executor.submit(run_job, job, home, run_id), job))
                    else:
                        why = f"its process died {attempts[job.key]} times ({type(exc).__name__})"
                        yield died(job, home, why)
            pending = still
            self.unfinished = [s for s, _ in pending]
            if pending:
                time.sleep(0.5)

    def close(self) -> None:
        """A sweep stopped early (Ctrl-C, an error): on the local cluster its unfinished jobs are
        this machine's detached processes, which would go on running unseen, so they are cancelled.
        Slurm's jobs stay queued: a rerun of the sweep takes their results."""
        if self.executor.cluster == "local":
            for job in self.unfinished:
                job.cancel(check=False)
        self.unfinished = []


def run_ray_task(job: Job, home: str, run_id: str) -> dict:
    """A Ray task: the job, told which GPUs Ray gave it."""
    import ray

    return run_job(job, home, run_id, gpu_ids=ray.get_gpu_ids())


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def make_executor(
    name: str, spec: SweepSpec, sweep_dir: Path, ray_address: str | None = None, slurm_cluster: str | None = None
):
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(spec, ray_address)
    if name == "slurm":
        return SlurmExecutor(spec, sweep_dir / "submitit", slurm_cluster)
    raise UserError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
