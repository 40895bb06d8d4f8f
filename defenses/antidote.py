"""Antidote (Huang et al., ICML 2025): one-shot pruning of harm-salient weights after fine-tuning.

Read from the authors' released code: the modules scored are every linear layer whose name
contains "lora" (LoRA mode: lora_A and lora_B of each adapted module) or, for full fine-tunes,
q_proj / k_proj / v_proj. Wanda score S_ij = |W_ij| * sqrt(mean over calibration tokens of X_j^2),
X = the module's input, collected layer by layer on the harmful set. As in the released code,
every mask is computed on the UNPRUNED model first (a layer's inputs come from the unpruned layers
before it) and only then are the masks applied. Per output row, the top ceil(dense_ratio * columns)
entries by S (rounded UP, as the released code: with a rank-8 LoRA one of the 8 columns of each
lora_B row) get mask 1 and are zeroed: W := W * (1 - mask). One shot, no training.

Inputs: aligned + LoRA adapter (or the fine-tuned model for full fine-tunes), and a harmful set:
`data=calibration` (the flagship's calibration prompts) or `data=harmful_pairs` (prompts with
harmful answers, a larger budget when one exists).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bench import models
from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, check_choice, option
from defenses.layerwise import real_tokens, walk_layers


@dataclass
class AntidoteParams:
    dense_ratio: float = option(0.1, "share of each output row zeroed (the most harm-salient)")
    data: str = option("calibration", "'calibration' (prompts) or 'harmful_pairs' (prompt + harmful answer)")
    max_examples: int = option(2000, "at most this many examples of the harmful set")
    batch_size: int = option(8, "examples per forward batch")

    def __post_init__(self):
        if not 0.0 < self.dense_ratio < 1.0:
            raise ValueError(f"dense_ratio must be in (0, 1), got {self.dense_ratio}")
        check_choice("data", self.data, ("calibration", "harmful_pairs"))


def pruned_per_row(columns: int, ratio: float) -> int:
    """ceil(columns * ratio), the released code's count; the product is rounded to 9 decimals first
    so that float error (0.1 * 80 = 8.000000000000002) does not add an entry."""
    return math.ceil(round(columns * ratio, 9))


def wanda_mask(W, input_sq_mean, ratio: float):
    """True at the top ceil(ratio * columns) of each row by |W| * sqrt(mean X^2) (Wanda's per-output sort)."""
    import torch

    score = W.abs() * torch.sqrt(input_sq_mean).unsqueeze(0)
    n = pruned_per_row(W.shape[1], ratio)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if n:
        idx = torch.sort(score, dim=-1, descending=True, stable=True)[1][:, :n]
        mask.scatter_(1, idx, True)
    return mask


def _scored(model, lora: bool) -> dict:
    import torch

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if (lora and "lora" in name) or (not lora and models.is_qkv_projection(name)):
            out[name] = module
    return out


@register_defense("antidote")
class Antidote(Defense):
    """Zero the most harm-salient 10% of each row of the LoRA factors by Wanda score (Huang et al., ICML 2025)."""

    Params = AntidoteParams
    needs = ("adapter or full fine-tune", "calibration or harmful_pairs")
    reads = ("calibration_prompts",)  # the harmful pairs key it through cache_inputs, where it reads them
    # the paper's question is how the harmful budget matters: a board row for each set
    sweep = {"data": ["calibration", "harmful_pairs"]}
    curve = {"dense_ratio": [0.02, 0.05, 0.1, 0.2, 0.4]}
    deviations = """
        None in the pruning rule: the count per row is rounded up and every mask is computed on the
        unpruned model before any is applied, as the released code does. The harmful set is the
        flagship's calibration prompts (`data=calibration`) or the attack's harmful pairs
        (`data=harmful_pairs`); the authors used 2000 BeaverTails pairs, which the embedded testbed
        does not have.
    """

    def cache_inputs(self, ctx: DefenseContext) -> dict:
        from bench.hashing import hash_value

        # the rule changed under the same parameters (count rounded up, masks from the unpruned
        # model): a cache made by the earlier rule must not answer for this one
        out = {"rule": "ceil, unpruned masks"}
        if self.params.data == "harmful_pairs":  # the calibration prompts are in every defense's key
            out["harmful_pairs"] = hash_value(ctx.harmful_pairs[: self.params.max_examples])
        return out

    def texts(self, ctx: DefenseContext, tok) -> list[str]:
        p: AntidoteParams = self.params
        if p.data == "calibration":
            rows = [models.render_prompt(tok, q) for q in ctx.calibration_prompts]
        else:
            rows = [models.render_prompt(tok, r["prompt"]) + r["response"] for r in ctx.harmful_pairs]
        return rows[: p.max_examples]

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        import torch

        p: AntidoteParams = self.params
        tok = ctx.tokenizer()
        texts = self.texts(ctx, tok)
        if not texts:
            if p.data == "harmful_pairs":
                return DefenseOutput(
                    skipped="antidote: no harmful pairs were given (the larger harmful budget)", info={"data": p.data}
                )
            raise UserError("antidote: the calibration set is empty")
        t0 = time.perf_counter()
        lora = ctx.adapter is not None and (ctx.adapter / "adapter_config.json").exists()
        if lora:
            from peft import PeftModel

            model = PeftModel.from_pretrained(ctx.load("aligned"), str(ctx.adapter))
        else:
            model = ctx.load("finetuned")
        model.eval()
        tok.padding_side = "left"
        batches = [
            tok(texts[i : i + p.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            for i in range(0, len(texts), p.batch_size)
        ]
        scored = _scored(model, lora)
        masks = {}
        seconds = {"load": time.perf_counter() - t0}  # where apply's time goes
        t0 = time.perf_counter()

        def visit(index, layer, feed, current):
            mine = {n: m for n, m in scored.items() if models.layer_index(n) == index}
            sums = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in mine.items()}
            counts = {n: 0 for n in mine}

            def hook(module, args, n):
                x = real_tokens(args[0].float(), current)
                sums[n] += x.pow(2).sum(0)
                counts[n] += x.shape[0]

            hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in mine.items()]
            feed()
            for h in hooks:
                h.remove()
            for n, m in mine.items():  # masks only: the walk goes on through the unpruned layers
                masks[n] = wanda_mask(m.weight.data.float(), sums[n] / max(counts[n], 1), p.dense_ratio)

        walk_layers(model, batches, visit)
        seconds["scores"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pruned = {}
        for n, mask in masks.items():
            scored[n].weight.data[mask] = 0
            pruned[n] = int(mask.sum())
        if lora:
            model = model.merge_and_unload()
        seconds["prune_and_merge"] = time.perf_counter() - t0
        return DefenseOutput(
            model=model,
            info={
                "mode": "lora" if lora else "full",
                "data": p.data,
                "examples": len(texts),
                "modules": len(pruned),
                "zeroed": sum(pruned.values()),
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
            },
        )
