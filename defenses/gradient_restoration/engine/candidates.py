"""The working copy's candidate tensors (spec: Candidates), and theta_A's.

The recipe's steps ask a candidate only for sign(theta - theta_A), its gradient sum, and to copy
values in (restore) or back (rollback): `Candidate` holds theta exactly in fp32, `SignedCandidate`
(switch: `low_memory`) holds it as bf16 plus that sign at 2 bits, and answers the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenses.gradient_restoration.engine import summed_linear
from defenses.gradient_restoration.engine.packed_signs import PackedSigns
from defenses.gradient_restoration.engine.weights_file import WeightFile


@dataclass
class Candidate:
    """One candidate tensor of the working copy (a weight of a layer < E, not a norm), with theta
    held exactly in fp32: the parameter itself. The selection asks a candidate only for
    sign(theta - theta_A) and to copy values in or back, so another representation of theta
    (SignedCandidate) can answer the same questions."""

    name: str
    param: torch.nn.Parameter
    grad_buffer: torch.Tensor | None = None  # where the gradient sum lives (a view of a FlatBuffer), if given
    module: torch.nn.Linear | None = None  # a summed linear adds the gradient in its backward (low_memory), if set
    needs_aligned = True  # scoring computes the sign of theta - theta_A from theta_A's values

    @property
    def grad(self) -> torch.Tensor | None:
        return self.param.grad

    def zero_grad(self) -> None:
        self.param.grad = None

    def accumulate(self, param) -> None:
        """post-accumulate-grad hook: the first gradient of a pass (autograd's own new tensor) is
        copied into grad_buffer once, which autograd then adds the next ones to in place (the
        same additions as without the buffer)."""
        if param.grad is not self.grad_buffer:
            self.grad_buffer.copy_(param.grad)
            param.grad = self.grad_buffer

    def detach_sum(self) -> None:
        """Forget the gradient sum and its memory (GradientSums.spill keeps its values)."""
        self.zero_grad()
        self.grad_buffer = None

    def attach_sum(self, buffer, has_sum: bool) -> None:
        """The gradient sum lives in `buffer` again; it holds one if has_sum."""
        self.grad_buffer = buffer
        self.param.grad = buffer if has_sum else None

    def load(self, F, A, storage: torch.Tensor | None = None) -> None:
        """theta := F. Into `storage` (a view of a FlatBuffer) when given; else F, a fresh fp32
        tensor, is taken over (a copy into the old storage would keep the loaded model's file
        mapping, and every page the probe read from it, in the process)."""
        self.param.data = storage.copy_(F) if storage is not None else F

    def storage(self) -> torch.Tensor:
        """Where theta lives now (for a load into the same memory)."""
        return self.param.data

    def release(self) -> None:
        """Drop theta and its gradient (before the output is built from the masks)."""
        self.detach_sum()
        self.param.data = torch.empty(0, dtype=self.param.dtype, device=self.param.device)

    def diff_sign(self, A_flat, start: int, stop: int, out) -> torch.Tensor:
        """sign(theta - theta_A) over theta.flat[start:stop] into out (A_flat: theta_A, flat)."""
        return torch.sub(self.param.data.view(-1)[start:stop], A_flat[start:stop], out=out).sign_()

    def diff_sign_rows(self, aligned: "AlignedWeights", stride: int) -> torch.Tensor:
        """sign(theta - theta_A) on every stride-th row."""
        return torch.sign(self.param.data[::stride] - aligned.get(self.name, stride))

    def state_at(self, idx):
        """What theta holds at flat indices idx, to put back by a rollback: the values."""
        return self.param.data.view(-1)[idx]

    def sign_from(self, idx, previous) -> torch.Tensor:
        """sign(theta - previous) at flat indices idx."""
        return torch.sign(self.param.data.view(-1)[idx] - previous)

    def take_aligned(self, idx, A_values) -> None:
        """theta.flat[idx] := theta_A's values there (a copy)."""
        self.param.data.view(-1)[idx] = A_values

    def put_back(self, idx, previous, keep) -> None:
        """theta.flat[idx[keep]] := what state_at(idx) returned there."""
        self.param.data.view(-1)[idx[keep]] = previous[keep]

    def restored_mask(self, A, F) -> torch.Tensor:
        """The coordinates that hold theta_A's value and differ in theta_F."""
        return (self.param.data == A) & (F != A)


@dataclass
class SignedCandidate(Candidate):
    """A candidate for bf16 compute that never holds theta itself (`low_memory`).

    theta is, coordinate by coordinate, always theta_F or theta_A (a restore copies A, a rollback
    copies back what was there), so the selection needs only s = sign(theta - theta_A), held as
    PackedSigns (2 bits), 0 exactly where theta == theta_A. The parameter holds theta rounded to
    bf16 (round to nearest even, as autocast rounds), which is what the matmuls read, so autocast
    keeps no bf16 copy of its own for the backward pass: 2 + 1/4 bytes a parameter instead of
    4 + 2. The output is rebuilt from the masks and the two files, so it is exact. Each
    backward's weight gradient is added to an fp32 sum: through the parameter's summed linear
    (add_product: MKL's bf16 gemm accumulating in fp32, so not rounded to bf16 first), or as the
    bf16 gradient a hook sees, as autocast's cast back to an fp32 parameter adds it."""

    signs: "PackedSigns | None" = None
    grad32: torch.Tensor | None = None
    needs_aligned = False

    @property
    def grad(self) -> torch.Tensor | None:
        return self.grad32

    @property
    def sign(self) -> torch.Tensor:
        """s as an int8 tensor of theta's shape (decoded whole: for checks, not the steps)."""
        return self.signs.decode(0, self.signs.numel).view(self.param.shape).to(torch.int8)

    def zero_grad(self) -> None:
        self.param.grad = None
        self.grad32 = None

    def accumulate(self, param) -> None:
        """post-accumulate-grad hook of the bf16 parameter: fp32 sum, bf16 gradient dropped."""
        self.add_gradient(param.grad)
        param.grad = None

    def add_gradient(self, g) -> None:
        """Add one backward's bf16 gradient to the fp32 sum (in grad_buffer when given)."""
        if self.grad32 is None:
            self.grad32 = g.float() if self.grad_buffer is None else self.grad_buffer.copy_(g)
        else:
            self.grad32.add_(g)

    def add_product(self, dy, x) -> None:
        """Add the weight gradient dy^T x of one backward to the fp32 sum: called by the parameter's
        summed linear (`module`, engine.summed_linear). Where MKL's bf16 gemm is there, its
        products go into the sum in fp32, with no bf16 rounding of each batch's gradient (closer
        to fp32 than autocast's sum, and ~2x faster); else as add_gradient(bf16 dy^T x)."""
        if self.grad_buffer is not None and summed_linear.add_product(
            self.grad_buffer, dy, x, accumulate=self.grad32 is not None
        ):
            self.grad32 = self.grad_buffer
        else:
            self.add_gradient(dy.t().mm(x))

    def attach_sum(self, buffer, has_sum: bool) -> None:
        self.grad_buffer = buffer
        self.grad32 = buffer if has_sum else None

    def load(self, F, A, storage: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> None:
        """theta := F as bf16, s := sign(F - A); into storage = (bf16 view, uint8 view) when given."""
        self.param.data = F.to(torch.bfloat16) if storage is None else storage[0].copy_(F)
        self.signs = PackedSigns.encode(torch.sign(F - A), None if storage is None else storage[1])

    def storage(self) -> "tuple[torch.Tensor, torch.Tensor]":
        return self.param.data, self.signs.data

    def release(self) -> None:
        super().release()
        self.signs = None

    def diff_sign(self, A_flat, start: int, stop: int, out) -> torch.Tensor:
        return self.signs.decode(start, stop, out)

    def diff_sign_rows(self, aligned: "AlignedWeights", stride: int) -> torch.Tensor:
        return self.signs.rows(tuple(self.param.shape), stride)

    def state_at(self, idx):
        return self.param.data.view(-1)[idx], self.signs.at(idx)

    def sign_from(self, idx, previous) -> torch.Tensor:
        """At coordinates that now hold theta_A (the only ones a rollback asks about):
        sign(A - previous) = -sign(previous - A)."""
        return -previous[1]

    def take_aligned(self, idx, A_values) -> None:
        self.param.data.view(-1)[idx] = A_values.to(torch.bfloat16)
        self.signs.set(idx, 0.0)

    def put_back(self, idx, previous, keep) -> None:
        self.param.data.view(-1)[idx[keep]] = previous[0][keep]
        self.signs.set(idx[keep], previous[1][keep])

    def restored_mask(self, A, F) -> torch.Tensor:
        return (self.sign == 0) & (F != A)


class AlignedWeights:
    """theta_A's candidate tensors: held in memory, or read from theta_A's file at each use."""

    def __init__(self, source: WeightFile | None = None, held: dict | None = None):
        self.source, self.held = source, held

    def get(self, name: str, stride: int = 1) -> torch.Tensor:
        if self.held is not None:
            t = self.held[name]
            return t[::stride] if stride > 1 else t
        return self.source.get(name, stride)
