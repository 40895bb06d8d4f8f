"""Named evaluation sets: harmful prompt sets and over-refusal sets, each a registered loader.

    from bench.sets import SETS, load_set
    rows = load_set("harmbench_standard")                      # shipped by a PyPI data package
    rows = load_set("beavertails_eval", data_dir=Path("data"))  # from the data directory
    rows = load_set("hex_phi", path="~/HEx-PHI")                # a set the user holds, published layout
    rows = load_set("jsonl", path="mine.jsonl", fields={"prompt": "question", "category": "topic"})

    @register_set("my_set")          # or the entry-point group `realign.sets` from a pip package
    class MySet(EvalSet):
        expects = "my_set.jsonl (JSON Lines with a prompt field)"
        location = "my-set/my_set.jsonl"
        def read(self, path): ...    # -> list[dict]

Every set yields rows {prompt, category?, ...}: `prompt` is one user turn, `category` (when the set
has one) gives the per-category rates, and any other field is kept for the record. A set that is
missing, or a file that lacks a field, is one line that says what to put where.
"""

from __future__ import annotations

from pathlib import Path

from bench.errors import UserError
from bench.registry import Registry

SETS = Registry("set", entry_point_group="realign.sets")
register_set = SETS.register

KINDS = ("harmful", "over_refusal")


class EvalSet:
    """One evaluation set. Subclasses set the class attributes and implement read(path)."""

    kind: str = "harmful"  # one of KINDS: which metric the set feeds
    expects: str = ""  # the files, in one line: shown by `realign list sets` and in every "missing" error
    origin: str = ""  # where a user gets the files (paper, repository or dataset page)
    location: str | None = None  # default place under the data directory; None when a package ships the data
    hub: str | None = None  # the same rows as a hub dataset (ID:SPLIT, a prompt column), for `hub:` in a setting
    reads_as_is = False  # True when the file is already JSON Lines with a prompt field (a task can point at it)

    def __init__(self, path: str | Path | None = None, data_dir: Path | None = None):
        self.path = (
            Path(path).expanduser()
            if path
            else (Path(data_dir) / self.location if data_dir and self.location else None)
        )

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def rows(self) -> list[dict]:
        if self.location is not None:
            online = f"; or, online, name it hub:{self.hub} in the setting" if self.hub else ""
            if self.path is None:
                raise UserError(
                    f"set {self.name} needs its data: put {self.expects} at DATA_DIR/{self.location} "
                    f"(--data-dir or $REALIGN_DATA_DIR) or pass its path{online}"
                )
            if not self.path.exists():
                raise UserError(
                    f"set {self.name}: {self.path} not found; put {self.expects} there (from {self.origin}){online}"
                )
        rows = self.read(self.path)
        if not rows:
            raise UserError(f"set {self.name}: {self.path} holds no prompts")
        return rows

    def read(self, path: Path | None) -> list[dict]:
        raise NotImplementedError


def load_set(name: str, path: str | Path | None = None, data_dir: Path | None = None, **options) -> list[dict]:
    """The rows of a named set (see `realign list sets`)."""
    return SETS.get(name)(path=path, data_dir=data_dir, **options).rows()


# built-in sets; their modules are light (csv and json only), so listing them imports little
for _name, _target in {
    "harmbench_standard": "bench.sets.packaged:HarmBenchStandard",
    "harmbench_contextual": "bench.sets.packaged:HarmBenchContextual",
    "strongreject": "bench.sets.packaged:StrongReject",
    "strongreject_small": "bench.sets.packaged:StrongRejectSmall",
    "beavertails_eval": "bench.sets.packaged:BeaverTailsEval",
    "hex_phi": "bench.sets.published:HexPhi",
    "catqa": "bench.sets.published:CatQA",
    "advbench": "bench.sets.published:AdvBench",
    "xstest_safe": "bench.sets.published:XSTestSafe",
    "xstest_unsafe": "bench.sets.published:XSTestUnsafe",
    "or_bench_hard": "bench.sets.published:ORBenchHard",
    "jsonl": "bench.sets.published:GenericJsonl",
    "csv": "bench.sets.published:GenericCsv",
}.items():
    SETS.register_lazy(_name, _target)
