"""The sweep spec: a grid of settings x harmful N x defenses (each with its own parameter sweep) x
seeds x judges, as one YAML file checked by pydantic (unknown keys are errors, as in a setting).

    name: sql-grid
    settings: [embedded-default, {setting: my-setting.yaml, set: ["generation.limit=50"]}]
    harmful_n: [0, 100]
    defenses: [aligned, none, {name: gradient_restoration, params: {mode: clean},
                               sweep: {recovery_rate: [0.001, 0.002]}}]
    seeds: [0, 1]
    judges: [keyword]
    resources: {num_gpus: 1, memory_gb: 32}

A bad file is one line naming the file, the key (dotted), what was expected and what was found.
Names (settings, defenses and their parameters, judges) are checked by bench.sweep.jobs.expand
before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bench.errors import UserError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SettingEntry(_Strict):
    """One setting of the grid, with overrides of its own."""

    setting: str = Field(description="a setting YAML file (relative to the spec's folder) or a shipped name")
    set: list[str] = Field(default=[], description="dotted.key=value overrides of that setting, as --set takes them")
    harmful_n: list[int] | None = Field(
        default=None, description="harmful N of this setting's attack (default: the spec's, else the setting's)"
    )


class DefenseEntry(_Strict):
    """One defense with fixed parameters and a parameter sweep (the product of the swept values)."""

    name: str = Field(description="a registered defense (see `realign list`)")
    params: dict[str, Any] = Field(default={}, description="parameters every row of this defense takes")
    sweep: dict[str, list[Any]] = Field(
        default={}, description="parameter -> values: one row per combination (a defense's own sweep otherwise)"
    )


class Resources(_Strict):
    """What one job asks its executor for (Ray resource requests, Slurm's per-job allocation)."""

    num_cpus: int | None = Field(
        default=None, ge=1, description="CPU cores a job gets; also its torch threads (default: the executor's)"
    )
    num_gpus: float = Field(
        default=0, ge=0, description="GPUs a job gets: tensor_parallel_size x pipeline_parallel_size for vLLM"
    )
    memory_gb: float | None = Field(default=None, gt=0, description="memory a job gets (Ray's `memory`, Slurm mem)")
    timeout_min: int = Field(default=24 * 60, ge=1, description="Slurm: the job's time limit")


class Slurm(_Strict):
    partition: str | None = Field(default=None, description="Slurm partition")
    additional: dict[str, Any] = Field(
        default={}, description="further sbatch options (submitit's slurm_additional_parameters)"
    )


class SweepSpec(_Strict):
    name: str = Field(description="the sweep's name: its folder under HOME/sweeps")
    settings: list[SettingEntry | str] = Field(min_length=1, description="settings: files or shipped names")
    harmful_n: list[int] | None = Field(default=None, description="harmful N of every attack setting")
    defenses: list[DefenseEntry | str] | None = Field(
        default=None, description="board rows: names, name:key=value, or {name, params, sweep} (default: the setting's)"
    )
    seeds: list[int] | None = Field(default=None, min_length=1, description="seeds (default: each setting's)")
    judges: list[str] | None = Field(default=None, min_length=1, description="judges (default: each setting's)")
    resources: Resources = Resources()
    retries: int = Field(default=2, ge=0, description="times a job whose worker died is run again (Ray, Slurm)")
    slurm: Slurm = Slurm()


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"sweep spec {str(path)!r}: no such file; check the path")
    from bench.settings import read_yaml_mapping

    raw = read_yaml_mapping(path, "sweep spec", "keys (name, settings, defenses, ...)")
    return validate(raw, str(path))


def validate(raw: dict, where: str) -> SweepSpec:
    from pydantic import ValidationError

    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise UserError(describe(errors[0], where, len(errors))) from None


def describe(error: dict, where: str, count: int) -> str:
    """One line from pydantic's first error: file, dotted key, what was expected, what was found."""
    # a union's members add their class name (or `str`) to the location; drop them
    parts = [p for p in error["loc"] if not (isinstance(p, str) and (p[:1].isupper() or p == "str"))]
    key = ".".join(str(p) for p in parts)
    more = f" (and {count - 1} more problem{'s' * (count > 2)})" if count > 1 else ""
    if error["type"] == "extra_forbidden":
        section = _section(parts[:-1])
        known = ", ".join(section.model_fields) if section else "see the schema"
        hint = did_you_mean(parts[-1], section.model_fields) if section else ""
        return f"sweep spec {where}: unknown key {key!r}{hint}; known keys here: {known}{more}"
    if error["type"] == "missing":
        return f"sweep spec {where}: {key}: expected a value, found nothing (the key is required){more}"
    expected = error["msg"].removeprefix("Input should be ").lower()
    return f"sweep spec {where}: {key}: expected {expected}, found {error.get('input')!r}{more}"


def _section(loc: list):
    """The schema class at a location (for listing its known keys)."""
    from typing import get_args

    cls = SweepSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        found = []

        def collect(t):
            if isinstance(t, type) and hasattr(t, "model_fields"):
                found.append(t)
            for a in get_args(t):
                collect(a)

        collect(field.annotation)
        if not found:
            return None
        cls = found[0]
    return cls
