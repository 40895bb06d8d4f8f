"""What every defense receives and returns (ARCHITECTURE.md, "Interfaces")."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol

from bench import models
from bench.errors import UserError, did_you_mean
from bench.progress import log


def option(default, help: str):
    """A Params field with its help, which `realign list` and `--help` show (peft's self-documenting configs)."""
    return field(default=default, metadata={"help": help})


def check_choice(name: str, value, choices) -> None:
    """A Params check: `value` must be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class NoParams:
    """This method has no parameters."""


class UtilityProbe(Protocol):
    """The task metric on the task's dev split, of a model held in memory: (model) -> a score in [0, 1].

    A defense that needs the task metric calls this and never evaluates by hand. `handle` names the
    model's tokenizer (a defense's working copy has no directory of its own). The suite's is
    bench.probe.TaskProbe.
    """

    def __call__(self, model: Any, handle: models.ModelHandle | None = None) -> float: ...

    def identity(self) -> dict:
        """What the probe measures (dev set hash, size, sampling): part of a defense's cache key."""
        ...


@dataclass(frozen=True)
class FineTuneSpec:
    """A supervised fine-tune a defense asks for (RESTA's un-aligned theta_U): the runner maps it onto
    the suite's training stage, cached by content like the attack."""

    lr: float
    batch_size: int
    max_steps: int
    seed: int = 0
    method: str = "lora"  # 'lora' (the adapter merged after) or 'full'
    lr_scheduler: str = "linear"  # 'linear' (decay to 0) or 'constant'


class FineTune(Protocol):
    """Fine-tune `model` on (prompt, response) `pairs` as `spec` says; returns the merged model's handle."""

    def __call__(self, model: models.ModelHandle, pairs: list[dict], spec: FineTuneSpec) -> models.ModelHandle: ...


class HarmRate(Protocol):
    """The harmful rate of saved models on the calibration prompts, generated and judged as the
    evaluation does: [model handles] -> [{rate, k, n}]. The suite's is bench.harm_probe.HarmProbe."""

    def __call__(self, handles: list[models.ModelHandle]) -> list[dict]: ...

    def identity(self) -> dict:
        """What the probe measures (prompts, judge, generation): part of a defense's cache key."""
        ...


@dataclass
class DefenseContext:
    """Inputs of a post-fine-tuning defense. Models load lazily, once."""

    aligned: models.ModelHandle
    finetuned: models.ModelHandle
    base: models.ModelHandle | None = None
    adapter: Path | None = None  # the attack's LoRA adapter, when the fine-tune was LoRA
    calibration_prompts: list[str] = field(default_factory=list)  # harmful recovery set (prompts only)
    calibration_pairs: list[dict] = field(default_factory=list)  # harmful prompts with safe answers
    harmful_pairs: list[dict] = field(default_factory=list)  # harmful prompts with harmful answers
    benign_prompts: list[str] = field(default_factory=list)  # the task's training prompts
    utility_probe: UtilityProbe | None = None  # the task metric on the dev split: (model) -> float
    fine_tune: FineTune | None = None  # the suite's training stage, for defenses that train a model of their own
    harm_probe: HarmRate | None = None  # harmful rate of saved models on the calibration prompts
    attack: dict | None = None  # the attack's configuration (sft: lr, epochs, ...) when the setting made the fine-tune
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    cache_dir: Path = Path(".")
    progress: Callable[[str], None] = log.info
    chat: models.ChatFormat | None = None  # the setting's chat template and system prompt (None: the tokenizer's)
    _loaded: dict = field(default_factory=dict, repr=False)

    def tokenizer(self):
        """The fine-tuned model's tokenizer with the setting's chat format: every prompt a defense renders."""
        if "tokenizer" not in self._loaded:
            self._loaded["tokenizer"] = models.load_tokenizer(self.finetuned, chat=self.chat)
        return self._loaded["tokenizer"]

    def load(self, which: str):
        """A fresh copy of 'aligned', 'finetuned' or 'base' (the caller may modify it)."""
        handle = {"aligned": self.aligned, "finetuned": self.finetuned, "base": self.base}[which]
        if handle is None:
            raise UserError(f"this defense needs a {which} model, and none was given")
        return models.load_model(handle, self.dtype, self.device)


@dataclass
class DefenseOutput:
    """The repaired model (in memory, or an existing directory for reference rows) and what changed."""

    model: Any = None
    model_path: Path | None = None
    info: dict = field(default_factory=dict)
    checkpoints: dict | None = None
    skipped: str | None = None  # why the defense could not run on these inputs


ROLES = ("reference", "frontier", "method")
# the inputs of a DefenseContext that only some defenses read, with what a defense that does not
# declare one in `reads` finds there: each keys a defense's cache (and reaches it) only when declared
OPTIONAL_INPUTS = {"base": None, "calibration_prompts": [], "benign_prompts": [], "utility_probe": None}


class Defense:
    """Base class: parameters are a dataclass (self-documenting); apply() does the work.

    `role` says what a row is on the board, so that no stage recognises a defense by its name:
    - "reference": a row that answers with one of the setting's own models (theta_A, the safety
      ceiling; theta_F, the undefended row); never cached, never counted as a method;
    - "frontier": the interpolation rows, drawn as the curve every method must beat;
    - "method": a defense (the default, for third-party defenses too).
    """

    Params: ClassVar[type] = NoParams
    role: ClassVar[str] = "method"
    # the default sweep over the method's main knob(s), run by `realign run --curves`: parameter ->
    # values (several parameters: their product). Empty: a single point.
    curve: ClassVar[dict[str, list]] = {}
    needs: ClassVar[tuple[str, ...]] = ()  # what it needs, in words for `realign list`
    # which OPTIONAL_INPUTS it reads. The runner keys its cache by these alone and hands it nothing
    # else (a read it did not declare finds the input empty), so a changed task dev set or benign set
    # recomputes only the defenses that read it. None (a plugin that does not say): all of them.
    reads: ClassVar[tuple[str, ...] | None] = None
    registry_name: ClassVar[str] = ""

    def __init__(self, params=None, **overrides):
        if params is None:
            params = parse_params(self.Params, overrides)
        self.params = params

    def apply(self, ctx: DefenseContext) -> DefenseOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return dataclasses.asdict(self.params)

    def cache_inputs(self, ctx: DefenseContext) -> dict:
        """Inputs this defense reads beyond those every defense's cache key names (the runner's
        defense_dir): e.g. the harm probe's identity; the utility probe's engine, for a defense that
        calls the probe (its scores depend on it). Empty for most defenses."""
        declared = self.needs if self.reads is None else self.reads  # a plugin that does not say: its needs
        probe = ctx.utility_probe if "utility_probe" in declared else None
        engine = getattr(probe, "engine_identity", dict)() if probe is not None else {}
        return {"probe_engine": engine} if engine else {}


SWEEP_FORMS = "key=LOW..HIGH:COUNT (COUNT evenly spaced values) or key=[a,b,c]"


def key_values(items: Iterable[str], written: str) -> dict[str, str]:
    """'key=value' strings -> {key: value}, as users write parameters; `written` shows the form
    they use (for the one-line error). A sweep's value stays one string for grid():
    'gamma=0.5..3', '4' (a row 'resta:gamma=0.5..3:4' split at its colons) -> {'gamma': '0.5..3:4'}."""
    out: dict[str, str] = {}
    last = None
    for item in items:
        key, sep, value = item.partition("=")
        if not sep and last is not None and ".." in out[last] and ":" not in out[last]:
            out[last] += ":" + item.strip()  # the COUNT of a LOW..HIGH range
            continue
        if not sep or not key.strip():
            raise UserError(f"parameters are written {written}, got {item!r}")
        last = key.strip()
        out[last] = value.strip()
    return out


def sweep_values(key: str, value: str) -> list[str] | None:
    """The values a sweep stands for, as strings for parse_params; None for a plain value.
    'LOW..HIGH:COUNT' -> COUNT evenly spaced values (numpy.linspace, 6 significant digits; a
    range of integers gives integers); '[a,b,c]' -> a, b, c."""
    import numpy as np

    if value.startswith("[") and value.endswith("]"):
        values = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        if not values:
            raise UserError(f"sweep {key}={value} lists no values; write {SWEEP_FORMS}")
        return values
    if ".." not in value:
        return None
    bounds, _, count = value.partition(":")
    low, _, high = bounds.partition("..")
    try:
        lo, hi, n = float(low), float(high), int(count)
    except ValueError:
        raise UserError(f"sweep {key}={value} is not a range; write {SWEEP_FORMS}, e.g. {key}=0.5..3:4") from None
    if n < 1:
        raise UserError(f"sweep {key}={value}: COUNT must be at least 1")
    return [format(float(v), ".6g") for v in np.linspace(lo, hi, n)]


def grid(values: dict[str, str]) -> list[dict[str, str]]:
    """One parameter dict per point of the sweeps in `values` (their product, in the order
    written); a dict without sweeps is one point."""
    import itertools

    axes = [[(k, x) for x in (sweep_values(k, v) or [v])] for k, v in values.items()]
    return [dict(point) for point in itertools.product(*axes)]


def split_rows(text: str) -> list[str]:
    """A comma-separated list of board rows, where a sweep's [a,b,c] keeps its commas."""
    rows, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            rows.append(current)
            current = ""
        else:
            current += ch
    rows.append(current)
    return [r.strip() for r in rows if r.strip()]


def parse_params(cls: type, values: dict[str, Any]) -> Any:
    """Build a Params dataclass from strings or values, each checked against its field's type
    (pydantic, lax: "0.5" -> 0.5, "true" / "0" -> bool, "a,b" -> a list; "none" -> None where the
    type allows None), with one clear error per bad key or value."""
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields_by_name:
            known = ", ".join(fields_by_name) or "none"
            raise UserError(
                f"unknown parameter {key!r}{did_you_mean(key, fields_by_name)}; this defense takes: {known}"
            )
        kwargs[key] = _typed(key, hints[key], value)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _typed(name: str, hint: Any, value: Any) -> Any:
    import pydantic

    given = value
    if isinstance(value, str):
        options = (hint, *typing.get_args(hint))  # the type itself, or the members of a union
        if value.lower() == "none" and type(None) in options:
            return None
        if any(typing.get_origin(t) in (list, tuple) for t in options):
            value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return _adapter(hint).validate_python(value)
    except pydantic.ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise UserError(
            f"parameter {name}={given!r} is not a valid {_type_name(hint)} ({reason}); see `realign list`"
        ) from None


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any):
    from pydantic import TypeAdapter

    return TypeAdapter(hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def params_help(cls: type) -> list[dict]:
    """(name, type, default, help) of each parameter, for `realign list` and --help."""
    out = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        kind = f.type if isinstance(f.type, str) else _type_name(f.type)
        out.append({"name": f.name, "type": kind, "default": default, "help": f.metadata.get("help", "")})
    return out
