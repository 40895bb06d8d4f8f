"""Packed batches (switch: `packing`): each batch of prompts as ONE sequence, the prompts' common
prefix (system turn, task instruction) once, then each prompt's own tokens, under a block mask;
no padding. The same h as the released left-padded batches, up to float rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenses.gradient_restoration.rules import prompt_ids


@dataclass
class PackedLayout:
    """Where the prompts of one packed sequence lie: [common prefix | prompt 0 | prompt 1 | ...].

    Each prompt's tokens see the prefix and the earlier tokens of their own prompt. As gather
    indices: `query_index[s, i]` is the sequence position of prompt s's i-th token (rows past its
    length repeat its last token), `key_index[s]` = the prefix then `query_index[s]`, `allowed[s, 0,
    0, i, j]` whether query i of prompt s may see key j, and `keep` the rows of the flattened
    [prompt, token] grid that are real tokens, in sequence order (attention.packed_attention)."""

    prefix: int
    query_index: torch.Tensor  # [S, Lmax]
    key_index: torch.Tensor  # [S, prefix + Lmax]
    allowed: torch.Tensor  # [S, 1, 1, Lmax, prefix + Lmax]
    keep: torch.Tensor  # [sum of lengths]

    @classmethod
    def of(cls, prefix: int, lengths: list[int]) -> "PackedLayout":
        S, Lmax = len(lengths), max(lengths)
        starts = torch.tensor([prefix + sum(lengths[:s]) for s in range(S)])
        i = torch.arange(Lmax)
        length = torch.tensor(lengths)[:, None]
        query_index = starts[:, None] + torch.minimum(i[None, :], length - 1)
        key_index = torch.cat([torch.arange(prefix).expand(S, prefix), query_index], dim=1)
        own = (i[None, None, :] <= torch.minimum(i, length - 1)[:, :, None]) & (
            i[None, None, :] < length[:, :, None]
        )  # [S, q, k]
        allowed = torch.cat([torch.ones(S, Lmax, prefix, dtype=torch.bool), own], dim=2)[:, None, None]
        keep = (torch.arange(S)[:, None] * Lmax + i[None, :])[i[None, :] < length]
        return cls(prefix, query_index, key_index, allowed, keep)

    def to(self, device) -> "PackedLayout":
        return PackedLayout(
            self.prefix, *(t.to(device) for t in (self.query_index, self.key_index, self.allowed, self.keep))
        )


@dataclass
class PackedBatch:
    """One batch of prompts as ONE sequence: their common prefix once, then each prompt's own
    tokens. `allowed` lets a token see the prefix and the earlier tokens of its own prompt, with
    positions counted from the prompt's start: the same h as a padded batch, without padding and
    without computing the shared prefix once per prompt. (transformers packs sequences for
    training through flash-attention, which takes no mask and so cannot share a prefix.)"""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    allowed: torch.Tensor  # [1, 1, T, T] bool
    last: torch.Tensor  # [B] index of each prompt's last token
    prefix: int
    layout: PackedLayout  # the same structure for attention.packed_attention


def packed_batches(tokenizer, prompts: list[str], batch_size: int) -> list[PackedBatch]:
    ids = prompt_ids(tokenizer, prompts)
    out = []
    for i in range(0, len(ids), batch_size):
        group = ids[i : i + batch_size]
        P = 0  # common prefix, leaving each prompt at least its last token
        while P < min(len(g) for g in group) - 1 and all(g[P] == group[0][P] for g in group):
            P += 1
        tokens, positions, segment, last = list(group[0][:P]), list(range(P)), [-1] * P, []
        for j, g in enumerate(group):
            tokens += g[P:]
            positions += range(P, len(g))
            segment += [j] * (len(g) - P)
            last.append(len(tokens) - 1)
        seg = torch.tensor(segment)
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        allowed = causal & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
        out.append(
            PackedBatch(
                torch.tensor([tokens]),
                torch.tensor([positions]),
                allowed[None, None],
                torch.tensor(last),
                P,
                PackedLayout.of(P, [len(g) - P for g in group]),
            )
        )
    return out
