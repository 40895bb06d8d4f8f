"""Pausing CPython's cyclic garbage collector around work that makes many objects and few cycles.

A 10,000-record board allocates some millions of dicts, lists and strings that stay alive until it
is written. Every few hundred allocations the collector walks the young ones, and now and then all
of them, and frees nothing: they are reachable, and what is not is freed by reference counting
anyway. Paused, the board builds and renders ~10% faster (BENCHMARKS). The few reference cycles made
meanwhile (matplotlib's figures) are collected once the collector runs again.

vLLM's generation (bench.generation) is paused too: each engine step makes short-lived objects (its
requests' and outputs' bookkeeping) beside the many long-lived ones of vLLM, torch and transformers,
and the collector's passes over them cost ~4% of a batch's time on the embedded model here.
"""

from __future__ import annotations

import functools
import gc
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def without_cyclic_gc(fn: F) -> F:
    """Run `fn` with the cyclic collector paused, restoring it after (also when `fn` raises)."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused  # type: ignore[return-value]
