"""Run a function in a fresh Python interpreter and return its result.

Why: a process that has trained with torch runs vLLM's worker on one core (ASSETS.md), and vLLM
started inside a `multiprocessing` spawn child decoded about 30x slower here than the same code
in a top-level interpreter (measured: 200 prompts x 64 tokens, 35 s top-level vs > 4 min in
the child). So the function runs in `python -m bench.new_interpreter`, a plain top-level interpreter; its
arguments and result travel as pickles in a private temporary folder (written and read only by
this module, never from outside).

`Interpreter` keeps one such interpreter for several calls, one after another, so that what a
call leaves behind (a live vLLM engine, bench.engine_pool) serves the next: the runner evaluates
every row of a board in one. Calls and replies travel through two pipes; the interpreter ends when
its caller closes it (or dies: the request pipe then reads as ended).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from bench import progress
from bench.errors import UserError, machine_error
from bench.progress import log


def run_fresh(fn: Callable, *args, **kwargs) -> Any:
    """fn(*args, **kwargs) in a new interpreter; fn must be a module-level function."""
    target = _target(fn)
    with tempfile.TemporaryDirectory(prefix="realign-call-") as tmp:
        call, result = _write_call(Path(tmp), target, args, kwargs)
        log.debug(f"running {target} in a new interpreter")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.new_interpreter", str(call), str(result)], env=os.environ.copy()
        )
        if not result.exists():
            raise RuntimeError(f"{target} died in its fresh process (exit code {proc.returncode})")
        return _outcome(target, result)


class Interpreter:
    """One fresh interpreter for several calls (one at a time), started at the first call:

        with Interpreter() as worker:
            a = worker.call(evaluate, row_a, ...)
            b = worker.call(evaluate, row_b, ...)   # same process: what row a left alive is still there

    A call that kills the interpreter raises as run_fresh does; the next call starts a new one."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        call_r, call_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.new_interpreter", "--serve", str(call_r), str(reply_w)],
            pass_fds=(call_r, reply_w),
            env=os.environ.copy(),
        )
        os.close(call_r)
        os.close(reply_w)
        self._calls, self._replies = os.fdopen(call_w, "w"), os.fdopen(reply_r, "r")

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        target = _target(fn)
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        with tempfile.TemporaryDirectory(prefix="realign-call-") as tmp:
            call, result = _write_call(Path(tmp), target, args, kwargs)
            log.debug(f"running {target} in the kept interpreter (pid {self._proc.pid})")
            try:
                self._calls.write(json.dumps([str(call), str(result)]) + "\n")
                self._calls.flush()
                replied = self._replies.readline()
            except BrokenPipeError:
                replied = ""
            if not replied or not result.exists():
                code = self._proc.wait()
                self.close()
                raise RuntimeError(f"{target} died in its fresh process (exit code {code})")
            return _outcome(target, result)

    def close(self) -> None:
        """End the interpreter (its atexit hooks shut its engines down); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (self._calls, self._replies):
            with contextlib.suppress(OSError):
                pipe.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # an engine that does not stop must not hang the run
            proc.kill()
            proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _target(fn: Callable) -> str:
    module = fn.__module__
    if module == "__main__":  # a script run with `python -m pkg.mod`: import it by its real name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"run_fresh needs an importable function; {fn.__qualname__} lives in a plain script")
        module = spec.name
    return f"{module}:{fn.__qualname__}"


def _write_call(folder: Path, target: str, args, kwargs) -> tuple[Path, Path]:
    call, result = folder / "call.pkl", folder / "result.pkl"
    # the child logs as this process does (the CLI's --verbosity)
    call.write_bytes(pickle.dumps((target, args, kwargs, log.getEffectiveLevel())))
    return call, result


def _outcome(target: str, result: Path) -> Any:
    status, payload = pickle.loads(result.read_bytes())
    if status == "user":
        raise UserError(payload)
    if status == "error":
        raise RuntimeError(f"{target} failed in its fresh process:\n{payload}")
    return payload


def own_peak_rss_mb() -> float:
    """This process's own peak resident memory in MB: /proc/self/status VmHWM (the high-water mark
    of this process's address space, new at exec). getrusage's ru_maxrss is not: Linux carries the
    parent's peak across fork and exec, so a fresh interpreter started by a runner holding 4.7 GB
    reported at least 4.7 GB whatever it did. ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _main(call: str, result: str) -> int:
    import traceback

    target, args, kwargs, level = pickle.loads(Path(call).read_bytes())
    progress.configure(level)
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        out = ("ok", fn(*args, **kwargs))
    except UserError as exc:
        out = ("user", str(exc))
    except Exception as exc:  # a full disk or a read-only folder is one line in the parent, like bad input
        error = machine_error(exc)
        out = ("user", str(error)) if error else ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    except BaseException as exc:  # report to the parent instead of dying silently
        out = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    # renamed into place: a child killed while writing leaves no result, never half a pickle (not
    # bench.atomic, whose kill points are named after stage files, not after this private folder)
    part = Path(result).with_suffix(".part")
    part.write_bytes(pickle.dumps(out))
    os.replace(part, result)
    return 0


def _serve(calls_fd: int, replies_fd: int) -> int:
    """The kept interpreter's loop: one call per line until the caller closes the pipe."""
    with os.fdopen(calls_fd, "r") as calls, os.fdopen(replies_fd, "w") as replies:
        for line in calls:
            call, result = json.loads(line)
            _main(call, result)
            replies.write("done\n")
            replies.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(_serve(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(_main(sys.argv[1], sys.argv[2]))
