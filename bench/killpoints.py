"""Kill points: a test hook that SIGKILLs a run at a named point of its work, to prove that a run
killed anywhere resumes without redoing finished work (tests/test_resume.py).

Off by default: nothing happens unless $REALIGN_KILL_TRACE names a file. Then every checkpoint
(a training step, a generation batch, a judgement, a file or stage directory about to be renamed
into place) appends one line to that file, "KIND WHAT", so that the file is a log of the work the
run did. When a line equals $REALIGN_KILL_AT, the run's whole process group gets SIGKILL at once, the
fresh interpreters it runs defenses and evaluations in included, as under `kill -9 -PGID` of a job
or a power cut: start the run in its own session (setsid, or Popen(start_new_session=True)).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

TRACE_ENV = "REALIGN_KILL_TRACE"
KILL_AT_ENV = "REALIGN_KILL_AT"

# a building stage directory's temporary name (bench.atomic.building_dir): .NAME.HOST.PID.RANDOM.tmp
_TMP = re.compile(rf"^\.(?P<name>.+)\.{re.escape(socket.gethostname())}\.\d+\.[^.]+\.tmp$")


def checkpoint(kind: str, what: str) -> None:
    trace = os.environ.get(TRACE_ENV)
    if not trace:
        return
    line = f"{kind} {what}"
    # plain appends, not atomic writes: this is the test's own log, and a line torn by the kill is what a
    # reader of a killed run's log sees too
    with open(trace, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    if line == os.environ.get(KILL_AT_ENV):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def stage_path(path: Path | str) -> str:
    """The last parts of a path with a building stage's temporary directory named by its stage, so
    that the same write has the same name in every run."""
    parts = []
    for part in Path(path).parts[-3:]:
        m = _TMP.match(part)
        parts.append(m.group("name") if m else part)
    return "/".join(parts)
