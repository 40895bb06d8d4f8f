"""The spec's pure rules (shared specs/gradient_restoration.md), each a function of its inputs."""

from __future__ import annotations

from bench import models

# spec: Known quirks. The released code's choice of each (faithful) and the fixed one (clean).
FAITHFUL = {
    "rate_denominator": "all_layers",
    "grad_accumulation": "cumulative",
    "batches": "zip",
    "ties": "strict",
    "comparison": "mixed",
}
CLEAN = {
    "rate_denominator": "candidates",
    "grad_accumulation": "fresh",
    "batches": "all",
    "ties": "inclusive",
    "comparison": "strict",
}
CHOICES = {k: {FAITHFUL[k], CLEAN[k]} for k in FAITHFUL}


def probe_layers(num_layers: int) -> int:
    """spec: Probe. E = floor(2L/3): Llama-2-7B 21 of 32, Gemma-2B 12 of 18."""
    return (2 * num_layers) // 3


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """spec: Inputs. Chat template with the assistant header, tokenized without extra special tokens."""
    return [tokenizer(models.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def batches_of(tokenizer, prompts: list[str], batch_size: int) -> list[dict]:
    """spec: Inputs. Batches as the released code makes them: LEFT padding to the longest prompt of the batch."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        text = [models.render_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        out.append(tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False))
    return out


def score(diff, grad):
    """spec: Candidates, sign agreement. |grad| where diff = theta - T and grad share a STRICT sign (copying T
    then moves the weight along -grad), else 0; a zero diff or a zero gradient never qualifies.
    sign(diff) * grad is exactly |grad| where the signs agree and <= 0 elsewhere, so its positive
    part is the score."""
    import torch

    return torch.mul(torch.sign(diff), grad).clamp_min_(0.0)


def kth_largest(values, k: int) -> float:
    """spec: Candidates, threshold tau. The k-th largest value (a selection, not a sort: a top-k of a million
    values is ~10x slower)."""
    import torch

    return float(torch.kthvalue(values, values.numel() - k + 1).values)


def choose_checkpoint(scores: dict[int, float], fails) -> int | None:
    """spec: Schedule, final model. Checkpoints in step order; stop at the first that fails; answer the one
    before it. None fails -> the last; the first fails -> None (no recovered model)."""
    previous = None
    for step in sorted(scores):
        if fails(scores[step]):
            return previous
        previous = step
    return previous
