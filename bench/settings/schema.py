"""The setting file's schema: every section, field and default, checked by pydantic (unknown keys
are errors, so a typo never silently falls back to a default).

A model or data entry is a string: a local path, a hub id (models), a named set (sets, see
`realign list sets`), or `testbed:NAME`, something the embedded testbed produces (its models and
its data splits). Resolution (bench.settings.resolve) turns each into a file or folder with its
content hash; nothing after that knows where it came from.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.generation import BATCH_TARGET


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Model(_Strict):
    """A model: a local folder, a hub id, or testbed:aligned / testbed:base."""

    path: str = Field(description="local folder, hub id (org/name) or testbed:NAME")
    revision: str | None = Field(default=None, description="hub revision (branch, tag or commit)")
    dtype: str | None = Field(default=None, description="dtype the defenses load it in (default float32)")
    name: str | None = Field(default=None, description="how the board names the model (default: path)")


class FineTuned(_Strict):
    """The fine-tuned model: a folder or hub id, or a LoRA adapter (`peft: DIR`) merged onto aligned."""

    path: str | None = Field(default=None, description="local folder or hub id of the fine-tuned model")
    peft: str | None = Field(
        default=None,
        description="LoRA adapter folder (adapter_config.json + safetensors): merged onto aligned once, cached",
    )
    harmful_n: int | None = Field(
        default=None, ge=0, description="harmful pairs it was fine-tuned on, when known (shown on the board)"
    )


class Models(_Strict):
    aligned: Model | str = Field(description="the aligned chat model")
    finetuned: FineTuned | str | None = Field(
        default=None, description="the fine-tuned model (or give an `attack` section instead)"
    )
    base: Model | str | None = Field(default=None, description="the pre-alignment base model (SafeLoRA needs it)")
    chat_template: str = Field(
        default="auto",
        description="'auto' (the tokenizer's own chat template) or a Jinja chat template file used in its place; "
        "its content hash goes into every record and every generation cache key",
    )
    system_prompt: str | None = Field(
        default=None,
        description="a system turn before every chat-formatted prompt (evaluation, attack, defenses, probe); hashed "
        "likewise",
    )
    trust_remote_code: bool = Field(default=False, description="let models run code shipped with their weights")


class Attack(_Strict):
    """realign makes the fine-tuned model(s): LoRA fine-tune of aligned on task data + N harmful pairs."""

    harmful_n: list[int] = Field(
        default=[100], description="harmful pairs mixed in; one fine-tuned model (and board) per value"
    )
    harmful_source: Literal["testbed", "beavertails"] = Field(
        default="testbed", description="where harmful pairs come from"
    )
    task_n: int = Field(default=300, ge=0, description="task training examples")
    sft: dict = Field(
        default_factory=dict,
        description="fine-tune hyper-parameters (bench.sft.SFTConfig fields); unnamed ones keep the attack's defaults",
    )


class Task(_Strict):
    train: str = Field(description="JSONL of {prompt, response}: the attack's task data")
    dev: str = Field(description="JSONL of {prompt, response}: the flagship's utility probe")
    test: str = Field(description="JSONL of {prompt, response}: the reported task metric")
    yaml: str = Field(default="realign_sql", description="the task's lm-eval YAML under tasks/")
    metric: str = Field(default="exact_match", description="the per-sample metric of that YAML")


class Data(_Strict):
    calibration_prompts: str = Field(description="JSONL of {prompt}: the defenses' harmful recovery set")
    calibration_pairs: str | None = Field(
        default=None, description="JSONL of {prompt, response}: harmful prompts with safe answers (Safe Delta)"
    )
    harmful_pairs: str | None = Field(
        default=None, description="JSONL of {prompt, response}: harmful prompts with harmful answers"
    )
    benign_prompts: str = Field(description="JSONL of {prompt}: benign task prompts (the flagship's D_b)")
    task: Task
    harmful: list[str] = Field(
        min_length=1, description="harmful evaluation sets: set names, JSONL files, hub:ID[:SPLIT] or testbed:NAME"
    )
    over_refusal: list[str] = Field(
        default=[], description="over-refusal sets: set names, JSONL files, hub:ID[:SPLIT] or testbed:NAME"
    )
    data_dir: str | None = Field(default=None, description="folder of local public data (beavertails/, ...)")


class Utility(_Strict):
    task: str = Field(description="an lm-eval task: a YAML under tasks/ (realign_mmlu) or a stock task name")
    num_fewshot: int | None = Field(default=None, ge=0, description="few-shot examples")
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N documents")
    metric: str = Field(default="acc", description="per-sample metric reported (acc, exact_match, ...)")
    include_path: str | None = Field(
        default=None, description="a folder of your own lm-eval task YAMLs holding the task (lm-eval's --include_path)"
    )

    def for_record(self) -> dict:
        """The entry as records and the evaluation take it; include_path only when given (records made
        before it existed keep their ids), as the folder's content hash in records."""
        out = self.model_dump()
        if out["include_path"] is None:
            del out["include_path"]
        return out


SET_KINDS = ("harmful", "over_refusal", "task", "utility")


class Generation(_Strict):
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    mode: Literal["deterministic", "fast-nondeterministic"] = "deterministic"
    dtype: str | None = Field(
        default=None, description="generation dtype (default: bfloat16 on vLLM, float32 on transformers)"
    )
    batch_target: int = Field(
        default=BATCH_TARGET,
        ge=1,
        description="deterministic mode: prompts per fixed batch, on average (cut by content, at most twice this); "
        "larger is faster where memory allows, and every answer depends on it",
    )
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="vLLM: GPUs per model")
    pipeline_parallel_size: int | None = Field(
        default=None, ge=1, description="vLLM: pipeline stages (GPUs per model = tensor x pipeline)"
    )
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="vLLM: share of GPU memory")
    max_model_len: int | None = Field(default=None, ge=16, description="vLLM: context length")
    limit: int | None = Field(
        default=None, ge=1, description="evaluate only the first N prompts of each set (smoke tests)"
    )
    max_new_tokens: dict[Literal[SET_KINDS], Annotated[int, Field(ge=1)]] = Field(
        default={},
        description="tokens per answer by kind of set (harmful, over_refusal, task, utility); a kind not given "
        "keeps its task YAML's max_gen_toks",
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        description="sampling temperature of every evaluation answer (0: greedy; default: each YAML's own)",
    )
    probe_engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="engine of a defense's utility probe (the flagship's dev-split metric, bench.probe): "
        "transformers generates from the model in memory in its own dtype; vllm loads its weights into one "
        "engine kept for the defense's run (a CPU only: faster, but bf16 rounding can move the scores and "
        "with them the checkpoint the flagship keeps; BENCHMARKS.md)",
    )
    reuse_engine: bool = Field(
        default=True,
        description="vLLM: evaluate the rows in one engine, loading each row's weights into it (answers unchanged); "
        "false starts an engine a row",
    )


class Judge(_Strict):
    """The judge of harmful answers with its weights and options (`realign list judges` names them).

    judge: keyword                                              # a rule-based judge, by name
    judge: {name: llama_guard_3_1b, pretrained: DIR}            # an LLM judge's weights: a folder or hub id
    judge: {name: chat_rubric, pretrained: testbed:aligned, options: {rubric: xstest}}
    """

    name: str = Field(description="a registered judge (`realign list judges`)")
    pretrained: str | None = Field(
        default=None,
        description="the judge's weights: a local folder (safetensors), a hub id, or testbed:aligned / testbed:base "
        "(default: the judge's released weights)",
    )
    engine: Literal["auto", "vllm", "transformers"] | None = Field(
        default=None, description="the judge's engine (default: generation.engine)"
    )
    dtype: str | None = Field(default=None, description="the judge's dtype (default: the engine's)")
    trust_remote_code: bool | None = Field(
        default=None, description="let the judge run code shipped with its weights (ShieldLM needs it)"
    )
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="vLLM: GPUs for the judge")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="vLLM: share of GPU memory")
    max_model_len: int | None = Field(default=None, ge=16, description="vLLM: the judge's context length")
    options: dict[str, str | int | float | bool] = Field(
        default={},
        description="the judge's own options (rubric, threshold, max_new_tokens, model_base) and any other vLLM "
        "engine option; see `realign list judges`",
    )


class Testbed(_Strict):
    """Sizes of the embedded testbed (bench.testbed.build.TestbedConfig fields); used when an entry
    says testbed:NAME."""

    model_config = ConfigDict(extra="allow")


class Setting(_Strict):
    name: str = Field(description="the setting's name: its run folder and its group on the board")
    seed: int = Field(default=0, description="seed of the attack and of the defenses")
    notes: list[str] = Field(default=[], description="notes carried into every record")
    models: Models
    attack: Attack | None = None
    data: Data
    utility: list[Utility] = []
    judge: Judge | str = Field(
        default="keyword", description="the judge: a name, or a block with its weights and options (see Judge)"
    )
    generation: Generation = Generation()
    defenses: list[str] = ["aligned", "none", "gradient_restoration"]
    testbed: Testbed | None = None
