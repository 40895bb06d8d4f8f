"""One vLLM engine for many board rows: each row's weights are loaded into the live engine in place.

The rows of a setting (every defense of it) share an architecture and a tokenizer, and starting
vLLM costs 25-30 s on the embedded model on a CPU (minutes for a 7-8 B model on a GPU), against a
second or so to load a small model's weights. So the pool keeps ONE live engine. A row whose
engine key matches the live engine's gets that engine with the row's own weights swapped in
through vLLM's own in-place reload (the worker's `reload_weights`, reached with
`LLM.collective_rpc`, as RLHF trainers sync weights between rollouts), and the prefix cache is
emptied: its KV was computed with the old weights. A row with another key closes the live engine
and starts its own (one engine at a time: on a GPU two would not fit).

The key is what must match for a reload to equal a fresh start:
- config.json (the architecture);
- every other non-weight file: generation_config.json (vLLM's stop tokens), the tokenizer files
  (the engine detokenizes with the tokenizer it started with), the chat template;
  fields no engine reads (where a file was saved from, a tokenizer's padding state) aside;
- the weights' tensor names and shapes (a reload that misses a tensor keeps the old row's value
  with only a warning, where a fresh load fails);
- every engine option (dtype, max_model_len, tensor parallel size, eager, mode, remote code).

Nothing about the cache changes: a row's answers keep the row's identity (its model content,
bench.generation.identity); tests/test_engine_reuse.py checks that they equal a fresh engine's.

Where reloading cannot be used (a vLLM without `reload_weights`, a reload that fails, the
transformers engine, which has no engine start to save) the pool falls back to one engine a row
and says so once.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

from bench import models, reproducibility
from bench.hashing import hash_file, hash_value

# fields that say only where, and by which library version, a file was saved
_SAVED_FROM = {
    "config.json": ("_name_or_path", "transformers_version"),
    "generation_config.json": ("transformers_version",),
    "tokenizer_config.json": ("name_or_path", "is_local", "local_files_only"),
}
# those, and how a tokenizer pads and truncates a batch: never read by an engine that gets token ids
# and only detokenizes (a tokenizer saved after padding was switched on carries its padding state in
# tokenizer.json; rows must not split on that)
_NOT_READ = _SAVED_FROM | {
    "tokenizer.json": ("padding", "truncation"),
    "tokenizer_config.json": _SAVED_FROM["tokenizer_config.json"] + ("padding_side", "truncation_side"),
}


def tensor_layout(model_dir: Path) -> dict[str, list]:
    """{tensor name: [dtype, shape]} over the directory's safetensors files, read from their headers
    (no weights are loaded); by name, whatever the sharding."""
    from safetensors import safe_open

    layout: dict[str, list] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                part = weights.get_slice(name)
                layout[name] = [part.get_dtype(), list(part.get_shape())]
    return layout


def side_file_hashes(model_dir: Path, ignored: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The hash of each file of a model folder besides its weights (config, generation config,
    tokenizer files, chat template, a shard index), the `ignored` fields of a JSON file left out.
    Not the hash memo (a dot file), not a model card (.md: nothing reads it)."""
    files: dict[str, str] = {}
    for path in sorted(Path(model_dir).iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name.endswith((".safetensors", ".md")):
            continue
        if name in ignored:
            fields = json.loads(path.read_text())
            files[name] = hash_value({k: v for k, v in fields.items() if k not in ignored[name]})
        else:
            files[name] = hash_file(path)
    return files


def engine_key(handle: models.ModelHandle, dtype: str, options: dict) -> str:
    """The hash of everything two models must share for one engine to serve both (module docstring)."""
    files = side_file_hashes(handle.path, _NOT_READ)  # the weights' layout is keyed below
    return hash_value({"files": files, "tensors": tensor_layout(handle.path), "dtype": dtype, "options": options})


KEPT_TOKENIZERS = 4  # tokenizers an EnginePool keeps for its later rows (EnginePool.tokenizer)


class EnginePool:
    """Hands out vLLM generators that share one live engine (see the module docstring): a
    CachedGenerator given `pool=` starts the engine for its first model and reloads the weights of
    the next one into it; pool.close() shuts it down."""

    def __init__(self):
        self._llm = None
        self._key: str | None = None
        self._weights: str | None = None  # content hash of the model whose weights the engine holds
        self.reload_works = True  # False after a failed reload: one engine a row from then on
        self._said: set[str] = set()
        self.stats = {"engine_starts": 0, "reloads": 0, "reload_s": 0.0}
        self.last: str | None = None  # how the latest generator got its engine: started, reloaded or kept
        self._tokenizers: OrderedDict[str, object] = OrderedDict()  # self.tokenizer's, by key, the latest last

    def tokenizer(self, handle: models.ModelHandle, trust_remote_code: bool = False, chat=None):
        """The row's tokenizer with the chat format applied (models.load_tokenizer): the one an earlier
        row of this pool got, when both models' non-weight files are the same (where and by which
        library version they were saved aside) and the chat format is too, else loaded (the pool
        keeps the KEPT_TOKENIZERS latest). The rows of a board have one or two sets of tokenizer
        files (a defense that saved its tokenizer with padding switched on has its padding state in
        tokenizer.json), and loading them costs ~0.3 s a row on the embedded model; nothing that
        generates, scores or renders with a tokenizer changes it after load_tokenizer, so one object
        serves them all."""
        key = hash_value(
            {
                "files": side_file_hashes(handle.path, _SAVED_FROM),
                "trust_remote_code": trust_remote_code,
                "chat": None if chat is None else chat.identity(),
            }
        )
        if key in self._tokenizers:
            self._tokenizers.move_to_end(key)
        else:
            self._tokenizers[key] = models.load_tokenizer(handle, trust_remote_code, chat)
            while len(self._tokenizers) > KEPT_TOKENIZERS:
                self._tokenizers.popitem(last=False)
        return self._tokenizers[key]

    def say_once(self, reason: str) -> None:
        """The fallback to one engine a row, said once per pool (and once per reason)."""
        if reason not in self._said:
            self._said.add(reason)
            print(f"realign: engine reuse off: {reason}; one engine a row", file=sys.stderr)

    def vllm_generator(
        self,
        handle: models.ModelHandle,
        dtype: str,
        trust_remote_code: bool = False,
        mode: str = reproducibility.DETERMINISTIC,
        **options,
    ):
        """A VLLMGenerator for `handle` on the live engine (its weights reloaded when another row's
        are in it), or on a new engine when the key differs or reloading does not work."""
        from bench.generation import VLLMGenerator, start_vllm

        # the chat format shapes the token ids the generator sends, never the engine: not in the key
        chat = options.pop("chat", None)
        tokenizer = options.pop("tokenizer", None)  # the row's own, already loaded; not the engine's either
        key = engine_key(handle, dtype, {"trust_remote_code": trust_remote_code, "mode": mode} | options)
        weights = handle.content_hash()
        if self._llm is not None and (key != self._key or (weights != self._weights and not self.reload_works)):
            self.close()
        self.last = "kept"
        if self._llm is not None and weights != self._weights:
            self.last = "reloaded"
            try:
                self._reload(handle)
            except Exception as exc:  # an engine half-reloaded is never used again: start afresh
                self.reload_works = False
                self.say_once(f"vLLM could not reload weights in place ({type(exc).__name__}: {str(exc)[:160]})")
                self.close()
        if self._llm is None:
            self._llm = start_vllm(handle, dtype, trust_remote_code, mode=mode, **options)
            self._key, self._weights = key, weights
            self.stats["engine_starts"] += 1
            self.last = "started"
        return VLLMGenerator(
            handle, dtype, trust_remote_code, mode=mode, chat=chat, llm=self._llm, tokenizer=tokenizer, **options
        )

    def _reload(self, handle: models.ModelHandle) -> None:
        from bench.generation import load_weights_in_place

        t0 = time.perf_counter()
        load_weights_in_place(self._llm, weights_path=str(handle.path))  # a failure closes the engine
        self._weights = handle.content_hash()
        self.stats["reloads"] += 1
        self.stats["reload_s"] = round(self.stats["reload_s"] + time.perf_counter() - t0, 2)

    def close(self) -> None:
        """Shut the live engine down (idempotent)."""
        from bench.generation import shutdown_vllm

        llm, self._llm, self._key, self._weights = self._llm, None, None, None
        if llm is not None:
            shutdown_vllm(llm)
            del llm  # the last reference: an LLM judge or the next engine gets the GPU's memory
            models.release_device_memory()


_shared: EnginePool | None = None
_lock = threading.Lock()


def shared() -> EnginePool:
    """This process's pool (bench.evaluate uses it when the runner asks for engine reuse); its engine
    is shut down when the process exits."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = EnginePool()
            atexit.register(_shared.close)
        return _shared


def judge_needs_the_device(judge) -> bool:
    """Whether a judge starts an engine of its own on a GPU, where the pool's idle engine would hold
    the memory it needs (on a CPU both fit, and the pool's engine stays up)."""
    from bench.judges.llm import LLMJudge

    if not isinstance(judge, LLMJudge):
        return False
    import torch

    return torch.cuda.is_available()
