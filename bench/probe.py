"""The utility probe a defense calls: `(model) -> float`, the task metric on the dev split.

It generates from the model held in memory (a defense's intermediate checkpoints are never saved
just to be measured) and scores with the same metric function as the task YAML, so the probe and
the reported task metric cannot drift apart.

Two engines. `transformers` generates from the in-memory model itself. `vllm` starts one engine in
the probing process at the first call (from the model's tokenizer directory) and, at every call,
loads the in-memory model's weights into it in place (the worker's `reload_weights` fed a
`weights_iterator`, as RLHF trainers sync weights between rollouts; bench.engine_pool does the same
from files) and empties the prefix cache, whose KV came from the previous weights. On this CPU a
probe of the embedded model's 50 dev prompts takes ~4 s there against 11-17 s on transformers fp32
(BENCHMARKS.md, "The main job"). The engine runs in the deterministic mode (its core in-process, one
batch): the same weights give the same answers on every run.
"""

from __future__ import annotations

import atexit
from pathlib import Path

from bench.data import read_jsonl
from bench.generation import Sampling, TransformersGenerator, default_dtype
from bench.hashing import hash_file
from tasks.realign.utils import normalise_sql

PROBE_ENGINES = ("transformers", "vllm")


class TaskProbe:
    """The suite's UtilityProbe (defenses.base): exact match on the task's dev split."""

    def __init__(
        self,
        dev_file: Path,
        max_new_tokens: int = 48,
        limit: int | None = None,
        batch_size: int = 25,
        chat=None,
        engine: str = "transformers",
        dtype: str | None = None,
        max_model_len: int = 2048,
    ):
        """`chat`: the setting's models.ChatFormat (None: the tokenizer's own template, no system turn).
        `engine`: transformers or vllm (module docstring); `dtype`: vLLM's (default bfloat16;
        transformers generates in the model's own dtype); `max_model_len`: vLLM's context limit."""
        if engine not in PROBE_ENGINES:
            raise ValueError(f"probe engine {engine!r}: use one of {', '.join(PROBE_ENGINES)}")
        self.dev_file = Path(dev_file)
        self.chat = chat if chat is not None and not chat.is_default else None
        rows = read_jsonl(self.dev_file, required=("prompt", "response"))
        self.rows = rows[:limit] if limit else rows
        self.sampling = Sampling(max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.engine = engine
        self.dtype = dtype or default_dtype(engine)
        self.max_model_len = max_model_len
        self.calls = 0
        self._vllm = None  # the live engine's generator, in the process that probes (never pickled)

    def identity(self) -> dict:
        """What the probe measures. Its engine is apart (engine_identity): every defense's cache key
        names this identity, and only the defenses that call the probe depend on its engine."""
        out = {"dev_file": hash_file(self.dev_file), "n": len(self.rows), "sampling": self.sampling.to_dict()}
        return out | ({"chat": self.chat.identity()} if self.chat is not None else {})

    def engine_identity(self) -> dict:
        """The engine's part of a probing defense's key; empty for transformers (the key as it was)."""
        return {} if self.engine == "transformers" else {"engine": self.engine, "dtype": self.dtype}

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_vllm": None}

    def __call__(self, model, handle=None) -> float:
        """Exact match on the dev split. `handle` names the model's tokenizer directory."""
        answers = self.answers(model, handle)
        self.calls += 1
        hits = [normalise_sql(a.split("\n", 1)[0]) == normalise_sql(r["response"]) for a, r in zip(answers, self.rows)]
        return sum(hits) / len(hits)

    def answers(self, model, handle=None) -> list[str]:
        """The model's answers to the dev prompts, in order."""
        from bench import models

        handle = handle or models.ModelHandle("probe", Path(model.name_or_path))
        prompts = [r["prompt"] for r in self.rows]
        if self.engine == "vllm":
            return self._on_vllm(model, handle, prompts)
        gen = TransformersGenerator(
            handle, batch_size=self.batch_size, device=str(next(model.parameters()).device), model=model, chat=self.chat
        )
        return gen.generate(prompts, self.sampling)

    def _on_vllm(self, model, handle, prompts: list[str]) -> list[str]:
        import torch

        from bench.generation import VLLMGenerator, load_weights_in_place

        if self._vllm is None:
            # its own engine (deterministic mode), started from the handle's files, replaced below
            self._vllm = VLLMGenerator(handle, self.dtype, max_model_len=self.max_model_len, chat=self.chat)
            atexit.register(self.close)
        load_weights_in_place(self._vllm.llm, weights_iterator=iter(model.state_dict().items()))
        # the caller may generate under autocast (a low_memory working copy); vLLM runs its own dtype.
        # The vLLM probe runs on a CPU only (bench.settings.resolve checks it)
        with torch.autocast("cpu", enabled=False):
            return self._vllm.generate(prompts, self.sampling)

    def close(self) -> None:
        """Shut the probe's vLLM engine down (idempotent; also at exit)."""
        gen, self._vllm = self._vllm, None
        if gen is not None:
            gen.close()
