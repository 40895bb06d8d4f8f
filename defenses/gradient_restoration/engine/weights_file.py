"""Reading a safetensors file one tensor (or a few rows) at a time (switch: `aligned_copy=stream`,
and the layers above E read back only for the utility probe)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import models
from bench.errors import UserError


class WeightFile:
    """Tensors of one safetensors file, read one at a time into fresh memory.

    The format is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte
    offsets) and the raw little-endian data; nothing in it is executable. The header is parsed
    once, and each read is one `readinto` of the tensor's bytes (or of every stride-th row).
    Why not `safetensors.safe_open`: it maps the whole file, so reading through a handle kept
    open leaves every page it touched resident in the process (gigabytes for theta_A on a 1 B
    model), and opening one per read parses the header again each time (0.3 ms a read, 280
    reads a step on the embedded model)."""

    DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

    def __init__(self, path: Path, device: str, dtype):
        self.path, self.device, self.dtype = str(path), device, dtype
        self._header: dict | None = None
        self._data_start = 0

    def _read_header(self) -> dict:
        if self._header is None:
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._header = json.loads(f.read(size))
            self._data_start = 8 + size
        return self._header

    def _entry(self, name: str) -> dict:
        try:
            return self._read_header()[name]
        except KeyError:
            raise UserError(
                f"{self.path} has no tensor {name!r}: the aligned and fine-tuned models differ in architecture"
            ) from None

    def get(self, name: str, stride: int = 1) -> torch.Tensor:
        """The whole tensor, or every stride-th row of it."""
        shape = self._entry(name)["shape"]
        return self._read(name, range(0, shape[0], stride) if stride > 1 and shape else None)

    def rows(self, name: str, index: list[int]) -> torch.Tensor:
        """Rows `index` of a tensor: an embedding's few used rows without the whole matrix."""
        return self._read(name, index)

    def shape(self, name: str) -> tuple:
        return tuple(self._entry(name)["shape"])

    def names(self) -> set[str]:
        return {n for n in self._read_header() if n != "__metadata__"}

    def _read(self, name: str, rows) -> torch.Tensor:
        entry = self._entry(name)
        if entry["dtype"] not in self.DTYPES:
            raise UserError(
                f"{self.path}: tensor {name} is stored as {entry['dtype']}; expected one of {', '.join(self.DTYPES)}"
            )
        shape, (begin, end) = list(entry["shape"]), entry["data_offsets"]
        out = torch.empty(
            shape if rows is None else [len(rows)] + shape[1:], dtype=getattr(torch, self.DTYPES[entry["dtype"]])
        )
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        row = (end - begin) // max(shape[0], 1) if shape else end - begin
        if buf.nbytes != (end - begin if rows is None else len(rows) * row):
            raise UserError(
                f"{self.path} is corrupt at tensor {name}: its offsets do not match its shape; re-save the model"
            )
        with open(self.path, "rb", buffering=0) as f:
            for i, r in enumerate([0] if rows is None else rows):
                f.seek(self._data_start + begin + r * row)
                read_exactly(f, buf if rows is None else buf[i * row : (i + 1) * row], self.path)
        return out.to(device=self.device, dtype=self.dtype)


def read_exactly(f, buf: memoryview, path: str) -> None:
    """Fill buf from f (one read returns at most ~2 GiB on Linux, and less near the file's end)."""
    done = 0
    while done < buf.nbytes:
        got = f.readinto(buf[done:])
        if not got:
            raise UserError(f"{path} is truncated: re-save the model")
        done += got


def weights_file(handle: models.ModelHandle) -> Path:
    """The model's one safetensors file."""
    files = sorted(handle.path.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(
            f"{handle.name}: expected one .safetensors file, found {len(files)} (sharded checkpoints are not "
            "supported yet)"
        )
    return files[0]
