"""Everything that knows about model families: loading, decoder layers, norms, chat templates.

Defenses and stages ask this module, never the model's attribute names directly, so that a new
family (Gemma's extra norms, GPT-NeoX's `gpt_neox.layers`) is taught in one place.

Model handles are either a local directory or a hub id. Hub access is never needed for the
embedded default; `trust_remote_code` stays off unless the user passes `--trust-remote-code`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import UserError

if TYPE_CHECKING:  # heavy imports stay lazy so that `realign --help` and `realign list` are instant
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")
# where the decoder stack lives, per family (first match wins)
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


@dataclass(frozen=True)
class ModelHandle:
    """A model the user named: the string they gave and the local directory it resolved to."""

    name: str
    path: Path

    def content_hash(self) -> str:
        from bench.hashing import hash_model_dir

        return hash_model_dir(self.path)


def resolve(handle: str | os.PathLike, revision: str | None = None) -> ModelHandle:
    """Turn a local directory or a hub id into a ModelHandle, or fail with one clear line. Every
    model of a setting (aligned, fine-tuned, base, judge) comes through here."""
    text = str(handle)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(
                f"model directory {text!r} has no config.json: point at a saved Hugging Face model directory"
            )
        weights = list(path.glob("*.safetensors"))
        if not weights:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            found = f"pickle weights ({', '.join(pickles[:2])})" if pickles else "no weights"
            raise UserError(
                f"model directory {text!r} has {found} and no .safetensors (pickle is never loaded): convert it "
                "where you trust it with "
                f"`python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; d='{text}'; "
                "M.from_pretrained(d).save_pretrained(d + '-st'); T.from_pretrained(d).save_pretrained(d + "
                f"'-st')\"` and pass {text}-st"
            )
        check_weights(path, text)
        return ModelHandle(text, path.resolve())
    if not _HUB_ID.match(text):
        raise UserError(f"model {text!r}: no such directory, and not a hub id of the form org/name; check the path")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:  # offline, gated or missing: all the same fix for the user
        raise UserError(
            f"model {text!r} could not be fetched from the hub ({type(exc).__name__}); "
            "download it where the hub is reachable and pass the local folder instead"
        ) from None
    return ModelHandle(text, resolve(local).path)


_WEIGHTS_MEMO = ".realign-weights-checked.json"
_weights_checked: set[str] = set()  # this process's checks, for folders where the memo cannot be written


def check_weights(path: Path, name: str) -> None:
    """Refuse a model whose safetensors files do not read (truncated, corrupt, or another format
    under the name: nothing but safetensors is ever parsed) or hold a NaN or inf weight: a defense
    would run on them and report numbers about nothing. Tensor by tensor (memory-mapped), once per
    content: the result is memoised in the folder by each file's size and mtime, as the content hash is."""
    import json

    import torch
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    seen = json.dumps([str(path.resolve()), stamp])
    if seen in _weights_checked:
        return
    memo = path / _WEIGHTS_MEMO
    try:
        if json.loads(memo.read_text()).get("stamp") == stamp:
            return
    except (OSError, ValueError):
        pass
    for file in files:
        try:
            with safe_open(file, framework="pt") as weights:
                for key in weights.keys():
                    tensor = weights.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        kind = "NaN" if torch.isnan(tensor).any() else "inf"
                        raise UserError(
                            f"model {name!r}: {file.name} holds {kind} weights in {key}: the model is broken (a "
                            "diverged fine-tune or a bad conversion); point at a model with finite weights"
                        )
        except UserError:
            raise
        except Exception as exc:  # safetensors' own error types differ across versions
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(
                f"model {name!r}: {file.name} is not a readable safetensors file ({first}): it is truncated, "
                "corrupt or in another format; save the model again with save_pretrained(safe_serialization=True)"
            ) from None
    _weights_checked.add(seen)
    try:  # a read-only model folder is fine: it is checked again by the next process
        from bench.atomic import atomic_write_json

        atomic_write_json(memo, {"stamp": stamp, "finite": True})
    except OSError:
        pass


def check_same_family(a: ModelHandle, b: ModelHandle) -> None:
    """Two models a defense combines weight by weight (aligned and fine-tuned) must share the
    architecture and the tokenizer; read from their config and tokenizer files, no weights."""
    import json

    ca, cb = (json.loads((h.path / "config.json").read_text()) for h in (a, b))
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if ca.get(key) != cb.get(key):
            raise UserError(
                f"models {a.name!r} and {b.name!r} differ in architecture ({key}: {ca.get(key)!r} vs {cb.get(key)!r}): "
                "the fine-tuned model must be a fine-tune of the aligned one"
            )
    if _vocabulary(a) != _vocabulary(b):
        raise UserError(
            f"models {a.name!r} and {b.name!r} have different tokenizers (vocabularies differ): "
            "the fine-tuned model must keep the aligned model's tokenizer"
        )


def _vocabulary(handle: ModelHandle) -> dict[str, int]:
    """The tokenizer's vocabulary, added tokens included: from tokenizer.json through the `tokenizers`
    library where there is one (importing transformers' AutoTokenizer alone takes seconds, most of
    `realign setting check`), else through transformers."""
    if (handle.path / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(handle.path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(handle.path).get_vocab()


def load_tokenizer(
    handle: ModelHandle, trust_remote_code: bool = False, chat: "ChatFormat | None" = None
) -> "PreTrainedTokenizerBase":
    """The model's tokenizer, left-padded, with the setting's chat format applied (`chat`: a
    template in place of the tokenizer's own and a system prompt; see ChatFormat)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(handle.path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation and last-token probes both rely on left padding
    if chat is not None:
        chat.apply(tok)
    if not getattr(tok, "chat_template", None):
        raise UserError(
            f"tokenizer of {handle.name!r} has no chat template: use a chat/instruct model, or give the setting "
            "models.chat_template: FILE (a Jinja chat template)"
        )
    return tok


def load_model(
    handle: ModelHandle, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> "PreTrainedModel":
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            handle.path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as exc:  # corrupt or truncated weights surface as many types (SafetensorError, OSError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load model {handle.name!r}: {first[:300]} (is the safetensors file complete?)"
        ) from None
    model.to(device)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Architecture facts


def _unwrap(model):
    """The transformers model inside a peft wrapper (its parameter names keep peft's prefix)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _find(model, paths: tuple[str, ...]):
    for dotted in paths:
        obj = _unwrap(model)
        try:
            for part in dotted.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return dotted, obj
    return None, None


def decoder_layers(model) -> "torch.nn.ModuleList":
    _, layers = _find(model, _LAYER_PATHS)
    if layers is None:
        raise UserError(f"{type(model).__name__}: decoder layers not found (known paths: {', '.join(_LAYER_PATHS)})")
    return layers


def layers_prefix(model) -> str:
    """Parameter-name prefix of the decoder stack, e.g. 'model.layers.'."""
    dotted, _ = _find(model, _LAYER_PATHS)
    if dotted is None:
        raise UserError(f"{type(model).__name__}: decoder layers not found")
    return dotted + "."


def num_layers(model) -> int:
    return len(decoder_layers(model))


def layer_index(param_name: str) -> int | None:
    """Decoder-layer index of a parameter name, or None for embeddings, final norm, LM head."""
    m = _LAYER_INDEX.search("." + param_name)
    return int(m.group(1)) if m else None


def norm_parameter_names(model) -> set[str]:
    """Names of every parameter owned by a normalisation module (RMSNorm, LayerNorm, ...)."""
    names = set()
    for mod_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for p_name, _ in module.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def swiglu_parts(mlp) -> tuple | None:
    """(gate, up, down) linears of a gated-SiLU MLP, down(silu(gate(x)) * up(x)), as Llama-family
    MLPs compute it (LlamaMLP.forward); None for any other kind of module."""
    import torch

    parts = tuple(getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    act = type(getattr(mlp, "act_fn", None)).__name__  # torch's SiLU or transformers' SiLUActivation (F.silu)
    if (
        type(mlp).__name__ in ("LlamaMLP", "MistralMLP", "Qwen2MLP")
        and act in ("SiLU", "SiLUActivation")
        and all(isinstance(m, torch.nn.Linear) for m in parts)
    ):
        return parts
    return None


def final_norm(model):
    return _find(model, ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm"))[1]


def untied_output_weight(model):
    """The LM head's weight when it is a tensor of its own (None when tied to the embeddings)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or (inp is not None and out.weight is inp.weight):
        return None
    return out.weight


LORA_TARGETS = "all-linear"  # peft: every linear layer of the decoder, not the LM head


def is_qkv_projection(module_name: str) -> bool:
    """The query, key or value projection of an attention block (Llama-family names), by the module's
    dotted name."""
    return module_name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")


def default_device() -> str:
    """Where the suite computes: the GPU when there is one (defenses, transformers generation, judges,
    fine-tunes), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def release_device_memory() -> None:
    """Hand a GPU's memory back once a model or an engine is gone. torch's caching allocator keeps
    what a process freed, and the interpreter that comes next (a vLLM engine asks for 90% of the
    GPU, a defense for its model) would find it taken. Nothing to do on a CPU."""
    import torch

    if torch.cuda.is_available():
        import gc

        gc.collect()  # what only a reference cycle still holds
        torch.cuda.empty_cache()


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 natively (else bf16 autocast is slower than fp32)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------------------------
# Attention: what a family's attention takes and computes, and how to switch it


def accepts_custom_mask(model) -> bool:
    """Whether the attention takes a 4-D mask as given (transformers' sdpa and eager paths do;
    flash-attention kernels take no mask)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


# Families whose attention is plain softmax(q k^T * scaling) v with grouped key/value heads (no
# soft-capping, no sliding window, no sinks): the flagship's own attention kernels compute exactly
# that (defenses.gradient_restoration.engine.attention, tested against transformers' eager
# attention on tiny random models). Others take transformers' own attention under a 4-D mask.
_PLAIN_ATTENTION = ("llama",)


def plain_attention(model) -> bool:
    """Whether this family's attention is plain grouped-query softmax attention (see _PLAIN_ATTENTION)."""
    return getattr(model.config, "model_type", None) in _PLAIN_ATTENTION


def set_attention(model, implementation: str) -> None:
    """Run the model's attention through `implementation` (a name transformers knows)."""
    model.config._attn_implementation = implementation


def decoder_stack(model):
    """The decoder (embeddings, layers, final norm) without the LM head."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def set_decoder_layers(model, layers: "torch.nn.ModuleList") -> None:
    """Replace the decoder stack's layers (a model cut after some layer, or made whole again)."""
    decoder_stack(model).layers = layers


def set_final_norm(model, module) -> None:
    """Replace the final norm (torch.nn.Identity() to read the residual stream before it)."""
    decoder_stack(model).norm = module


# ----------------------------------------------------------------------------------------------
# Chat template


@dataclass(frozen=True)
class ChatFormat:
    """How a setting formats chat prompts: `template` (Jinja text) in place of the tokenizer's own
    (None: the tokenizer's), and a `system_prompt` before every user turn (None: no system turn).

    Applied to a tokenizer (load_tokenizer(..., chat=)), so that every prompt rendered with it,
    in generation, training, the defenses and the utility probe, takes the same format. Its
    identity() enters the cache keys of everything it shapes; the default format has none, so
    keys made before it existed stay valid."""

    template: str | None = None
    system_prompt: str | None = None

    @property
    def is_default(self) -> bool:
        return self.template is None and self.system_prompt is None

    def identity(self) -> dict | None:
        """What a cache key holds for this format: None for the default (the key as it always was)."""
        if self.is_default:
            return None
        from bench.hashing import hash_value

        return {
            "template": None if self.template is None else hash_value(self.template),
            "system_prompt": self.system_prompt,
        }

    def apply(self, tokenizer) -> None:
        if self.template is not None:
            tokenizer.chat_template = self.template
        # read by render_prompt: the tokenizer carries it to every caller that renders with it
        tokenizer.realign_system_prompt = self.system_prompt

    def check(self, tokenizer, where: str) -> None:
        """Apply the format to `tokenizer` and render one conversation (system turn included, when set),
        or fail with one line: a template that does not parse or rejects a system turn is found
        before any weights load."""
        self.apply(tokenizer)
        try:
            render_prompt(tokenizer, "x")
            end_of_turn(tokenizer)
        except Exception as exc:  # jinja's TemplateError, or a template that raises on a system turn
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"{where}: the chat template does not render a conversation ({first[:200]}); fix the template "
                "or use chat_template: auto"
            ) from None


def read_chat_template(entry: str | None) -> str | None:
    """A chat template from a setting: None or 'auto' (the tokenizer's own), or a Jinja file's text."""
    if entry in (None, "auto"):
        return None
    path = Path(entry).expanduser()
    if not path.is_file():
        raise UserError(
            f"chat template {entry!r}: no such file; give a Jinja chat template file, or 'auto' for the tokenizer's own"
        )
    return path.read_text()


def render_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The model's chat template around one user turn, INCLUDING the assistant header; the system
    turn is `system`, else the setting's system prompt the tokenizer carries (ChatFormat)."""
    system = system if system is not None else getattr(tokenizer, "realign_system_prompt", None)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn (appended to training targets)."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}], tokenize=False
    )
    tail = probe.split("\x00", 1)[1]
    return tail.rstrip("\n") or (tokenizer.eos_token or "")


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Save as safetensors with the tokenizer beside it (tied weights handled by transformers)."""
    from bench.errors import os_error_of

    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except Exception as exc:  # safetensors' and tokenizers' I/O errors name no file: name the folder
        os_error = os_error_of(exc)
        if os_error is None:
            raise
        raise OSError(os_error.errno, os_error.strerror, str(out_dir)) from exc
