"""Content hashes: of JSON-able values, of files, and of model directories.

Caches are keyed by the hash of every input (never by a file's mere existence), so changing a
setting can never silently reuse a stale result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SHORT = 16  # hex digits used in directory names


def hash_value(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def hash_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_folder(path: Path | str) -> str:
    """sha256 over the relative names and bytes of every file under a folder (a folder of task YAMLs)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return hash_value({str(p.relative_to(root)): hash_file(p) for p in files})


_MEMO_NAME = ".realign-content-hash.json"


def hash_model_dir(path: Path | str) -> str:
    """sha256 over the names and bytes of every file that defines a model directory.

    Hashing 500 MB takes a second or two, so the result is memoised in the directory keyed by each
    file's size and mtime; any change to a file invalidates the memo.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = path / _MEMO_NAME
    if memo.exists():
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stamp") == stamp:
                return saved["hash"]
        except (ValueError, KeyError):
            pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(hash_file(p).encode())
    digest = h.hexdigest()
    try:  # a read-only model directory is fine: we just do not memoise
        from bench.atomic import atomic_write_json

        atomic_write_json(memo, {"stamp": stamp, "hash": digest})
    except OSError:
        pass
    return digest


def short(digest: str) -> str:
    return digest[:SHORT]
