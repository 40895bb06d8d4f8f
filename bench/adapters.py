"""LoRA adapters a user brings: checked against the aligned model, merged once, cached by content.

    check_adapter(adapter_dir, aligned)           # no weights loaded: config and safetensors headers
    finetuned = merge_adapter(adapter_dir, aligned, cache, log)

The merge is the attack stage's own (float32, peft's merge_and_unload, the aligned tokenizer saved
beside it), so a setting that names the attack's adapter gets the attack's merged model bit for bit.
An adapter whose merge leaves every weight as it was is refused: it would silently evaluate the
aligned model as if it were fine-tuned (lm-eval issue 511).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from bench import models
from bench.errors import UserError
from bench.hashing import hash_model_dir, hash_value, short
from bench.killpoints import checkpoint
from bench.progress import log as logger

MERGE_VERSION = 1
merges_done = 0  # merges actually computed in this process (a cached one is not counted)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8-byte length + JSON), no weights read."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def model_shapes(handle: models.ModelHandle) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for p in sorted(handle.path.glob("*.safetensors")):
        shapes |= safetensors_shapes(p)
    return shapes


def check_adapter(adapter: Path, aligned: models.ModelHandle) -> dict:
    """The adapter's config, after checking it fits aligned: a base-name mismatch warns, a shape
    mismatch (or a module aligned does not have) is an error."""
    adapter = Path(adapter).expanduser()
    config_file = adapter / "adapter_config.json"
    if not config_file.exists():
        raise UserError(
            f"adapter {adapter}: no adapter_config.json; point models.finetuned.peft at a folder saved by peft's "
            "save_pretrained"
        )
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        if (adapter / "adapter_model.bin").exists():
            raise UserError(
                f"adapter {adapter}: pickle weights (adapter_model.bin) are not loaded; convert them with "
                '`python -c "import torch, safetensors.torch as s; '
                f"s.save_file(torch.load('{adapter}/adapter_model.bin'), "
                f"'{adapter}/adapter_model.safetensors')\"` where you trust the file"
            )
        raise UserError(
            f"adapter {adapter}: no adapter_model.safetensors; save the adapter with peft's save_pretrained"
        )
    config = json.loads(config_file.read_text())
    named = config.get("base_model_name_or_path")
    if named and Path(named).name != Path(aligned.name).name and Path(named).resolve() != aligned.path:
        logger.warning(
            f"adapter {adapter} names base {named!r}, the setting's aligned model is {aligned.name!r}; the shapes "
            "match, going on"
        )
    base = model_shapes(aligned)
    for key, shape in safetensors_shapes(weights).items():
        part = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
        if part is None:
            continue
        target = key.split(f".{part}.")[0].removeprefix("base_model.model.") + ".weight"
        if target not in base:
            raise UserError(
                f"adapter {adapter} adapts {target}, which the aligned model {aligned.name!r} does not have: "
                "the adapter was trained on another base model"
            )
        out_features, in_features = base[target][0], base[target][1]
        if (part == "lora_A" and shape[1] != in_features) or (part == "lora_B" and shape[0] != out_features):
            raise UserError(
                f"adapter {adapter}: {key} has shape {shape}, which does not fit {target} {base[target]} of the "
                "aligned "
                f"model {aligned.name!r}: the adapter was trained on another base model"
            )
    return config


def merged_dir(adapter: Path, aligned: models.ModelHandle, cache: Path) -> Path:
    key = hash_value({"merge": MERGE_VERSION, "aligned": aligned.content_hash(), "adapter": hash_model_dir(adapter)})
    return cache / "models" / f"merged-{short(key)}"


def merge_adapter(adapter: Path, aligned: models.ModelHandle, cache: Path, log=logger.info) -> models.ModelHandle:
    """aligned + adapter, merged in float32 and saved as safetensors; built once per content."""
    from bench.atomic import atomic_write_json, building_dir, verified_manifest

    global merges_done
    adapter = Path(adapter).expanduser().resolve()
    check_adapter(adapter, aligned)
    root = merged_dir(adapter, aligned, cache)
    if verified_manifest(root, _content, log) is not None:
        log(f"adapter: reusing the merge {root.name}")
        return models.ModelHandle(f"{aligned.name}+{adapter.name}", root / "model")
    import torch
    from peft import PeftModel

    log(f"adapter: merging {adapter} onto {aligned.name}")
    checkpoint("start", root.name)
    with building_dir(root) as tmp:
        tokenizer = models.load_tokenizer(aligned)
        model = models.load_model(aligned, "float32")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        if all(torch.equal(before[k], v) for k, v in merged.state_dict().items() if k in before):
            raise UserError(
                f"adapter {adapter} changes no weight of {aligned.name!r} (its lora_B matrices are zero?): "
                "it would evaluate the aligned model as if it were fine-tuned; point at the trained adapter"
            )
        models.save_model(merged, tokenizer, tmp / "model")
        atomic_write_json(
            tmp / "manifest.json",
            {
                "aligned": aligned.content_hash(),
                "adapter": hash_model_dir(adapter),
                "content_hash": hash_value(_content(tmp)),
            },
        )
    merges_done += 1
    return models.ModelHandle(f"{aligned.name}+{adapter.name}", root / "model")


def _content(root: Path) -> dict:
    return {"model": hash_model_dir(root / "model")}
