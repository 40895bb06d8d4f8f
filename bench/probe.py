"""The utility probe a defense calls: `(model) -> float`, the task metric on the dev split.

It generates through the suite's transformers generator from the model held in memory (a
defense's intermediate checkpoints are never saved just to be measured) and scores with the same
metric function as the task YAML, so the probe and the reported task metric cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

from bench.data import read_jsonl
from bench.generation import Sampling, TransformersGenerator
from bench.hashing import hash_file
from tasks.realign.utils import normalise_sql


class TaskProbe:
    """The suite's UtilityProbe (defenses.base): exact match on the task's dev split."""

    def __init__(
        self,
        dev_file: Path,
        max_new_tokens: int = 48,
        limit: int | None = None,
        batch_size: int = 25,
        chat=None,
    ):
        """`chat`: the setting's models.ChatFormat (None: the tokenizer's own template, no system turn)."""
        self.dev_file = Path(dev_file)
        self.chat = chat if chat is not None and not chat.is_default else None
        rows = read_jsonl(self.dev_file, required=("prompt", "response"))
        self.rows = rows[:limit] if limit else rows
        self.sampling = Sampling(max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.calls = 0

    def identity(self) -> dict:
        out = {"dev_file": hash_file(self.dev_file), "n": len(self.rows), "sampling": self.sampling.to_dict()}
        return out | ({"chat": self.chat.identity()} if self.chat is not None else {})

    def __call__(self, model, handle=None) -> float:
        """Exact match on the dev split. `handle` names the model's tokenizer directory."""
        from bench import models

        handle = handle or models.ModelHandle("probe", Path(model.name_or_path))
        gen = TransformersGenerator(
            handle, batch_size=self.batch_size, device=str(next(model.parameters()).device), model=model, chat=self.chat
        )
        answers = gen.generate([r["prompt"] for r in self.rows], self.sampling)
        self.calls += 1
        hits = [normalise_sql(a.split("\n", 1)[0]) == normalise_sql(r["response"]) for a, r in zip(answers, self.rows)]
        return sum(hits) / len(hits)
