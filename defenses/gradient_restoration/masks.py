"""Checkpoints as bit-packed masks (spec: "a checkpoint is a mask, not a model").

A checkpoint is M, the coordinates that hold theta_A's value and differ in theta_F, one bit each;
any checkpoint is rebuilt on demand as theta_F with M copied from theta_A.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from safetensors.torch import load, save

from defenses.gradient_restoration.engine.candidates import AlignedWeights, Candidate
from defenses.gradient_restoration.engine.memory import return_freed_memory
from defenses.gradient_restoration.engine.weights_file import WeightFile


def restored_masks(cands: list[Candidate], aligned: AlignedWeights, finetuned: WeightFile):
    """M, one tensor at a time: (name, the coordinates that now hold theta_A's value and differ
    in theta_F). A generator, so that only one tensor's mask is unpacked bits at a time."""
    for c in cands:
        mask = c.restored_mask(aligned.get(c.name), finetuned.get(c.name))
        yield c.name, mask
        return_freed_memory()


def pack(masks) -> bytes:
    """Bit-packed masks (one bit per coordinate) and their shapes, as a safetensors blob; `masks`
    is a dict or an iterable of (name, mask) pairs, packed as they come."""
    blob = {}
    for name, m in masks.items() if isinstance(masks, dict) else masks:
        blob[name] = torch.from_numpy(np.packbits(m.cpu().numpy().reshape(-1)))
        blob[name + ":shape"] = torch.tensor(m.shape, dtype=torch.int64)
    return save(blob)


def unpacked(blob: bytes):
    """(name, bool mask) pairs of a packed blob, one tensor at a time."""
    stored = load(blob)
    for name, bits in stored.items():
        if not name.endswith(":shape"):
            shape = tuple(stored[name + ":shape"].tolist())
            yield name, torch.from_numpy(np.unpackbits(bits.numpy())[: math.prod(shape)].astype(bool)).reshape(shape)


def unpack(blob: bytes) -> dict:
    """{name: bool mask} of a packed blob."""
    return dict(unpacked(blob))
