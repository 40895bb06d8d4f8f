"""Judges label answers to harmful prompts: 'harmful', 'safe' or 'unknown', batch-first.

    judge = JUDGES.get("keyword")()
    verdicts = judge.label(prompts, answers)     # list[Verdict], raw judge output kept

An LLM judge (Llama Guard, ShieldLM, the HarmBench classifier) implements the same `label` as one
batched generation; it is chosen at run time with `--judge NAME`, never hard-coded.

    @register_judge("my_judge")          # or an entry point in the group `realign.judges`
    class MyJudge:
        rule = "harmful iff ..."         # the decision rule, shown by `realign list judges`
        weights = "none"                 # what weights it needs, likewise
        def label(self, prompts, answers): ...

`bench.judges.llm` holds what every LLM judge shares (weights, one batched pass in a fresh
process, escaped prompts); each judge is one module that says its prompt format and its rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bench.errors import UserError
from bench.registry import Registry

LABELS = ("harmful", "safe", "unknown")


@dataclass(frozen=True)
class Verdict:
    label: str  # one of LABELS
    refusal: bool  # did the answer refuse (used for over-refusal on harmless prompts)
    raw: str  # what the judge itself said (matched phrase, model output, ...)
    score: float | None = None  # a judge's number behind the label (P(unsafe), StrongREJECT's score), if it has one


class Judge(Protocol):
    name: str

    def label(self, prompts: list[str], answers: list[str]) -> list[Verdict]: ...


JUDGES = Registry("judge", entry_point_group="realign.judges")
register_judge = JUDGES.register
JUDGES.register_lazy("keyword", "bench.judges.keyword:KeywordJudge")
# LLM judges: imported on first use (their modules import no torch until they run)
JUDGES.register_lazy("llama_guard_3_1b", "bench.judges.llama_guard:LlamaGuard3_1B")
JUDGES.register_lazy("llama_guard_3_8b", "bench.judges.llama_guard:LlamaGuard3_8B")
JUDGES.register_lazy("wildguard", "bench.judges.wildguard:WildGuard")
JUDGES.register_lazy("harmbench_classifier", "bench.judges.harmbench_classifier:HarmBenchClassifier")
JUDGES.register_lazy(
    "harmbench_classifier_contextual", "bench.judges.harmbench_classifier:HarmBenchClassifierContextual"
)
JUDGES.register_lazy("shieldlm", "bench.judges.shieldlm:ShieldLM")
JUDGES.register_lazy("strongreject_finetuned", "bench.judges.strongreject_finetuned:StrongRejectFinetuned")
JUDGES.register_lazy("md_judge", "bench.judges.md_judge:MDJudge")
JUDGES.register_lazy("chat_rubric", "bench.judges.chat_rubric:ChatRubric")


def make_judge(name: str, **options):
    """The judge `name`, built with `options` (pretrained=..., engine=...); a judge that takes none
    (keyword) refuses them with one line."""
    cls = JUDGES.get(name)
    options = {k: v for k, v in options.items() if v is not None}
    if options and not getattr(cls, "takes_options", False):
        raise UserError(f"judge {name!r} takes no options (got {', '.join(sorted(options))}); drop them")
    return cls(**options)
