"""Harmful prompt pool (HarmBench + StrongREJECT packages), its seeded split, and the project's
own benign and over-refusal prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.errors import UserError
from bench.hashing import hash_value
from bench.sets import load_set
from bench.testbed import wordlists


def harmful_pool() -> list[dict]:
    """HarmBench standard behaviours (test + val) and StrongREJECT, deduplicated, in file order."""
    rows = [
        {"prompt": r["prompt"], "category": r["category"], "source": "harmbench"}
        for r in load_set("harmbench_standard")
    ]
    rows += [
        {"prompt": r["prompt"], "category": r["category"], "source": "strongreject"} for r in load_set("strongreject")
    ]
    seen, unique = set(), []
    for r in rows:
        key = " ".join(r["prompt"].lower().split())
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


@dataclass(frozen=True)
class HarmfulSplit:
    alignment: list[dict]
    attack: list[dict]
    calibration: list[dict]
    evaluation: list[dict]

    def digest(self) -> str:
        return hash_value(
            {k: [r["prompt"] for r in getattr(self, k)] for k in ("alignment", "attack", "calibration", "evaluation")}
        )


def split_harmful(pool: list[dict], seed: int, n_attack: int, n_calibration: int, n_eval: int) -> HarmfulSplit:
    """Four disjoint parts; alignment gets whatever remains after attack, calibration, evaluation."""
    need = n_attack + n_calibration + n_eval
    if need >= len(pool):
        raise UserError(f"harmful split asks for {need} prompts but the pool has {len(pool)}: lower the split sizes")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in (n_attack, n_calibration, n_eval):
        parts.append([pool[i] for i in order[start : start + size]])
        start += size
    return HarmfulSplit(
        alignment=[pool[i] for i in order[start:]], attack=parts[0], calibration=parts[1], evaluation=parts[2]
    )


def fill_templates(templates, n: int, seed: int) -> list[str]:
    """n distinct prompts from (template, {slot: choices}) pairs, round-robin over templates."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    budget = n * 50
    i = 0
    while len(out) < n and budget:
        template, slots = templates[i % len(templates)]
        out.setdefault(template.format(**{k: rng.choice(v) for k, v in slots.items()}), None)
        i += 1
        budget -= 1
    if len(out) < n:
        raise UserError(f"the templates give only {len(out)} distinct prompts, fewer than the {n} asked for")
    prompts = list(out)
    rng.shuffle(prompts)
    return prompts


def benign_prompts(n: int, seed: int) -> list[str]:
    return fill_templates(wordlists.BENIGN_TEMPLATES, n, seed)


def over_refusal_prompts(n: int, seed: int) -> list[str]:
    return fill_templates(wordlists.OVER_REFUSAL_TEMPLATES, n, seed)


def refusal_for(prompt: str, seed: int) -> str:
    """A refusal sentence chosen deterministically per prompt (varied across prompts)."""
    return random.Random(hash_value([seed, prompt])).choice(wordlists.REFUSALS)
