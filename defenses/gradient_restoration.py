"""Gradient-guided weight restoration with rollback (Yang, Tao, Chen, Xu, IEEE S&P 2025,
"Alleviating the Fear of Losing Alignment in LLM Fine-tuning", arXiv 2504.09757).

Reads top to bottom like the spec (shared specs/gradient_restoration.md), with its names:
L decoder layers, E = floor(2L/3) probed layers, d_h / d_b directions, k budget, tau threshold.

Inputs: aligned theta_A and fine-tuned theta_F, D_h = the harmful calibration prompts (prompts only),
D_b = the first benign task prompts (no shuffle), and the utility probe on the task's dev split.

The recovered model is theta_F with a sparse set M of candidate coordinates copied from theta_A, so:
- the run holds ONE working copy theta of the truncated model (layers < E and embeddings; the upper
  layers are read back from theta_F's file only while the utility probe runs) plus theta_A's
  candidate tensors (`aligned_copy=memory`, the size of Delta_F) or nothing more
  (`aligned_copy=stream`: each candidate tensor of theta_A is read from its file when a step
  needs it, one tensor at a time);
- a coordinate is restored exactly when theta_i == A_i != F_i, so no mask is kept: a checkpoint is
  that mask, bit-packed, and any checkpoint is rebuilt on demand as theta_F with M copied from A;
- the k-th largest qualifying |grad| comes from one pass over the candidates that keeps only the
  coordinates above a lower bound estimated on a strided sample: no concatenated copy of every
  gradient, and the bound is checked, so the answer is exact;
- each batch of prompts runs as ONE sequence (`packing`): the prompts' common prefix (system
  turn, task instruction) once, then each prompt's own tokens, under a block mask; no padding;
- the model stays on its device for the whole run.

Modes. `faithful` keeps each quirk of the released code; `clean` replaces each with an explicit
option (each can also be set on its own):
  rate_denominator  faithful "all_layers": k counts every parameter of all L layers incl. norms;
                    clean "candidates": k counts the candidate parameters only.
  grad_accumulation faithful "cumulative" in plain mode (never zeroed; fresh in rollback mode);
                    clean "fresh": zeroed before every pass in both modes.
  batches           faithful "zip": both passes use min(|D_h|, |D_b|) / batch batches;
                    clean "all": each pass uses all of its own set.
  ties              faithful "strict": select |grad| > tau (ties at tau left out, k-1 chosen);
                    clean "inclusive": select |grad| >= tau (k chosen unless values tie).
  comparison        faithful "mixed": warm-up fails if s < min_score, a checkpoint fails if
                    s <= min_score; clean "strict": both fail only when s < min_score.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import models
from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput

FAITHFUL = {"rate_denominator": "all_layers", "grad_accumulation": "cumulative", "batches": "zip", "ties": "strict", "comparison": "mixed"}
CLEAN = {"rate_denominator": "candidates", "grad_accumulation": "fresh", "batches": "all", "ties": "inclusive", "comparison": "strict"}
CHOICES = {k: {FAITHFUL[k], CLEAN[k]} for k in FAITHFUL}


@dataclass
class GradientRestorationParams:
    mode: str = field(default="faithful", metadata={"help": "'faithful' (the released code, quirks kept) or 'clean' (quirks fixed)"})
    steps: int = field(default=20, metadata={"help": "recovery steps"})
    warmup_steps: int = field(default=5, metadata={"help": "plain steps before the rollback decision"})
    save_step: int = field(default=5, metadata={"help": "checkpoint every this many steps"})
    metric_drop: float = field(default=0.05, metadata={"help": "largest tolerated relative drop of the task metric"})
    rollback: bool = field(default=True, metadata={"help": "enter rollback mode when the warm-up loses too much utility"})
    rollback_rate: float = field(default=0.2, metadata={"help": "share of this step's restored coordinates that may roll back"})
    recovery_rate: float = field(default=0.002, metadata={"help": "k = ceil(recovery_rate * N) coordinates restored per step"})
    batch_size: int = field(default=8, metadata={"help": "prompts per gradient batch"})
    n_benign: int = field(default=256, metadata={"help": "benign task prompts used (the first ones, no shuffle)"})
    n_harmful: int = field(default=256, metadata={"help": "at most this many calibration prompts"})
    seed: int = field(default=42, metadata={"help": "torch seed (the method itself is deterministic)"})
    E: int = field(default=0, metadata={"help": "decoder layers probed; 0 = floor(2L/3) as in the paper"})
    compute_dtype: str = field(default="auto", metadata={"help": "float32 (the released code's arithmetic), bfloat16 (autocast; gradients "
                                                                  "still accumulate in fp32) or auto (bfloat16 where the device computes it "
                                                                  "natively: GPUs, CPUs with AVX512-BF16 or AMX; else float32)"})
    packing: bool = field(default=True, metadata={"help": "run each batch as one sequence: the prompts' common prefix once, no padding "
                                                          "(the same h up to float rounding; false = left-padded batches as released)"})
    low_memory: bool = field(default=False, metadata={"help": "bf16 compute only: hold theta as bf16 plus sign(theta - theta_A) at 2 bits "
                                                            "instead of fp32 plus autocast's bf16 copies (3.75 bytes a candidate parameter "
                                                            "less), keep less for each backward (Llama-family layers) and add each batch's "
                                                            "weight gradients to the fp32 sums in fp32 (MKL, where torch has it); the "
                                                            "gradient sums leave memory while the probe generates, which then uses the "
                                                            "bf16 weights"})
    block_attention: bool = field(default=False, metadata={"help": "packed batches only: attention block by block (the prefix on itself, "
                                                                   "each prompt on the prefix and itself) instead of under a T x T mask; "
                                                                   "keeps ~1/8 of the T x T scores for the backward pass at 8 prompts, "
                                                                   "which pays off for long prompts; ~8% of the step on the embedded "
                                                                   "model on a CPU (Llama-family models; others keep the mask)"})
    aligned_copy: str = field(default="auto", metadata={"help": "theta_A's candidate tensors: 'memory' (held, fastest), 'stream' (read "
                                                                "from its file per step, least memory) or 'auto' (stream on CPU, memory on GPU)"})
    rate_denominator: str | None = field(default=None, metadata={"help": "all_layers | candidates (default from mode)"})
    grad_accumulation: str | None = field(default=None, metadata={"help": "cumulative | fresh (default from mode)"})
    batches: str | None = field(default=None, metadata={"help": "zip | all (default from mode)"})
    ties: str | None = field(default=None, metadata={"help": "strict | inclusive (default from mode)"})
    comparison: str | None = field(default=None, metadata={"help": "mixed | strict (default from mode)"})

    def __post_init__(self):
        if self.mode not in ("faithful", "clean"):
            raise ValueError(f"mode must be 'faithful' or 'clean', got {self.mode!r}")
        for name, default in (FAITHFUL if self.mode == "faithful" else CLEAN).items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif getattr(self, name) not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {sorted(CHOICES[name])}, got {getattr(self, name)!r}")
        for name in ("recovery_rate", "rollback_rate", "metric_drop"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'auto', 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.low_memory and self.compute_dtype == "float32":
            raise ValueError("low_memory holds theta in bf16 (plus the sign of theta - theta_A): it needs compute_dtype bfloat16 or auto")
        if self.aligned_copy not in ("auto", "memory", "stream"):
            raise ValueError(f"aligned_copy must be 'auto', 'memory' or 'stream', got {self.aligned_copy!r}")
        if self.E < 0:
            raise ValueError(f"E must be >= 0 (0 = floor(2L/3)), got {self.E}")
        if self.steps < 1 or self.save_step < 1 or self.batch_size < 1 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("steps >= 1, save_step >= 1, batch_size >= 1 and 0 <= warmup_steps <= steps are required")


# ------------------------------------------------------------------------------------------ probe


def probe_layers(num_layers: int) -> int:
    """E = floor(2L/3): Llama-2-7B 21 of 32, Gemma-2B 12 of 18."""
    return (2 * num_layers) // 3


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Chat template with the assistant header, tokenized without extra special tokens."""
    return [tokenizer(models.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def batches_of(tokenizer, prompts: list[str], batch_size: int) -> list[dict]:
    """Batches as the released code makes them: LEFT padding to the longest prompt of the batch."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        text = [models.render_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        out.append(tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False))
    return out


@dataclass
class PackedBatch:
    """One batch of prompts as ONE sequence: their common prefix once, then each prompt's own
    tokens. `allowed` lets a token see the prefix and the earlier tokens of its own prompt, with
    positions counted from the prompt's start: the same h as a padded batch, without padding and
    without computing the shared prefix once per prompt. (transformers packs sequences for
    training through flash-attention, which takes no mask and so cannot share a prefix.)"""

    input_ids: "torch.Tensor"  # [1, T]
    position_ids: "torch.Tensor"  # [1, T]
    allowed: "torch.Tensor"  # [1, 1, T, T] bool
    last: "torch.Tensor"  # [B] index of each prompt's last token
    prefix: int
    layout: models.PackedLayout  # the same structure for models.packed_attention


def packed_batches(tokenizer, prompts: list[str], batch_size: int) -> list[PackedBatch]:
    import torch

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
        out.append(PackedBatch(torch.tensor([tokens]), torch.tensor([positions]), allowed[None, None], torch.tensor(last), P,
                               models.PackedLayout.of(P, [len(g) - P for g in group])))
    return out


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
        import json

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
            raise UserError(f"{self.path} has no tensor {name!r}: the aligned and fine-tuned models differ in architecture") from None

    def get(self, name: str, stride: int = 1) -> "torch.Tensor":
        """The whole tensor, or every stride-th row of it."""
        shape = self._entry(name)["shape"]
        return self._read(name, range(0, shape[0], stride) if stride > 1 and shape else None)

    def rows(self, name: str, index: list[int]) -> "torch.Tensor":
        """Rows `index` of a tensor: an embedding's few used rows without the whole matrix."""
        return self._read(name, index)

    def shape(self, name: str) -> tuple:
        return tuple(self._entry(name)["shape"])

    def names(self) -> set[str]:
        return {n for n in self._read_header() if n != "__metadata__"}

    def _read(self, name: str, rows) -> "torch.Tensor":
        import torch

        entry = self._entry(name)
        if entry["dtype"] not in self.DTYPES:
            raise UserError(f"{self.path}: tensor {name} is stored as {entry['dtype']}; expected one of {', '.join(self.DTYPES)}")
        shape, (begin, end) = list(entry["shape"]), entry["data_offsets"]
        out = torch.empty(shape if rows is None else [len(rows)] + shape[1:], dtype=getattr(torch, self.DTYPES[entry["dtype"]]))
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        row = (end - begin) // max(shape[0], 1) if shape else end - begin
        if buf.nbytes != (end - begin if rows is None else len(rows) * row):
            raise UserError(f"{self.path} is corrupt at tensor {name}: its offsets do not match its shape; re-save the model")
        with open(self.path, "rb", buffering=0) as f:
            for i, r in enumerate([0] if rows is None else rows):
                f.seek(self._data_start + begin + r * row)
                _read_exactly(f, buf if rows is None else buf[i * row:(i + 1) * row], self.path)
        return out.to(device=self.device, dtype=self.dtype)


def _read_exactly(f, buf: memoryview, path: str) -> None:
    """Fill buf from f (one read returns at most ~2 GiB on Linux, and less near the file's end)."""
    done = 0
    while done < buf.nbytes:
        got = f.readinto(buf[done:])
        if not got:
            raise UserError(f"{path} is truncated: re-save the model")
        done += got


class TruncatedModel:
    """The working model cut after layer E-1; h(x) = residual stream there at the last token.

    What the probe never uses (upper layers, final norm, an untied LM head) is released; `full()`
    reads those tensors back from theta_F's file (they are never changed) for the utility probe
    and for the output, and releases them again after. (Released, they also stop pinning the
    loaded model's file mapping, whose pages would otherwise stay in the process.)"""

    def __init__(self, model, E: int, compute_dtype: str, upper_source: WeightFile):
        import torch

        self.model = model
        self.E = E
        self.autocast = getattr(torch, compute_dtype) if compute_dtype != "float32" else None
        self.stack = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.all_layers = models.decoder_layers(model)
        self.norm = models.final_norm(model)
        self.truncated = torch.nn.ModuleList(list(self.all_layers)[:E])
        self.upper_source = upper_source
        head = self.head = models.untied_output_weight(model)
        prefix = models.layers_prefix(model)
        final = {id(p) for p in self.norm.parameters()} if self.norm is not None else set()
        self.unused = {n: p for n, p in model.named_parameters()
                       if (n.startswith(prefix) and models.layer_index(n) >= E) or p is head or id(p) in final}
        self.dtypes = {n: p.dtype for n, p in self.unused.items()}
        self.compact: dict = {}  # name -> (parameter, the rows of the probe's vocabulary) (see use_vocabulary)
        self.remap = None  # token id -> row of the compact embedding
        self.generation_attention = model.config._attn_implementation
        self.probe_attention = models.gradient_attention(model, str(next(model.parameters()).device))
        # a packed batch's 4-D mask: our lean eager attention where it computes the family's (models.masked_attention)
        self.mask_attention = models.MASKED_ATTENTION if self.probe_attention == "eager" and models.plain_attention(model) else self.probe_attention
        self.packed_attention = False  # block attention for packed batches (set by the defense; models.packed_attention)
        self._cut()

    def use_vocabulary(self, name: str, param, token_ids: list[int]) -> None:
        """The probe sees only the tokens of its own prompts, so the input embeddings (frozen) are
        held as theta_F's rows of those tokens alone, read from its file, and the token ids are
        mapped to those rows in h(). Why not a mapping of the file: the kernel maps the pages
        around each touched page of a cached file into the process too (fault-around), and 2,000
        token rows then made 93 MB of the embedded model's 113 MB matrix resident."""
        import torch

        full = self.upper_source.shape(name)
        if full != tuple(param.shape):
            raise UserError(f"aligned and fine-tuned models differ in shape at {name}: {tuple(param.shape)} vs {full}")
        self.compact[name] = (param, self.upper_source.rows(name, token_ids))
        self.remap = torch.full((full[0],), -1, dtype=torch.long)
        self.remap[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        param.data = self.compact[name][1]

    def input_ids(self, ids: "torch.Tensor") -> "torch.Tensor":
        """Token ids as the truncated model's embedding wants them (rows of the compact one)."""
        if self.remap is None:
            return ids
        rows = self.remap[ids]
        if bool((rows < 0).any()):
            raise ValueError("a token outside the probe's vocabulary: use_vocabulary was given too few ids")
        return rows

    def materialize(self) -> None:
        """Ordinary whole tensors again (for the model handed back), read from theta_F's file."""
        import torch

        for name, (p, _) in self.compact.items():
            p.data = torch.empty(0, dtype=p.dtype)
            p.data = self.upper_source.get(name).to(p.dtype)
        self.compact, self.remap = {}, None

    def _cut(self):
        import torch

        _set_layers(self.model, self.truncated)
        models.set_attention(self.model, self.probe_attention)
        if self.norm is not None:
            _set_final_norm(self.model, torch.nn.Identity())  # no final norm on the probe
        for name, p in self.unused.items():
            p.data = torch.empty(0, dtype=self.dtypes[name], device=p.device)
        for p, rows in self.compact.values():
            p.data = rows

    def whole(self, matrices_dtype=None):
        """The whole model again: the upper layers, final norm, head and whole input embeddings read
        back from theta_F's file, the model's own attention for generation. `matrices_dtype`
        (bf16 for a probe under bf16 autocast) holds the upper layers' weight matrices in that
        dtype: autocast rounds an fp32 matrix to the same bf16 values for every matmul, so the
        generation is the same, in half the memory."""
        for name, p in self.unused.items():
            t = self.upper_source.get(name)
            p.data = t.to(matrices_dtype) if matrices_dtype is not None and t.dim() == 2 and p is not self.head else t.to(self.dtypes[name])
        for name, (p, _) in self.compact.items():
            p.data = self.upper_source.get(name).to(p.dtype)
        _set_layers(self.model, self.all_layers)
        models.set_attention(self.model, self.generation_attention)
        if self.norm is not None:
            _set_final_norm(self.model, self.norm)
        return self.model

    def full(self, matrices_dtype=None):
        """Context manager: the whole model (for generation), cut again on exit."""
        outer = self

        class _Full:
            def __enter__(self):
                return outer.whole(matrices_dtype)

            def __exit__(self, *exc):
                outer._cut()

        return _Full()

    def compute(self):
        """The compute-dtype context (autocast). Entered once around a whole gradient pass, so the
        bf16 copies of the weights are made once per pass, not once per batch."""
        import torch

        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def h(self, batch) -> "torch.Tensor":
        device = next(self.model.parameters()).device
        with self.compute():
            if isinstance(batch, PackedBatch):
                ids, positions = self.input_ids(batch.input_ids).to(device), batch.position_ids.to(device)
                models.set_attention(self.model, models.PACKED_ATTENTION if self.packed_attention else self.mask_attention)
                try:
                    if self.packed_attention:  # block by block, no T x T mask (models.packed_attention)
                        extra = {"packed_layout": batch.layout.to(device)}
                    else:
                        extra = {"attention_mask": models.custom_attention_mask(self.model, batch.allowed.to(device),
                                                                                self.autocast or next(self.model.parameters()).dtype)}
                    out = self.stack(input_ids=ids, position_ids=positions, use_cache=False, **extra)
                finally:
                    models.set_attention(self.model, self.probe_attention)
                return out.last_hidden_state[0, batch.last.to(device), :].float()
            out = self.stack(input_ids=self.input_ids(batch["input_ids"]).to(device), attention_mask=batch["attention_mask"].to(device),
                             use_cache=False)
        return out.last_hidden_state[:, -1, :].float()  # position -1 is the last real token under left padding


def _set_layers(model, layers):
    parent = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    parent.layers = layers


def _set_final_norm(model, module):
    parent = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    parent.norm = module


def mean_direction(tm: TruncatedModel, batches: list) -> "torch.Tensor":
    """Mean of h over every prompt of the set (no grad)."""
    import torch

    total, count = None, 0
    with torch.no_grad():
        for b in batches:
            h = tm.h(b)
            total = h.sum(0) if total is None else total + h.sum(0)
            count += h.shape[0]
    return total / count


def gradient_pass(tm: TruncatedModel, batches: list, direction) -> float:
    """loss = -cos(mean_over_batch h, direction), one backward per batch, gradients SUMMED."""
    import torch

    total = 0.0
    with tm.compute():
        for b in batches:
            loss = -torch.nn.functional.cosine_similarity(tm.h(b).mean(0), direction, dim=0)
            loss.backward()
            total += float(loss.detach())
    return total


# ------------------------------------------------------------------------------------------ selection


@dataclass
class Candidate:
    """One candidate tensor of the working copy (a weight of a layer < E, not a norm), with theta
    held exactly in fp32: the parameter itself. The selection asks a candidate only for
    sign(theta - theta_A) and to copy values in or back, so another representation of theta
    (SignedCandidate) can answer the same questions."""

    name: str
    param: "torch.nn.Parameter"
    grad_buffer: "torch.Tensor | None" = None  # where the gradient sum lives (a view of a FlatBuffer), if given
    module: "torch.nn.Linear | None" = None  # a summed linear adds the gradient in its backward (low_memory), if set
    needs_aligned = True  # scoring computes the sign of theta - theta_A from theta_A's values

    @property
    def grad(self) -> "torch.Tensor | None":
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

    def load(self, F, A, storage: "torch.Tensor | None" = None) -> None:
        """theta := F. Into `storage` (a view of a FlatBuffer) when given; else F, a fresh fp32
        tensor, is taken over (a copy into the old storage would keep the loaded model's file
        mapping, and every page the probe read from it, in the process)."""
        self.param.data = storage.copy_(F) if storage is not None else F

    def storage(self) -> "torch.Tensor":
        """Where theta lives now (for a load into the same memory)."""
        return self.param.data

    def release(self) -> None:
        """Drop theta and its gradient (before the output is built from the masks)."""
        import torch

        self.detach_sum()
        self.param.data = torch.empty(0, dtype=self.param.dtype, device=self.param.device)

    def diff_sign(self, A_flat, start: int, stop: int, out) -> "torch.Tensor":
        """sign(theta - theta_A) over theta.flat[start:stop] into out (A_flat: theta_A, flat)."""
        import torch

        return torch.sub(self.param.data.view(-1)[start:stop], A_flat[start:stop], out=out).sign_()

    def diff_sign_rows(self, aligned: "AlignedWeights", stride: int) -> "torch.Tensor":
        """sign(theta - theta_A) on every stride-th row."""
        import torch

        return torch.sign(self.param.data[::stride] - aligned.get(self.name, stride))

    def state_at(self, idx):
        """What theta holds at flat indices idx, to put back by a rollback: the values."""
        return self.param.data.view(-1)[idx]

    def sign_from(self, idx, previous) -> "torch.Tensor":
        """sign(theta - previous) at flat indices idx."""
        import torch

        return torch.sign(self.param.data.view(-1)[idx] - previous)

    def take_aligned(self, idx, A_values) -> None:
        """theta.flat[idx] := theta_A's values there (a copy)."""
        self.param.data.view(-1)[idx] = A_values

    def put_back(self, idx, previous, keep) -> None:
        """theta.flat[idx[keep]] := what state_at(idx) returned there."""
        self.param.data.view(-1)[idx[keep]] = previous[keep]

    def restored_mask(self, A, F) -> "torch.Tensor":
        """The coordinates that hold theta_A's value and differ in theta_F."""
        return (self.param.data == A) & (F != A)


class PackedSigns:
    """Values in {-1, 0, +1} at 2 bits each, four to a byte (code 0 = 0, 1 = +1, 2 = -1; value j
    of a byte in bits 2j, 2j+1): the sign of theta - theta_A of every candidate coordinate in a
    quarter of int8's memory (18 MB instead of 71 on the embedded model). Read a chunk at a time
    through a 256-entry table (one lookup per byte gives its four values); written at a few
    coordinates per step (a restore, a rollback). torch has no 2-bit dtype, hence by hand."""

    CODES = (0.0, 1.0, -1.0, 0.0)

    def __init__(self, data: "torch.Tensor", numel: int):
        self.data, self.numel = data, numel  # data: uint8 [ceil(numel / 4)]

    @staticmethod
    def nbytes(numel: int) -> int:
        return (numel + 3) // 4

    @classmethod
    @functools.cache
    def table(cls, device: str) -> "torch.Tensor":
        """[256, 4] float32: the four values of each byte."""
        import torch

        b = torch.arange(256)
        return torch.tensor(cls.CODES)[torch.stack([(b >> (2 * j)) & 3 for j in range(4)], dim=1)].to(device)

    @classmethod
    def encode(cls, signs: "torch.Tensor", out: "torch.Tensor | None" = None) -> "PackedSigns":
        import torch

        flat = signs.reshape(-1)
        n = flat.numel()
        codes = torch.zeros(cls.nbytes(n) * 4, dtype=torch.uint8, device=flat.device)
        codes[:n] = (flat > 0).to(torch.uint8) + 2 * (flat < 0).to(torch.uint8)
        codes = codes.view(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
        return cls(out.copy_(packed) if out is not None else packed, n)

    def decode(self, start: int, stop: int, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The values at flat positions [start, stop) as float32 (into out when given)."""
        import torch

        table = self.table(str(self.data.device))
        b0, b1 = start // 4, (stop + 3) // 4
        idx = self.data[b0:b1].long()
        if out is not None and start % 4 == 0 and (stop - start) % 4 == 0:
            return torch.index_select(table, 0, idx, out=out.view(-1, 4)).view(-1)
        values = table[idx].view(-1)[start - 4 * b0: stop - 4 * b0]
        return out.copy_(values) if out is not None else values

    def rows(self, shape: tuple, stride: int) -> "torch.Tensor":
        """Every stride-th row of the values laid out as `shape`."""
        row = math.prod(shape[1:])
        if row % 4:
            return self.decode(0, self.numel).view(shape)[::stride]
        table = self.table(str(self.data.device))
        return table[self.data.view(shape[0], row // 4)[::stride].long()].view(-1, *shape[1:])

    def at(self, idx: "torch.Tensor") -> "torch.Tensor":
        """The values at flat indices idx (float32)."""
        codes = (self.data[idx >> 2].long() >> (2 * (idx & 3))) & 3
        return self.table(str(self.data.device))[codes, 0]  # row c of the table starts with code c's value

    def set(self, idx: "torch.Tensor", values) -> None:
        """values (a number or one per index) at flat indices idx (distinct)."""
        import torch

        if not len(idx):
            return
        values = torch.as_tensor(values, dtype=torch.float32, device=idx.device).expand(idx.shape)
        shift = 2 * (idx & 3)
        code = ((values > 0).long() + 2 * (values < 0).long()) << shift
        byte, which = torch.unique(idx >> 2, return_inverse=True)  # several indices may share a byte
        clear = torch.zeros(len(byte), dtype=torch.long, device=idx.device).index_add_(0, which, 3 << shift)
        put = torch.zeros(len(byte), dtype=torch.long, device=idx.device).index_add_(0, which, code)
        self.data[byte] = ((self.data[byte].long() & ~clear) | put).to(torch.uint8)


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
    grad32: "torch.Tensor | None" = None
    needs_aligned = False

    @property
    def grad(self) -> "torch.Tensor | None":
        return self.grad32

    @property
    def sign(self) -> "torch.Tensor":
        """s as an int8 tensor of theta's shape (decoded whole: for checks, not the steps)."""
        import torch

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
        summed linear (`module`, defenses.summed_linear). Where MKL's bf16 gemm is there, its
        products go into the sum in fp32, with no bf16 rounding of each batch's gradient (closer
        to fp32 than autocast's sum, and ~2x faster); else as add_gradient(bf16 dy^T x)."""
        from defenses import summed_linear

        if self.grad_buffer is not None and summed_linear.add_product(self.grad_buffer, dy, x, accumulate=self.grad32 is not None):
            self.grad32 = self.grad_buffer
        else:
            self.add_gradient(dy.t().mm(x))

    def attach_sum(self, buffer, has_sum: bool) -> None:
        self.grad_buffer = buffer
        self.grad32 = buffer if has_sum else None

    def load(self, F, A, storage: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> None:
        """theta := F as bf16, s := sign(F - A); into storage = (bf16 view, uint8 view) when given."""
        import torch

        self.param.data = F.to(torch.bfloat16) if storage is None else storage[0].copy_(F)
        self.signs = PackedSigns.encode(torch.sign(F - A), None if storage is None else storage[1])

    def storage(self) -> "tuple[torch.Tensor, torch.Tensor]":
        return self.param.data, self.signs.data

    def release(self) -> None:
        super().release()
        self.signs = None

    def diff_sign(self, A_flat, start: int, stop: int, out) -> "torch.Tensor":
        return self.signs.decode(start, stop, out)

    def diff_sign_rows(self, aligned: "AlignedWeights", stride: int) -> "torch.Tensor":
        return self.signs.rows(tuple(self.param.shape), stride)

    def state_at(self, idx):
        return self.param.data.view(-1)[idx], self.signs.at(idx)

    def sign_from(self, idx, previous) -> "torch.Tensor":
        """At coordinates that now hold theta_A (the only ones a rollback asks about):
        sign(A - previous) = -sign(previous - A)."""
        return -previous[1]

    def take_aligned(self, idx, A_values) -> None:
        import torch

        self.param.data.view(-1)[idx] = A_values.to(torch.bfloat16)
        self.signs.set(idx, 0.0)

    def put_back(self, idx, previous, keep) -> None:
        self.param.data.view(-1)[idx[keep]] = previous[0][keep]
        self.signs.set(idx[keep], previous[1][keep])

    def restored_mask(self, A, F) -> "torch.Tensor":
        return (self.sign == 0) & (F != A)


class AlignedWeights:
    """theta_A's candidate tensors: held in memory, or read from theta_A's file at each use."""

    def __init__(self, source: WeightFile | None = None, held: dict | None = None):
        self.source, self.held = source, held

    def get(self, name: str, stride: int = 1) -> "torch.Tensor":
        if self.held is not None:
            t = self.held[name]
            return t[::stride] if stride > 1 else t
        return self.source.get(name, stride)


def score(diff, grad) -> "torch.Tensor":
    """|grad| where diff = theta - T and grad share a STRICT sign (copying T then moves the weight
    along -grad), else 0. A zero diff or a zero gradient never qualifies. sign(diff) * grad is
    exactly |grad| where the signs agree and <= 0 elsewhere, so its positive part is the score."""
    import torch

    return torch.mul(torch.sign(diff), grad).clamp_min_(0.0)


CPU_CHUNK = 1 << 18  # elements scored at a time on a CPU (see scores_above)


def scores_above(c: Candidate, A_flat, t_lo: float) -> tuple[int, "torch.Tensor", "torch.Tensor"]:
    """(number of qualifying coordinates of c, flat indices whose score > t_lo, those scores).

    The same arithmetic as `score`, written into buffers of CPU_CHUNK elements made once per
    tensor: the temporaries then stay in the core's cache, and no op allocates (a fresh 1 MB
    tensor is fresh pages from the allocator, zeroed by the kernel). 1.9x faster than `score`
    over whole tensors on the testbed's CPU, the same result (bench.perf.flagship_step and the
    chunked tests). PyTorch has no fused kernel for this, and torch.compile would need a C++
    toolchain at run time. On a GPU the whole tensor is one chunk."""
    import torch

    grad = c.grad.view(-1)
    n = grad.numel()
    chunk = min(CPU_CHUNK, n) if grad.device.type == "cpu" else n
    sign_d, s = (torch.empty(chunk, device=grad.device) for _ in range(2))
    q = torch.empty(chunk, dtype=torch.bool, device=grad.device)
    n_qual, idxs, vals = 0, [], []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        d_, s_, q_ = sign_d[:m], s[:m], q[:m]
        c.diff_sign(A_flat, start, stop, d_)
        torch.mul(d_, grad[start:stop], out=s_)  # |grad| where the signs agree, <= 0 elsewhere (see score); t_lo >= 0
        n_qual += int(torch.count_nonzero(torch.gt(s_, 0.0, out=q_)))
        idx = torch.nonzero(torch.gt(s_, t_lo, out=q_)).squeeze(1)
        idxs.append(idx + start)
        vals.append(s_[idx])
    if len(idxs) <= 1:
        return (n_qual, idxs[0], vals[0]) if idxs else (0, torch.empty(0, dtype=torch.long), grad[:0])
    return n_qual, torch.cat(idxs), torch.cat(vals)


def kth_largest(values, k: int) -> float:
    """The k-th largest value (a selection, not a sort: a top-k of a million values is ~10x slower)."""
    import torch

    return float(torch.kthvalue(values, values.numel() - k + 1).values)


def tau_lower_bound(cands: list[Candidate], aligned: AlignedWeights, k: int, margin: float, stride: int = 32) -> float:
    """A value below the k-th largest qualifying |grad| (with high probability; the caller checks):
    the (margin * k * sample share)-th largest score on every stride-th row of every tensor (1/32
    of the scores: ~10^4 or more above the bound at the default rate, plenty for a 2x margin)."""
    import torch

    cands = [c for c in cands if c.grad is not None]
    sample, total, sampled = [], 0, 0
    for c in cands:
        s = score(c.diff_sign_rows(aligned, stride), c.grad[::stride]).flatten()
        sample.append(s[s > 0])
        total += c.param.numel()
        sampled += s.numel()
    values = torch.cat(sample)
    want = math.ceil(margin * k * sampled / total)
    return 0.0 if want >= values.numel() else kth_largest(values, want)


def recover_step(cands: list[Candidate], aligned: AlignedWeights, k: int, strict: bool, keep_previous: bool) -> tuple[dict, dict]:
    """One recovery step toward theta_A: qualifying coordinates with |grad| > tau (strict) or
    >= tau, where tau is the k-th largest qualifying |grad|; theta_i := A_i there (a copy).

    Returns ({name: (flat indices restored, theta_F's values there or None)}, stats)."""
    import torch

    with_grad = [c for c in cands if c.grad is not None]
    for margin in (2.0, 16.0, math.inf):  # the bound is checked; a low one only costs a second pass
        t_lo = 0.0 if margin == math.inf else tau_lower_bound(with_grad, aligned, k, margin)
        picked, n_qual = [], 0
        for c in with_grad:
            A = aligned.get(c.name).view(-1) if c.needs_aligned else None
            n, idx, s = scores_above(c, A, t_lo)
            n_qual += n
            picked.append((c, idx, s, None if A is None else A[idx]))
        n_picked = sum(len(p[1]) for p in picked)
        if n_picked >= min(k, n_qual):  # every value >= the k-th largest is among the picked
            break
    stats = {"qualifying": n_qual, "k": k, "lower_bound_margin": margin}
    if n_qual == 0 or k == 0:
        return {c.name: (torch.empty(0, dtype=torch.long), None) for c in cands}, stats | {"selected": 0, "tau": None}
    values = torch.cat([p[2] for p in picked])
    tau = kth_largest(values, k) if k <= n_qual else float("-inf")  # fewer than k qualify: all are taken
    restored = {c.name: (torch.empty(0, dtype=torch.long), None) for c in cands}
    selected = 0
    with torch.no_grad():
        for c, idx, s, a in picked:
            take = (s > tau) if strict else (s >= tau)
            chosen = idx[take]
            if not len(chosen):
                continue
            restored[c.name] = (chosen, c.state_at(chosen) if keep_previous else None)
            c.take_aligned(chosen, a[take] if a is not None else aligned.get(c.name).view(-1)[chosen])
            selected += len(chosen)
    return restored, stats | {"selected": selected, "tau": tau}


def rollback_step(cands: list[Candidate], restored: dict, rate: float, strict: bool) -> dict:
    """One rollback step toward theta_F, restricted to this step's restored coordinates, with a
    budget of ceil(rate * qualifying); theta_i := F_i there. The coordinates are few (at most k),
    so they are handled as sparse vectors."""
    import torch

    parts = []
    for c in cands:
        idx, previous = restored[c.name]
        if len(idx) and c.grad is not None:
            parts.append((c, idx, previous, score(c.sign_from(idx, previous), c.grad.view(-1)[idx])))
    n_qual = sum(int(torch.count_nonzero(s)) for *_, s in parts)
    k = math.ceil(rate * n_qual)
    if k == 0:
        return {"qualifying": n_qual, "k": 0, "selected": 0, "tau": None}
    tau = kth_largest(torch.cat([s[s > 0] for *_, s in parts]), k)
    selected = 0
    with torch.no_grad():
        for c, idx, previous, s in parts:
            back = (s > tau) if strict else (s >= tau)
            c.put_back(idx, previous, back)
            selected += int(back.sum())
    return {"qualifying": n_qual, "k": k, "selected": selected, "tau": tau}


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None on other C libraries."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS. Freed tensors of a few MB stay in glibc's heap
    once its mmap threshold has adapted upward, and allocation patterns like a checkpoint's (two
    weight reads and a mask per tensor) then grow the process by ~3 MB a tensor: 400 MB over
    one checkpoint of the embedded model; trimming after each tensor keeps it flat. No-op where
    the C library is not glibc (or on a GPU, where these tensors are not on the C heap)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    import numpy as np
    import torch
    from safetensors.torch import save

    blob = {}
    for name, m in (masks.items() if isinstance(masks, dict) else masks):
        blob[name] = torch.from_numpy(np.packbits(m.cpu().numpy().reshape(-1)))
        blob[name + ":shape"] = torch.tensor(m.shape, dtype=torch.int64)
    return save(blob)


def unpacked(blob: bytes):
    """(name, bool mask) pairs of a packed blob, one tensor at a time."""
    import numpy as np
    import torch
    from safetensors.torch import load

    stored = load(blob)
    for name, bits in stored.items():
        if not name.endswith(":shape"):
            shape = tuple(stored[name + ":shape"].tolist())
            yield name, torch.from_numpy(np.unpackbits(bits.numpy())[: math.prod(shape)].astype(bool)).reshape(shape)


def unpack(blob: bytes) -> dict:
    return dict(unpacked(blob))


# ------------------------------------------------------------------------------------------ the defense


@register_defense("gradient_restoration")
class GradientRestoration(Defense):
    """Gradient-guided restoration of aligned weights with rollback (Yang et al., S&P 2025)."""

    Params = GradientRestorationParams
    needs = ("calibration", "benign", "probe")

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        import torch

        from defenses import summed_linear

        p: GradientRestorationParams = self.params
        torch.manual_seed(p.seed)
        t_start = time.perf_counter()
        timing = {"setup_s": 0.0, "gradient_s": 0.0, "selection_s": 0.0, "probe_s": 0.0}
        D_h = ctx.calibration_prompts[: p.n_harmful]
        D_b = ctx.benign_prompts[: p.n_benign]
        if not D_h:
            raise UserError("gradient_restoration needs harmful calibration prompts, and the set is empty")
        if not D_b:
            raise UserError("gradient_restoration needs benign task prompts, and the set is empty")
        if ctx.probe is None:
            raise UserError("gradient_restoration needs a utility probe (the task metric on a dev split)")
        tok = ctx.tokenizer()
        check_compatible(ctx)

        # --- the aligned model first: d_h = mean h(theta_A, x) over D_h
        model = ctx.load("aligned")
        dtype = next(model.parameters()).dtype
        F_file = WeightFile(_weights_file(ctx.finetuned), str(ctx.device), dtype)
        A_file = WeightFile(_weights_file(ctx.aligned), str(ctx.device), dtype)
        L = models.num_layers(model)
        E = p.E or probe_layers(L)
        if E > L:
            raise UserError(f"gradient_restoration: E={E} but the model has only {L} decoder layers")
        norms = models.norm_parameter_names(model)
        prefix = models.layers_prefix(model)
        N_all = sum(p_.numel() for n, p_ in model.named_parameters() if n.startswith(prefix))
        for param in model.parameters():
            param.requires_grad_(False)
        compute_dtype = p.compute_dtype if p.compute_dtype != "auto" else ("bfloat16" if models.native_bf16(str(ctx.device)) else "float32")
        tm = TruncatedModel(model, E, compute_dtype, upper_source=F_file)
        packing = p.packing and models.accepts_custom_mask(model)
        tm.packed_attention = packing and p.block_attention and models.plain_attention(model)
        make = packed_batches if packing else batches_of
        harmful, benign = make(tok, D_h, p.batch_size), make(tok, D_b, p.batch_size)
        t0 = time.perf_counter()
        d_h = mean_direction(tm, harmful)

        # --- theta := theta_F in the working copy; theta_A's candidate tensors held or streamed
        hold = p.aligned_copy == "memory" or (p.aligned_copy == "auto" and str(ctx.device) != "cpu")
        low_memory = compute_dtype == "bfloat16" and p.low_memory
        vocabulary = sorted({int(t) for b in harmful + benign for t in (b.input_ids if packing else b["input_ids"]).flatten()})
        cands, held, sums = _load_finetuned(model, tm, F_file, prefix, E, set(norms), hold, low_memory, vocabulary)
        spill = str(ctx.device) == "cpu"  # the sums leave memory while the probe generates (GradientSums)
        aligned = AlignedWeights(A_file, held)
        N_cand = sum(c.param.numel() for c in cands)
        d_b = mean_direction(tm, benign)
        timing["setup_s"] += time.perf_counter() - t0  # d_h, theta_F loaded, d_b

        N = N_all if p.rate_denominator == "all_layers" else N_cand
        k = math.ceil(p.recovery_rate * N)
        n_batches = min(len(harmful), len(benign))
        harmful_used = harmful[:n_batches] if p.batches == "zip" else harmful
        benign_used = benign[:n_batches] if p.batches == "zip" else benign
        strict = p.ties == "strict"

        def zero_grads():
            for c in cands:
                c.zero_grad()

        routes = {c.module: c.add_product for c in cands if c.module is not None}
        mlps = {m: parts for m in tm.truncated.modules() if (parts := models.swiglu_parts(m)) and all(p_ in routes for p_ in parts)}

        def timed_pass(batches, direction, fresh: bool):
            t = time.perf_counter()
            sums.restore()
            if fresh:
                zero_grads()
            with summed_linear.installed(routes, mlps):
                gradient_pass(tm, batches, direction)
            timing["gradient_s"] += time.perf_counter() - t

        def recover(keep_previous: bool) -> tuple[dict, dict]:
            t = time.perf_counter()
            out = recover_step(cands, aligned, k, strict, keep_previous)
            timing["selection_s"] += time.perf_counter() - t
            return out

        def roll_back(restored: dict) -> dict:
            t = time.perf_counter()
            stats = rollback_step(cands, restored, p.rollback_rate, strict)
            timing["selection_s"] += time.perf_counter() - t
            return stats

        def reset_to_finetuned() -> None:
            """theta := theta_F exactly, read from its file (never rebuilt from A and a delta)."""
            with torch.no_grad():
                for c in cands:
                    c.load(F_file.get(c.name), aligned.get(c.name), c.storage())

        def probe_score() -> float:
            """The task metric of theta, generated in fp32; with low_memory from the bf16 weights
            under autocast (theta itself is not held)."""
            t = time.perf_counter()
            if spill:
                sums.spill(ctx.cache_dir)
            with torch.no_grad(), tm.full(torch.bfloat16 if low_memory else None) as full, (tm.compute() if low_memory else contextlib.nullcontext()):
                score_ = ctx.probe(full, handle=ctx.finetuned)
            timing["probe_s"] += time.perf_counter() - t
            return score_

        ctx.progress(f"gradient_restoration: L={L}, E={E}, |D_h|={len(D_h)}, |D_b|={len(D_b)}, k={k} of N={N} ({p.mode}"
                     f"{', packed' if packing else ''}{', block attention' if tm.packed_attention else ''}, {compute_dtype}{' low_memory' if low_memory else ''}, theta_A {'held' if hold else 'streamed'})")
        s0 = probe_score()
        min_score = s0 * (1 - p.metric_drop)
        fails_final = (lambda s: s <= min_score) if p.comparison == "mixed" else (lambda s: s < min_score)
        log: list[dict] = []
        checkpoints: dict[int, bytes] = {}
        scores: dict[int, float] = {}

        def checkpoint(step: int) -> None:
            checkpoints[step] = pack(restored_masks(cands, aligned, F_file))
            scores[step] = probe_score()
            ctx.progress(f"gradient_restoration: step {step}: task metric {scores[step]:.3f} (floor {min_score:.3f})")

        # --- warm-up: plain recovery steps toward theta_A (cumulative gradients in faithful mode)
        fresh = p.grad_accumulation == "fresh"
        for step in range(1, p.warmup_steps + 1):
            timed_pass(harmful_used, d_h, fresh)
            _, stats = recover(keep_previous=False)
            log.append({"step": step, "phase": "warmup"} | stats)
            if step % p.save_step == 0:
                checkpoint(step)
        s_warm = scores[p.warmup_steps] if p.warmup_steps in scores else (probe_score() if p.warmup_steps else s0)
        # the released code compares with '<' here and '<=' in the final choice (comparison=mixed)
        rollback_mode = p.rollback and p.warmup_steps > 0 and s_warm < min_score

        if rollback_mode:
            ctx.progress(f"gradient_restoration: warm-up metric {s_warm:.3f} < {min_score:.3f}: rollback mode")
            checkpoints.clear()
            scores.clear()
            reset_to_finetuned()
            for step in range(1, p.steps + 1):
                timed_pass(harmful_used, d_h, fresh=True)  # cleared before every harmful pass
                restored, stats = recover(keep_previous=True)
                timed_pass(benign_used, d_b, fresh=True)  # ... and before and after every benign pass
                rb_stats = roll_back(restored)
                zero_grads()
                log.append({"step": step, "phase": "rollback"} | stats | {f"rollback_{k_}": v for k_, v in rb_stats.items()})
                if step % p.save_step == 0:
                    checkpoint(step)
        else:
            for step in range(p.warmup_steps + 1, p.steps + 1):
                timed_pass(harmful_used, d_h, fresh)
                _, stats = recover(keep_previous=False)
                log.append({"step": step, "phase": "plain"} | stats)
                if step % p.save_step == 0:
                    checkpoint(step)

        chosen_step = choose_checkpoint(scores, fails_final)
        info = {
            "mode": p.mode, "options": {k_: getattr(p, k_) for k_ in FAITHFUL}, "compute_dtype": compute_dtype, "low_memory": low_memory, "packing": packing,
            "aligned_copy": "memory" if hold else "stream", "block_attention": tm.packed_attention, "L": L, "E": E, "N": N, "N_all_layers": N_all,
            "N_candidates": N_cand, "k": k, "candidate_tensors": len(cands),
            "unchanged_candidate_tensors": sum(not c.param.requires_grad for c in cands), "D_h": len(D_h), "D_b": len(D_b),
            "batches_per_pass": [len(harmful_used), len(benign_used)], "s0": s0, "min_score": min_score, "warmup_score": s_warm,
            "rollback_mode": rollback_mode, "checkpoint_scores": {str(k_): v for k_, v in scores.items()}, "chosen_step": chosen_step,
            "steps": log,
        }
        if chosen_step is None:
            info["timing_s"] = {k_: round(v, 2) for k_, v in timing.items()} | {"total": round(time.perf_counter() - t_start, 2)}
            return DefenseOutput(skipped="no recovered model: the first checkpoint already lost more than metric_drop of the task metric", info=info, checkpoints=checkpoints)

        # --- the answer: theta_F with M(chosen) copied from theta_A, rebuilt from its bit-packed mask
        by_name = {c.name: c for c in cands}
        restored = 0
        sums.free()
        for c in cands:  # theta (and its signs) go first: their FlatBuffers are freed whole
            c.release()
        with torch.no_grad():
            for name, mask in unpacked(checkpoints[chosen_step]):  # one tensor's mask at a time
                c = by_name[name]
                c.param.requires_grad_(False)
                c.param.data = torch.where(mask.to(c.param.device), aligned.get(name), F_file.get(name))
                restored += int(mask.sum())
                return_freed_memory()
        tm.materialize()
        tm.whole()  # kept whole for the caller
        info["restored"] = restored
        info["timing_s"] = {k_: round(v, 2) for k_, v in timing.items()} | {"total": round(time.perf_counter() - t_start, 2)}
        return DefenseOutput(model=model, info=info, checkpoints=checkpoints)


class FlatBuffer:
    """Tensors of the given shapes as views of ONE allocation of `dtype`.

    Why: the run's long-lived state (theta, the gradient sums, the signs) made tensor by tensor
    lands in the C heap between the activations and loaded weights that come and go, and a heap
    cannot hand back what lies under a live chunk: measured on the embedded model, ~300 MB of the
    gradient pass's peak was such freed-but-held heap. One allocation per kind is mapped by the
    C library on its own, outside the heap, and freed pages of the heap are reused."""

    def __init__(self, shapes: dict, dtype, device):
        import torch

        self.flat = torch.empty(sum(math.prod(s) for s in shapes.values()), dtype=dtype, device=device)
        self.views, start = {}, 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            self.views[name] = self.flat[start:start + n].view(shape)
            start += n

    def __getitem__(self, name: str) -> "torch.Tensor":
        return self.views[name]


class GradientSums:
    """The fp32 gradient sums of the changed candidates, in one FlatBuffer.

    `spill()` writes them to an unnamed temporary file and frees their memory while the utility
    probe generates; the next gradient pass reads them back first (`restore()`). Why: they are 4
    bytes a candidate parameter (284 MB on the embedded model) and the probe's whole model comes
    on top of them, which made the probe the run's peak. Sums that are all cleared (rollback
    mode clears them after every step) are freed without a write."""

    def __init__(self, cands: list, device):
        self.cands, self.device = cands, device
        self.file, self.has_sum = None, set()
        self._allocate()

    def _allocate(self) -> None:
        import torch

        self.buffer = FlatBuffer({c.name: c.param.shape for c in self.cands}, torch.float32, self.device)
        for c in self.cands:
            c.grad_buffer = self.buffer[c.name]

    def spill(self, directory) -> None:
        import tempfile

        if self.buffer is None:
            return
        self.has_sum = {c.name for c in self.cands if c.grad is not None}
        if self.has_sum:
            self.file = tempfile.TemporaryFile(dir=directory if Path(directory).is_dir() else None)
            self.file.write(memoryview(self.buffer.flat.numpy()).cast("B"))
        self.free()

    def restore(self) -> None:
        if self.buffer is not None:
            return
        self._allocate()
        if self.file is not None:
            self.file.seek(0)
            _read_exactly(self.file, memoryview(self.buffer.flat.numpy()).cast("B"), "the spilled gradient sums")
            self.file.close()
            self.file = None
        for c in self.cands:
            c.attach_sum(self.buffer[c.name], c.name in self.has_sum)

    def free(self) -> None:
        for c in self.cands:
            c.detach_sum()
        self.buffer = None


def _load_finetuned(model, tm: TruncatedModel, F_file: WeightFile, prefix: str, E: int, norms: set, hold: bool,
                    low_memory: bool, vocabulary: list[int]) -> tuple[list[Candidate], dict | None, GradientSums]:
    """theta := theta_F in every tensor the probe uses; returns the candidate tensors (bf16 + the
    sign of theta - theta_A when `low_memory`), when `hold` a copy of theta_A's candidate
    tensors, and the gradient sums. theta, the signs, theta_A's copy and the gradient sums each live in one FlatBuffer;
    the input embeddings are theta_F's rows of `vocabulary`, the token ids of the probe's batches.
    Fails when no candidate weight differs."""
    import torch

    from defenses import summed_linear

    keys = F_file.names()
    is_candidate = lambda n: n.startswith(prefix) and (i := models.layer_index(n)) is not None and i < E and n not in norms
    shapes = {n: p.shape for n, p in model.named_parameters() if n in keys and n not in tm.unused and is_candidate(n)}
    device = next(model.parameters()).device
    if low_memory:
        theta16 = FlatBuffer(shapes, torch.bfloat16, device)
        signs = FlatBuffer({n: (PackedSigns.nbytes(math.prod(sh)),) for n, sh in shapes.items()}, torch.uint8, device)
        storage = lambda n: (theta16[n], signs[n])
    else:
        theta32 = FlatBuffer(shapes, torch.float32, device)
        storage = lambda n: theta32[n]
    held_flat = FlatBuffer(shapes, torch.float32, device) if hold else None
    cands: list[Candidate] = []
    held: dict | None = {} if hold else None
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in keys or name in tm.unused:
                continue  # tied lm_head; upper layers are read from the file when needed
            if param is embeddings:
                tm.use_vocabulary(name, param, vocabulary)
                continue
            F = F_file.get(name)
            if F.shape != param.shape:
                raise UserError(f"aligned and fine-tuned models differ in shape at {name}: {tuple(param.shape)} vs {tuple(F.shape)}")
            if name not in shapes:
                param.data = F
                continue
            if held is not None:
                held[name] = held_flat[name].copy_(param.data)
            c = SignedCandidate(name, param) if low_memory else Candidate(name, param)
            # theta_A == theta_F in the whole tensor (a LoRA that does not target it): theta - theta_A
            # is 0 there and stays 0, so no coordinate can ever qualify; its gradient would never
            # be read, so it is not taken (no weight-gradient product, no gradient sum).
            param.requires_grad_(not torch.equal(F, param.data))
            c.load(F, param.data, storage(name))  # param.data is still theta_A's value here
            del F
            cands.append(c)
    changed = [c for c in cands if c.param.requires_grad]
    if not changed:
        raise UserError("the fine-tuned model equals the aligned model in every candidate weight: nothing to restore")
    sums = GradientSums(changed, device)
    for c in changed:
        module = model.get_submodule(c.name.rpartition(".")[0])
        if low_memory and getattr(module, "weight", None) is c.param and summed_linear.supports(module):
            c.module = module  # its gradient is added to the sum in the backward (gradient_pass, routes)
        else:
            c.param.register_post_accumulate_grad_hook(c.accumulate)
    return cands, held, sums


def choose_checkpoint(scores: dict[int, float], fails) -> int | None:
    """Checkpoints in step order; stop at the first that fails; answer the one before it.

    None fails -> the last; the first fails -> None (no recovered model)."""
    previous = None
    for step in sorted(scores):
        if fails(scores[step]):
            return previous
        previous = step
    return previous


def check_compatible(ctx: DefenseContext) -> None:
    """Same architecture, shapes and tokenizer, or one clear line."""
    import json

    a = json.loads((ctx.aligned.path / "config.json").read_text())
    f = json.loads((ctx.finetuned.path / "config.json").read_text())
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"):
        if a.get(key) != f.get(key):
            raise UserError(f"aligned and fine-tuned models differ in {key} ({a.get(key)} vs {f.get(key)}): they must share one architecture")
    ta = models.load_tokenizer(ctx.aligned)
    if ta.get_vocab() != ctx.tokenizer().get_vocab():
        raise UserError("aligned and fine-tuned models have different tokenizers: they must share one")


def _weights_file(handle: models.ModelHandle):
    files = sorted(handle.path.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"{handle.name}: expected one .safetensors file, found {len(files)} (sharded checkpoints are not supported yet)")
    return files[0]
