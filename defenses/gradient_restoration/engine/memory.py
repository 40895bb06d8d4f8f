"""Where the run's long-lived state lives, and giving freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import tempfile
from pathlib import Path

import torch

from defenses.gradient_restoration.engine.weights_file import read_exactly


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None on other C libraries."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS. Freed tensors of a few MB stay in glibc's heap
    once its mmap threshold has adapted upward, and allocation patterns like a checkpoint's (two
    weight reads and a mask per tensor) then grow the process by ~3 MB a tensor: 400 MB over
    one checkpoint of the embedded model; trimming after each tensor keeps it flat. No-op where
    the C library is not glibc (or on a GPU, where these tensors are not on the C heap)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class FlatBuffer:
    """Tensors of the given shapes as views of ONE allocation of `dtype`.

    Why: the run's long-lived state (theta, the gradient sums, the signs) made tensor by tensor
    lands in the C heap between the activations and loaded weights that come and go, and a heap
    cannot hand back what lies under a live chunk: measured on the embedded model, ~300 MB of the
    gradient pass's peak was such freed-but-held heap. One allocation per kind is mapped by the
    C library on its own, outside the heap, and freed pages of the heap are reused."""

    def __init__(self, shapes: dict, dtype, device):
        self.flat = torch.empty(sum(math.prod(s) for s in shapes.values()), dtype=dtype, device=device)
        self.views, start = {}, 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            self.views[name] = self.flat[start : start + n].view(shape)
            start += n

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]


class GradientSums:
    """The fp32 gradient sums of the changed candidates, in one FlatBuffer.

    `spill()` writes them to an unnamed temporary file and frees their memory while the utility
    probe generates; the next gradient pass reads them back first (`restore()`). Why: they are 4
    bytes a candidate parameter (284 MB on the embedded model) and the probe's whole model comes
    on top of them, which made the probe the run's peak. Sums that are all cleared (rollback
    mode clears them after every step) are freed without a write."""

    def __init__(self, cands: list, device):
        self.cands, self.device = cands, device
        self.file, self.has_sum = None, set()
        self._allocate()

    def _allocate(self) -> None:
        self.buffer = FlatBuffer({c.name: c.param.shape for c in self.cands}, torch.float32, self.device)
        for c in self.cands:
            c.grad_buffer = self.buffer[c.name]

    def spill(self, directory) -> None:
        if self.buffer is None:
            return
        self.has_sum = {c.name for c in self.cands if c.grad is not None}
        if self.has_sum:
            self.file = tempfile.TemporaryFile(dir=directory if Path(directory).is_dir() else None)
            self.file.write(memoryview(self.buffer.flat.numpy()).cast("B"))
        self.free()

    def restore(self) -> None:
        if self.buffer is not None:
            return
        self._allocate()
        if self.file is not None:
            self.file.seek(0)
            read_exactly(self.file, memoryview(self.buffer.flat.numpy()).cast("B"), "the spilled gradient sums")
            self.file.close()
            self.file = None
        for c in self.cands:
            c.attach_sum(self.buffer[c.name], c.name in self.has_sum)

    def free(self) -> None:
        for c in self.cands:
            c.detach_sum()
        self.buffer = None
