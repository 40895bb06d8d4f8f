"""Safe Delta (Lu et al., ICML 2025): keep the part of the fine-tuning delta the safety loss can afford.

A SparseGPT-style pass, layer by layer, on the ALIGNED model's linear layers with the FINE-TUNED
weights beside them (specs/baselines.md, read from the authors' released runner):

1. H = (2/n) sum x x^T over the safety set's tokens (x = the layer's input; running average as
   batches arrive, n counting sequences). Dead columns (H_jj = 0) get H_jj = 1.
2. H += percdamp * mean(diag H) * I; U = upper Cholesky factor of H^-1; d_j = U_jj.
3. Per block of 2048 columns (the released run; the spec's 1024 is an error): c_ij = 1 / d_j^2,
   l_ij = (W_F - W_A)_ij^2 / d_j^2. Order the block's entries by c ascending, leave out the 15%
   with the largest c, keep (take W_F's value for) every entry whose cumulative l in that order
   is <= mean(c) * (s / 2) * (rows / 4096).
4. From W = W_A, walk the block in sub-blocks of 4 columns: q = w with kept entries set to W_F;
   err = (w - q) / d; later columns of the block -= err @ U[sub-block, later]; after the block, all
   later columns -= Err @ U[block, later] (OBS compensation).

Inputs: aligned and fine-tuned weights (full weights; a LoRA fine-tune is used merged) and a small
safety set (harmful prompts with refusals). Works on every linear layer whose weights changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench import models
from bench.errors import UserError
from defenses import register_defense
from defenses.base import Defense, DefenseContext, DefenseOutput, option
from defenses.layerwise import real_tokens, walk_layers


@dataclass
class SafeDeltaParams:
    s: float = option(0.11, "safety budget scale (larger keeps more of the delta)")
    percdamp: float = option(0.01, "Hessian damping, a share of mean(diag H)")
    blocksize: int = option(2048, "columns per block (2048, as the released run; the spec's 1024 is an error)")
    sub_block: int = option(4, "columns per compensation sub-block")
    exclude: float = option(0.15, "share of each block's entries (largest cost weight) never kept")
    max_examples: int = option(256, "at most this many safety-set examples")
    batch_size: int = option(8, "examples per forward batch")

    def __post_init__(self):
        if self.s <= 0 or not 0 <= self.percdamp < 1 or not 0 <= self.exclude < 1:
            raise ValueError("s must be > 0, percdamp and exclude in [0, 1)")
        if self.blocksize < 1 or self.sub_block < 1:
            raise ValueError("blocksize and sub_block must be >= 1")


class Hessian:
    """Running H = (2/n) sum x x^T, n counting sequences (SparseGPT's add_batch)."""

    def __init__(self, columns: int, device="cpu"):
        import torch

        self.H = torch.zeros(columns, columns, device=device)
        self.n = 0

    def add(self, tokens, sequences: int) -> None:
        self.H *= self.n / (self.n + sequences)
        self.n += sequences
        x = (2 / self.n) ** 0.5 * tokens.float()
        self.H += x.T @ x


def inverse_cholesky_upper(H, percdamp: float):
    """Dead columns to 1, damping, then U = upper Cholesky factor of H^-1 (as SparseGPT)."""
    import torch

    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def keep_mask(delta_block, d_block, s: float, rows: int, exclude: float):
    """Step 3 for one block: which entries take the fine-tuned value."""
    import torch

    c = torch.ones_like(delta_block) / d_block.reshape(1, -1) ** 2
    loss = (delta_block**2 / d_block.reshape(1, -1) ** 2).flatten()
    order = torch.argsort(c.flatten(), stable=True)
    n_out = int(exclude * c.numel())
    if n_out:
        order = order[:-n_out]
    budget = c.mean() * (s / 2) * (rows / 4096)
    keep = torch.zeros_like(loss, dtype=torch.bool)
    keep[order] = torch.cumsum(loss[order], dim=0) <= budget
    return keep.reshape(c.shape)


def adjust(W_A, W_F, U, p: SafeDeltaParams):
    """Steps 3 and 4 on one layer: returns the new weight and the keep mask."""
    import torch

    W = W_A.float().clone()
    W_F = W_F.float()
    rows, cols = W.shape
    kept = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, p.blocksize):
        i2 = min(i1 + p.blocksize, cols)
        W1, F1 = W[:, i1:i2].clone(), W_F[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        mask = keep_mask(F1 - W1, d, p.s, rows, p.exclude)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for j1 in range(0, i2 - i1, p.sub_block):
            j2 = min(j1 + p.sub_block, i2 - i1)
            w = W1[:, j1:j2]
            q = torch.where(mask[:, j1:j2], F1[:, j1:j2], w)
            err = (w - q) / d[j1:j2].unsqueeze(0)
            W1[:, j2:] -= err @ U1[j1:j2, j2:]
            Q1[:, j1:j2], Err1[:, j1:j2] = q, err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        kept[:, i1:i2] = mask
    return W, kept


@register_defense("safe_delta")
class SafeDelta(Defense):
    """Keep the fine-tuning delta within a per-layer safety budget, with OBS compensation (Lu et al., ICML 2025)."""

    Params = SafeDeltaParams
    needs = ("calibration_pairs",)
    reads = ()  # its safety pairs key it through cache_inputs
    curve = {"s": [0.01, 0.11, 1.0, 10.0, 100.0]}  # the released default 0.11, a decade either way
    deviations = """
        None in the algorithm (blocks of 2048 columns, as the released run; the spec's 1024 was an
        error). The safety set is the testbed's calibration pairs (harmful prompts with refusals).
        On the embedded testbed (a 576-wide model, SmolLM2-135M) its task metric is 0 at the released
        default s = 0.11 and below, and 66% (of the attacked model's 84%) from s = 1 up, with 2.7%
        harmful: the method's own behaviour at this width, not a fault of this implementation (every
        rule is tested against a hand computation); the budget's constants (s, rows / 4096) were set
        for the 4096-wide Llama models of the paper.
    """

    def cache_inputs(self, ctx: DefenseContext) -> dict:
        from bench.hashing import hash_value

        return {"calibration_pairs": hash_value(ctx.calibration_pairs[: self.params.max_examples])}

    def apply(self, ctx: DefenseContext) -> DefenseOutput:
        import torch

        from defenses.weights import state

        p: SafeDeltaParams = self.params
        pairs = ctx.calibration_pairs[: p.max_examples]
        if not pairs:
            raise UserError("safe_delta needs a safety set (harmful prompts with refusals), and it is empty")
        tok = ctx.tokenizer()
        tok.padding_side = "left"
        texts = [models.render_prompt(tok, r["prompt"]) + r["response"] + models.end_of_turn(tok) for r in pairs]
        batches = [
            tok(texts[i : i + p.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            for i in range(0, len(texts), p.batch_size)
        ]
        t0 = time.perf_counter()
        model = ctx.load("aligned")
        F = state(ctx.finetuned)
        stats = {"layers": 0, "kept": 0, "entries": 0}
        seconds = {"load": time.perf_counter() - t0, "hessians": 0.0, "obs": 0.0}  # where apply's time goes

        def visit(index, layer, feed, current):
            prefix = f"{models.layers_prefix(model)}{index}."
            linears = {prefix + n + ".weight": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            # theta_F's tensors are read to the CPU: each goes to its layer's device for the comparison and the OBS
            fine_tuned = {w: F[w].to(m.weight.device) for w, m in linears.items() if w in F}
            linears = {
                w: m
                for w, m in linears.items()
                if w in fine_tuned and not torch.equal(fine_tuned[w], m.weight.data.float())
            }
            hessians = {w: Hessian(m.in_features, m.weight.device) for w, m in linears.items()}

            def hook(module, args, w):
                hessians[w].add(real_tokens(args[0], current), sequences=args[0].shape[0] if args[0].dim() == 3 else 1)

            hooks = [m.register_forward_pre_hook(lambda mod, args, w=w: hook(mod, args, w)) for w, m in linears.items()]
            t0 = time.perf_counter()
            feed()
            seconds["hessians"] += time.perf_counter() - t0
            for h in hooks:
                h.remove()
            t0 = time.perf_counter()
            for w, m in linears.items():
                U = inverse_cholesky_upper(hessians[w].H, p.percdamp)
                new, kept = adjust(m.weight.data, fine_tuned[w], U, p)
                m.weight.data.copy_(new.to(m.weight.dtype))
                stats["layers"] += 1
                stats["kept"] += int(kept.sum())
                stats["entries"] += int(F[w].numel())
            seconds["obs"] += time.perf_counter() - t0

        walk_layers(model, batches, visit)
        seconds = {k: round(v, 2) for k, v in seconds.items()}
        return DefenseOutput(model=model, info=stats | {"s": p.s, "examples": len(pairs), "seconds": seconds})
