"""theta, the run's one working copy, and everything the recipe asks of it.

The recipe sees a small protocol: `model` (h of a batch, the compute context), `batches`,
`load_finetuned`, `candidates` and `aligned` (what a recover or rollback step reads and writes),
`summing` (one gradient pass), `score` (the utility probe), `masks` (a checkpoint),
`reset_to_finetuned` and `rebuild` (the answer). Behind it, each SpeedOptions switch picks its
engine piece: packed batches, attention kernels, the fp32 or signed candidates, summed linears,
theta_A held or streamed, the gradient sums spilled while the probe generates.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from typing import TYPE_CHECKING

import torch

from bench import models
from bench.errors import UserError
from defenses.base import DefenseContext
from defenses.gradient_restoration.engine import summed_linear
from defenses.gradient_restoration.engine.candidates import AlignedWeights, Candidate, SignedCandidate
from defenses.gradient_restoration.engine.memory import FlatBuffer, GradientSums, return_freed_memory
from defenses.gradient_restoration.engine.packed_batches import packed_batches
from defenses.gradient_restoration.engine.packed_signs import PackedSigns
from defenses.gradient_restoration.engine.truncated_model import TruncatedModel
from defenses.gradient_restoration.engine.weights_file import WeightFile, weights_file
from defenses.gradient_restoration.masks import pack, restored_masks, unpacked
from defenses.gradient_restoration.rules import batches_of

if TYPE_CHECKING:
    from defenses.gradient_restoration.recipe import SpeedOptions


class WorkingCopy:
    """theta: opened as theta_A (whole), cut after layer E-1 by `cut_after`, made theta_F by
    `load_finetuned`. The model stays on its device for the whole run."""

    def __init__(self, ctx: DefenseContext, speed: "SpeedOptions"):
        self.t_start = time.perf_counter()
        check_compatible(ctx)
        self.ctx, self.speed, self.device = ctx, speed, str(ctx.device)
        self.timing = {"setup_s": 0.0, "gradient_s": 0.0, "selection_s": 0.0, "probe_s": 0.0}
        self.whole_model = ctx.load("aligned")
        dtype = next(self.whole_model.parameters()).dtype
        self.F_file = WeightFile(weights_file(ctx.finetuned), self.device, dtype)
        self.A_file = WeightFile(weights_file(ctx.aligned), self.device, dtype)
        self.L = models.num_layers(self.whole_model)
        self.prefix = models.layers_prefix(self.whole_model)
        self.N_all_layers = sum(p.numel() for n, p in self.whole_model.named_parameters() if n.startswith(self.prefix))
        for param in self.whole_model.parameters():
            param.requires_grad_(False)
        self.compute_dtype = (
            speed.compute_dtype
            if speed.compute_dtype != "auto"
            else ("bfloat16" if models.native_bf16(self.device) else "float32")
        )
        self.low_memory = self.compute_dtype == "bfloat16" and speed.low_memory
        self.packing = speed.packing and models.accepts_custom_mask(self.whole_model)
        self.hold = speed.aligned_copy == "memory" or (speed.aligned_copy == "auto" and self.device != "cpu")
        self.spill = self.device == "cpu"  # the sums leave memory while the probe generates (GradientSums)

    def cut_after(self, E: int) -> None:
        """Only layers 0..E-1 run from now on (TruncatedModel)."""
        if E > self.L:
            raise UserError(f"gradient_restoration: E={E} but the model has only {self.L} decoder layers")
        self.E = E
        self.norms = models.norm_parameter_names(self.whole_model)  # before the cut: the upper layers' norms too
        self.model = TruncatedModel(self.whole_model, E, self.compute_dtype, upper_source=self.F_file)
        self.model.packed_attention = (
            self.packing and self.speed.block_attention and models.plain_attention(self.whole_model)
        )

    def batches(self, prompts: list[str], batch_size: int) -> list:
        tokenizer = self.ctx.tokenizer()
        return (
            packed_batches(tokenizer, prompts, batch_size)
            if self.packing
            else batches_of(tokenizer, prompts, batch_size)
        )

    @contextlib.contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.startswith("cuda"):  # kernels run after their launch: time the work, not the launch
                import torch

                torch.cuda.synchronize()
            self.timing[key] += time.perf_counter() - t

    def timings(self) -> dict:
        """Seconds spent in each part so far, and in all."""
        return {k: round(v, 2) for k, v in self.timing.items()} | {
            "total": round(time.perf_counter() - self.t_start, 2)
        }

    def load_finetuned(self, batches: list) -> None:
        """theta := theta_F; the candidates, theta_A's copy (held or streamed) and the gradient sums."""
        vocabulary = sorted(
            {int(t) for b in batches for t in (b.input_ids if self.packing else b["input_ids"]).flatten()}
        )
        self.candidates, held, self.sums = _load_finetuned(
            self.whole_model,
            self.model,
            self.F_file,
            self.prefix,
            self.E,
            self.norms,
            self.hold,
            self.low_memory,
            vocabulary,
        )
        self.aligned = AlignedWeights(self.A_file, held)
        self.N_candidates = sum(c.param.numel() for c in self.candidates)
        self.routes = {c.module: c.add_product for c in self.candidates if c.module is not None}
        self.mlps = {
            m: parts
            for m in self.model.truncated.modules()
            if (parts := models.swiglu_parts(m)) and all(p in self.routes for p in parts)
        }

    def zero_grads(self) -> None:
        for c in self.candidates:
            c.zero_grad()

    @contextlib.contextmanager
    def summing(self, fresh: bool):
        """Within: one gradient pass whose weight gradients are added to the sums (cleared first if fresh)."""
        with self.timed("gradient_s"):
            self.sums.restore()
            if fresh:
                self.zero_grads()
            with summed_linear.installed(self.routes, self.mlps):
                yield

    def score(self, utility_probe) -> float:
        """The task metric of theta, generated in fp32; with low_memory from the bf16 weights
        under autocast (theta itself is not held)."""
        with self.timed("probe_s"):
            if self.spill:
                self.sums.spill(self.ctx.cache_dir)
            with (
                torch.no_grad(),
                self.model.full(torch.bfloat16 if self.low_memory else None) as full,
                self.model.compute() if self.low_memory else contextlib.nullcontext(),
            ):
                return utility_probe(full, handle=self.ctx.finetuned)

    def masks(self) -> bytes:
        """The checkpoint: M, bit-packed (masks.py)."""
        return pack(restored_masks(self.candidates, self.aligned, self.F_file))

    def reset_to_finetuned(self) -> None:
        """theta := theta_F exactly, read from its file (never rebuilt from A and a delta)."""
        with torch.no_grad():
            for c in self.candidates:
                c.load(self.F_file.get(c.name), self.aligned.get(c.name), c.storage())

    def rebuild(self, checkpoint: bytes) -> tuple:
        """(the whole model theta_F with the checkpoint's M copied from theta_A, |M|)."""
        by_name = {c.name: c for c in self.candidates}
        restored = 0
        self.sums.free()
        for c in self.candidates:  # theta (and its signs) go first: their FlatBuffers are freed whole
            c.release()
        with torch.no_grad():
            for name, mask in unpacked(checkpoint):  # one tensor's mask at a time
                c = by_name[name]
                c.param.requires_grad_(False)
                c.param.data = torch.where(mask.to(c.param.device), self.aligned.get(name), self.F_file.get(name))
                restored += int(mask.sum())
                return_freed_memory()
        self.model.materialize()
        return self.model.whole(), restored  # kept whole for the caller

    def describe(self) -> str:
        return (
            f"{', packed' if self.packing else ''}{', block attention' if self.model.packed_attention else ''}, "
            f"{self.compute_dtype}"
            f"{' low_memory' if self.low_memory else ''}, theta_A {'held' if self.hold else 'streamed'}"
        )

    def candidate_info(self) -> dict:
        return {
            "N_all_layers": self.N_all_layers,
            "N_candidates": self.N_candidates,
            "candidate_tensors": len(self.candidates),
            "unchanged_candidate_tensors": sum(not c.param.requires_grad for c in self.candidates),
        }

    def info(self) -> dict:
        return {
            "compute_dtype": self.compute_dtype,
            "low_memory": self.low_memory,
            "packing": self.packing,
            "aligned_copy": "memory" if self.hold else "stream",
            "block_attention": self.model.packed_attention,
        }


def _load_finetuned(
    model,
    tm: TruncatedModel,
    F_file: WeightFile,
    prefix: str,
    E: int,
    norms: set,
    hold: bool,
    low_memory: bool,
    vocabulary: list[int],
) -> tuple[list[Candidate], dict | None, GradientSums]:
    """theta := theta_F in every tensor the probe uses; returns the candidate tensors (bf16 + the
    sign of theta - theta_A when `low_memory`), when `hold` a copy of theta_A's candidate
    tensors, and the gradient sums. theta, the signs, theta_A's copy and the gradient sums each live in one FlatBuffer;
    the input embeddings are theta_F's rows of `vocabulary`, the token ids of the probe's batches.
    Fails when no candidate weight differs."""
    keys = F_file.names()
    is_candidate = lambda n: (
        n.startswith(prefix) and (i := models.layer_index(n)) is not None and i < E and n not in norms
    )
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
                raise UserError(
                    f"aligned and fine-tuned models differ in shape at {name}: {tuple(param.shape)} vs {tuple(F.shape)}"
                )
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
            c.module = module  # its gradient is added to the sum in the backward (WorkingCopy.summing, routes)
        else:
            c.param.register_post_accumulate_grad_hook(c.accumulate)
    return cands, held, sums


def check_compatible(ctx: DefenseContext) -> None:
    """Same architecture, shapes and tokenizer, or one clear line."""
    a = json.loads((ctx.aligned.path / "config.json").read_text())
    f = json.loads((ctx.finetuned.path / "config.json").read_text())
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"):
        if a.get(key) != f.get(key):
            raise UserError(
                f"aligned and fine-tuned models differ in {key} ({a.get(key)} vs {f.get(key)}): they must share one "
                "architecture"
            )
    ta = models.load_tokenizer(ctx.aligned)
    if ta.get_vocab() != ctx.tokenizer().get_vocab():
        raise UserError("aligned and fine-tuned models have different tokenizers: they must share one")
