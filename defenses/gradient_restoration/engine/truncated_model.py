"""The working model cut after layer E-1 (spec: Probe), holding only what the probe reads."""

from __future__ import annotations

import contextlib

import torch

from bench import models
from bench.errors import UserError
from defenses.gradient_restoration.engine import attention
from defenses.gradient_restoration.engine.packed_batches import PackedBatch
from defenses.gradient_restoration.engine.weights_file import WeightFile


class TruncatedModel:
    """The working model cut after layer E-1; h(x) = residual stream there at the last token.

    What the probe never uses (upper layers, final norm, an untied LM head) is released; `full()`
    reads those tensors back from theta_F's file (they are never changed) for the utility probe
    and for the output, and releases them again after. (Released, they also stop pinning the
    loaded model's file mapping, whose pages would otherwise stay in the process.)"""

    def __init__(self, model, E: int, compute_dtype: str, upper_source: WeightFile):
        self.model = model
        self.E = E
        self.autocast = getattr(torch, compute_dtype) if compute_dtype != "float32" else None
        self.stack = models.decoder_stack(model)
        self.all_layers = models.decoder_layers(model)
        self.norm = models.final_norm(model)
        self.truncated = torch.nn.ModuleList(list(self.all_layers)[:E])
        self.upper_source = upper_source
        head = self.head = models.untied_output_weight(model)
        prefix = models.layers_prefix(model)
        final = {id(p) for p in self.norm.parameters()} if self.norm is not None else set()
        self.unused = {
            n: p
            for n, p in model.named_parameters()
            if (n.startswith(prefix) and models.layer_index(n) >= E) or p is head or id(p) in final
        }
        self.dtypes = {n: p.dtype for n, p in self.unused.items()}
        self.compact: dict = {}  # name -> (parameter, the rows of the probe's vocabulary) (see use_vocabulary)
        self.remap = None  # token id -> row of the compact embedding
        self.generation_attention = model.config._attn_implementation
        self.probe_attention = attention.gradient_attention(model, str(next(model.parameters()).device))
        # a packed batch's 4-D mask: our lean eager attention where it computes the family's
        # (attention.masked_attention)
        self.mask_attention = (
            attention.MASKED_ATTENTION
            if self.probe_attention == "eager" and models.plain_attention(model)
            else self.probe_attention
        )
        self.packed_attention = (
            False  # block attention for packed batches (set by the working copy; attention.packed_attention)
        )
        self._cut()

    def use_vocabulary(self, name: str, param, token_ids: list[int]) -> None:
        """The probe sees only the tokens of its own prompts, so the input embeddings (frozen) are
        held as theta_F's rows of those tokens alone, read from its file, and the token ids are
        mapped to those rows in h(). Why not a mapping of the file: the kernel maps the pages
        around each touched page of a cached file into the process too (fault-around), and 2,000
        token rows then made 93 MB of the embedded model's 113 MB matrix resident."""
        full = self.upper_source.shape(name)
        if full != tuple(param.shape):
            raise UserError(f"aligned and fine-tuned models differ in shape at {name}: {tuple(param.shape)} vs {full}")
        self.compact[name] = (param, self.upper_source.rows(name, token_ids))
        self.remap = torch.full((full[0],), -1, dtype=torch.long)
        self.remap[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        param.data = self.compact[name][1]

    def input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids as the truncated model's embedding wants them (rows of the compact one)."""
        if self.remap is None:
            return ids
        rows = self.remap[ids]
        if bool((rows < 0).any()):
            raise ValueError("a token outside the probe's vocabulary: use_vocabulary was given too few ids")
        return rows

    def materialize(self) -> None:
        """Ordinary whole tensors again (for the model handed back), read from theta_F's file."""
        for name, (p, _) in self.compact.items():
            p.data = torch.empty(0, dtype=p.dtype)
            p.data = self.upper_source.get(name).to(p.dtype)
        self.compact, self.remap = {}, None

    def _cut(self):
        models.set_decoder_layers(self.model, self.truncated)
        attention.use(self.model, self.probe_attention)
        if self.norm is not None:
            models.set_final_norm(self.model, torch.nn.Identity())  # no final norm on the probe
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
            p.data = (
                t.to(matrices_dtype)
                if matrices_dtype is not None and t.dim() == 2 and p is not self.head
                else t.to(self.dtypes[name])
            )
        for name, (p, _) in self.compact.items():
            p.data = self.upper_source.get(name).to(p.dtype)
        models.set_decoder_layers(self.model, self.all_layers)
        attention.use(self.model, self.generation_attention)
        if self.norm is not None:
            models.set_final_norm(self.model, self.norm)
        return self.model

    @contextlib.contextmanager
    def full(self, matrices_dtype=None):
        """The whole model (for generation), cut again on exit."""
        model = self.whole(matrices_dtype)
        try:
            yield model
        finally:
            self._cut()

    def compute(self):
        """The compute-dtype context (autocast). Entered once around a whole gradient pass, so the
        bf16 copies of the weights are made once per pass, not once per batch."""
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def h(self, batch) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with self.compute():
            if isinstance(batch, PackedBatch):
                ids, positions = self.input_ids(batch.input_ids).to(device), batch.position_ids.to(device)
                attention.use(self.model, attention.PACKED_ATTENTION if self.packed_attention else self.mask_attention)
                try:
                    if self.packed_attention:  # block by block, no T x T mask (attention.packed_attention)
                        extra = {"packed_layout": batch.layout.to(device)}
                    else:
                        extra = {
                            "attention_mask": attention.custom_attention_mask(
                                self.model,
                                batch.allowed.to(device),
                                self.autocast or next(self.model.parameters()).dtype,
                            )
                        }
                    out = self.stack(input_ids=ids, position_ids=positions, use_cache=False, **extra)
                finally:
                    attention.use(self.model, self.probe_attention)
                return out.last_hidden_state[0, batch.last.to(device), :].float()
            out = self.stack(
                input_ids=self.input_ids(batch["input_ids"]).to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            )
        return out.last_hidden_state[:, -1, :].float()  # position -1 is the last real token under left padding
