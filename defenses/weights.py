"""Weights as tensors: a model's safetensors state, and a peft LoRA adapter's factors.

Defenses that do arithmetic on weights (interpolation, RESTA, SafeLoRA, Antidote) read them here,
never through pickles: safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import models
from bench.errors import UserError

if TYPE_CHECKING:
    import torch


def state(handle: models.ModelHandle) -> dict:
    """name -> tensor of every weight file of a model directory (fp32)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(handle.path.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


class lazy_state:
    """name -> fp32 tensor of a model directory's weight files, each read when asked (safetensors'
    safe_open): arithmetic over a model's tensors one at a time holds one tensor, not the model."""

    def __init__(self, handle: models.ModelHandle):
        from safetensors import safe_open

        self._where = {}
        for f in sorted(handle.path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as opened:
                self._where.update(dict.fromkeys(opened.keys(), f))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as opened:
            return opened.get_tensor(name).float()


def load_into(handle: models.ModelHandle, tensors: dict, device: str = "cpu"):
    """A model of `handle`'s architecture holding `tensors`. A tied LM head is no parameter of its own
    (named_parameters lists the shared tensor once, by its embedding's name), so every listed name
    must be given: an untied head missing from `tensors` is an error, not the old head kept."""
    model = models.load_model(handle, "float32", device)
    missing = [n for n, _ in model.named_parameters() if n not in tensors]
    if missing:
        raise UserError(f"weights for {missing[0]} are missing ({len(missing)} in all)")
    model.load_state_dict(tensors, strict=False)
    return model


@dataclass
class LoraModule:
    """One adapted linear layer: W_F = W_A + scaling * B @ A."""

    weight: str  # the model's weight name, e.g. model.layers.0.self_attn.q_proj.weight
    A: "torch.Tensor"  # [r, in]
    B: "torch.Tensor"  # [out, r]
    scaling: float


def lora_modules(adapter_dir: Path | None) -> list[LoraModule]:
    """The factors of a peft LoRA adapter directory, keyed by the model weight they change."""
    from safetensors.torch import load_file

    if adapter_dir is None or not (Path(adapter_dir) / "adapter_config.json").exists():
        raise UserError(
            "this defense needs the fine-tune's LoRA adapter (a full fine-tune has none); see `realign list` for "
            "what each method accepts"
        )
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    out = []
    for key in sorted(tensors):
        if ".lora_A." not in key:
            continue
        stem = key.split(".lora_A.")[0]
        name = stem.removeprefix("base_model.model.") + ".weight"
        out.append(
            LoraModule(name, tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float(), scaling)
        )
    if not out:
        raise UserError(f"{adapter_dir}: no LoRA factors found in adapter_model.safetensors")
    return out
