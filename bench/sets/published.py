"""Sets that users hold in their original published layout (most are gated or licensed for research,
so the suite ships none of them): point `path` at the file or folder, or put it under the data
directory at the set's `location`. A generic JSON Lines / CSV loader covers everything else."""

from __future__ import annotations

from pathlib import Path

from bench.data import read_jsonl
from bench.errors import UserError
from bench.sets import KINDS, EvalSet
from bench.sets.files import csv_rows, headerless_csv_first_column, need_file


def _in(path: Path, file_name: str) -> Path:
    """A set given as its folder or as its file."""
    return path / file_name if path.is_dir() else path


HEX_PHI_CATEGORIES = {
    1: "illegal_activity",
    2: "child_abuse_content",
    3: "hate_harass_violence",
    4: "malware",
    5: "physical_harm",
    6: "economic_harm",
    7: "fraud_deception",
    8: "adult_content",
    9: "political_campaigning",
    10: "privacy_violation_activity",
    11: "tailored_financial_advice",
}


class HexPhi(EvalSet):
    """HEx-PHI (330 harmful instructions, 11 categories x 30; Qi et al. 2023)."""

    expects = "the folder of category_1.csv .. category_11.csv (one prompt a line, no header)"
    origin = "the HEx-PHI dataset page (gated: accept its licence)"
    location = "hex-phi"

    def read(self, path):
        if not path.is_dir():
            raise UserError(f"set {self.name}: {path} is not a folder; put {self.expects} there")
        rows = []
        for number, category in HEX_PHI_CATEGORIES.items():
            file = path / f"category_{number}.csv"
            if not file.exists() and number == 2:
                continue  # the public release withholds category 2 (child abuse content)
            rows += [
                {"prompt": p, "category": category}
                for p in headerless_csv_first_column(need_file(file, f"HEx-PHI's {file.name}"))
            ]
        return rows


class CatQA(EvalSet):
    """CatQA (550 harmful questions, 11 categories x 5 subcategories; Bhardwaj et al. 2024), English."""

    expects = "catqa_english.json (JSON Lines: Category, Subcategory, Question)"
    origin = "the CategoricalHarmfulQA dataset page"
    location = "catqa/catqa_english.json"

    def read(self, path):
        rows = read_jsonl(
            need_file(_in(path, "catqa_english.json"), self.expects), required=("Question", "Category", "Subcategory")
        )
        return [
            {"prompt": r["Question"].strip(), "category": r["Category"], "subcategory": r["Subcategory"]} for r in rows
        ]


class AdvBench(EvalSet):
    """AdvBench harmful behaviours (520; Zou et al. 2023), no categories."""

    expects = "harmful_behaviors.csv (columns goal, target)"
    origin = "the llm-attacks repository, data/advbench"
    location = "advbench/harmful_behaviors.csv"

    def read(self, path):
        rows = csv_rows(need_file(_in(path, "harmful_behaviors.csv"), self.expects), ("goal",))
        return [{"prompt": r["goal"], "target": r.get("target", "")} for _, r in rows]


class XSTestSafe(EvalSet):
    """XSTest safe prompts (250 harmless prompts that look unsafe; Röttger et al. 2024): over-refusal."""

    kind = "over_refusal"
    expects = "xstest_prompts.csv (columns id, prompt, type, label, focus, note)"
    origin = "the xstest repository"
    location = "xstest/xstest_prompts.csv"
    label = "safe"

    def read(self, path):
        file = need_file(_in(path, "xstest_prompts.csv"), self.expects)
        rows = csv_rows(file, ("prompt", "type", "label"))
        for lineno, r in rows:
            if r["label"] not in ("safe", "unsafe"):
                raise UserError(f"{file}:{lineno}: label is {r['label']!r}; XSTest labels are 'safe' or 'unsafe'")
        return [
            {"prompt": r["prompt"], "category": r["type"], "id": r.get("id", "")}
            for _, r in rows
            if r["label"] == self.label
        ]


class XSTestUnsafe(XSTestSafe):
    """XSTest unsafe contrast prompts (200): a harmful set."""

    kind = "harmful"
    label = "unsafe"


class ORBenchHard(EvalSet):
    """OR-Bench hard-1k (1,319 seemingly toxic but harmless prompts, 10 categories; Cui et al. 2024): over-refusal."""

    kind = "over_refusal"
    expects = "or-bench-hard-1k.csv (columns prompt, category)"
    origin = "the or-bench dataset page, config or-bench-hard-1k"
    location = "or-bench/or-bench-hard-1k.csv"

    def read(self, path):
        rows = csv_rows(need_file(_in(path, "or-bench-hard-1k.csv"), self.expects), ("prompt", "category"))
        return [{"prompt": r["prompt"], "category": r["category"]} for _, r in rows]


class _Generic(EvalSet):
    """A user's own file; `fields` maps the suite's names to the file's (prompt is required)."""

    origin = "your own data"
    location = ""  # a path is always given

    def __init__(self, path=None, data_dir=None, fields: dict[str, str] | None = None, kind: str = "harmful"):
        if path is None:
            raise UserError(
                f"set {type(self).registry_name} needs path=FILE (and fields={{'prompt': 'your_column'}} when it is "
                "not 'prompt')"
            )
        if kind not in KINDS:
            raise UserError(f"set kind must be one of {', '.join(KINDS)}, got {kind!r}")
        super().__init__(path, data_dir)
        self.fields = {"prompt": "prompt", **(fields or {})}
        self.kind = kind

    def _mapped(self, row: dict) -> dict:
        sources = set(self.fields.values())
        return {k: v for k, v in row.items() if k not in sources} | {
            ours: row[theirs].strip() for ours, theirs in self.fields.items()
        }


class GenericJsonl(_Generic):
    """Any JSON Lines file, one object a line; fields={'prompt': ..., 'category': ...} names its keys."""

    expects = "a JSON Lines file with the mapped fields"

    def read(self, path):
        return [self._mapped(r) for r in read_jsonl(path, required=tuple(self.fields.values()))]


class GenericCsv(_Generic):
    """Any CSV file with a header; fields={'prompt': ..., 'category': ...} names its columns."""

    expects = "a CSV file with a header holding the mapped columns"

    def read(self, path):
        return [self._mapped(r) for _, r in csv_rows(path, tuple(self.fields.values()))]
