"""Signs in {-1, 0, +1} at 2 bits each (switch: `low_memory`, with engine.candidates.SignedCandidate)."""

from __future__ import annotations

import functools
import math

import torch


class PackedSigns:
    """Values in {-1, 0, +1} at 2 bits each, four to a byte (code 0 = 0, 1 = +1, 2 = -1; value j
    of a byte in bits 2j, 2j+1): the sign of theta - theta_A of every candidate coordinate in a
    quarter of int8's memory (18 MB instead of 71 on the embedded model). Read a chunk at a time
    through a 256-entry table (one lookup per byte gives its four values); written at a few
    coordinates per step (a restore, a rollback). torch has no 2-bit dtype, hence by hand."""

    CODES = (0.0, 1.0, -1.0, 0.0)

    def __init__(self, data: torch.Tensor, numel: int):
        self.data, self.numel = data, numel  # data: uint8 [ceil(numel / 4)]

    @staticmethod
    def nbytes(numel: int) -> int:
        return (numel + 3) // 4

    @classmethod
    @functools.cache
    def table(cls, device: str) -> torch.Tensor:
        """[256, 4] float32: the four values of each byte."""
        b = torch.arange(256)
        return torch.tensor(cls.CODES)[torch.stack([(b >> (2 * j)) & 3 for j in range(4)], dim=1)].to(device)

    @classmethod
    def encode(cls, signs: torch.Tensor, out: torch.Tensor | None = None) -> "PackedSigns":
        flat = signs.reshape(-1)
        n = flat.numel()
        codes = torch.zeros(cls.nbytes(n) * 4, dtype=torch.uint8, device=flat.device)
        codes[:n] = (flat > 0).to(torch.uint8) + 2 * (flat < 0).to(torch.uint8)
        codes = codes.view(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
        return cls(out.copy_(packed) if out is not None else packed, n)

    def decode(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values at flat positions [start, stop) as float32 (into out when given)."""
        table = self.table(str(self.data.device))
        b0, b1 = start // 4, (stop + 3) // 4
        idx = self.data[b0:b1].long()
        if out is not None and start % 4 == 0 and (stop - start) % 4 == 0:
            return torch.index_select(table, 0, idx, out=out.view(-1, 4)).view(-1)
        values = table[idx].view(-1)[start - 4 * b0 : stop - 4 * b0]
        return out.copy_(values) if out is not None else values

    def rows(self, shape: tuple, stride: int) -> torch.Tensor:
        """Every stride-th row of the values laid out as `shape`."""
        row = math.prod(shape[1:])
        if row % 4:
            return self.decode(0, self.numel).view(shape)[::stride]
        table = self.table(str(self.data.device))
        return table[self.data.view(shape[0], row // 4)[::stride].long()].view(-1, *shape[1:])

    def at(self, idx: torch.Tensor) -> torch.Tensor:
        """The values at flat indices idx (float32)."""
        codes = (self.data[idx >> 2].long() >> (2 * (idx & 3))) & 3
        return self.table(str(self.data.device))[codes, 0]  # row c of the table starts with code c's value

    def set(self, idx: torch.Tensor, values) -> None:
        """values (a number or one per index) at flat indices idx (distinct)."""
        if not len(idx):
            return
        values = torch.as_tensor(values, dtype=torch.float32, device=idx.device).expand(idx.shape)
        shift = 2 * (idx & 3)
        code = ((values > 0).long() + 2 * (values < 0).long()) << shift
        byte, which = torch.unique(idx >> 2, return_inverse=True)  # several indices may share a byte
        clear = torch.zeros(len(byte), dtype=torch.long, device=idx.device).index_add_(0, which, 3 << shift)
        put = torch.zeros(len(byte), dtype=torch.long, device=idx.device).index_add_(0, which, code)
        self.data[byte] = ((self.data[byte].long() & ~clear) | put).to(torch.uint8)
