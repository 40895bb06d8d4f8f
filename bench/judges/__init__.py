"""Judges label answers to harmful prompts: 'harmful', 'safe' or 'unknown', batch-first.

    judge = JUDGES.get("keyword")()
    verdicts = judge.label(prompts, answers)     # list[Verdict], raw judge output kept

An LLM judge (Llama Guard, ShieldLM, the HarmBench classifier) implements the same `label` as one
batched generation; it is chosen at run time with `--judge NAME`, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bench.registry import Registry

LABELS = ("harmful", "safe", "unknown")


@dataclass(frozen=True)
class Verdict:
    label: str  # one of LABELS
    refusal: bool  # did the answer refuse (used for over-refusal on harmless prompts)
    raw: str  # what the judge itself said (matched phrase, model output, ...)


class Judge(Protocol):
    name: str

    def label(self, prompts: list[str], answers: list[str]) -> list[Verdict]: ...


JUDGES = Registry("judge", entry_point_group="realign.judges")
JUDGES.register_lazy("keyword", "bench.judges.keyword:KeywordJudge")
