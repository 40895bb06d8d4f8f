"""Progress lines: the `realign` logger, message only, on stderr.

The CLI's --verbosity sets its level: INFO (the default) says one line per stage, WARNING keeps
quiet, DEBUG adds cache directories and the functions run in new interpreters. Only this logger is
configured: libraries keep their own levels (vLLM's is set through its environment by the CLI).
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("realign")


def configure(level: int | str) -> None:
    """Send the `realign` logger's lines at `level` and above to stderr (once per process)."""
    log.setLevel(level)
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each line (not the one at configure time),
    so that a caller that redirects stderr, as pytest's capture does per test, gets the lines."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass
