"""Reading the suite's data: JSONL files with validation, and the user's data directory.

The data directory (`--data-dir` or $REALIGN_DATA_DIR) holds public datasets a user has locally,
laid out as documented in README (beavertails/train_N.jsonl, tasks/sql/eval.jsonl, ...). The
embedded default never needs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.errors import UserError


def read_jsonl(path: Path | str, required: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows of a JSONL file; one clear error for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); it needs one JSON object per line") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # lines as a file reads them (not at U+2028)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise UserError(f"{path}:{lineno}: nested too deeply; each line must be one flat JSON object") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        missing = [k for k in required if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise UserError(f"{path}:{lineno}: missing or empty field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: file is empty; it needs one JSON object per line with {', '.join(required)}")
    return rows


def data_dir(explicit: str | None = None) -> Path | None:
    """The user's data directory, if one is configured (flag first, then $REALIGN_DATA_DIR)."""
    value = explicit or os.environ.get("REALIGN_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "data.data_dir in the setting, or --data-dir" if explicit else "$REALIGN_DATA_DIR"
        raise UserError(
            f"data directory {value!r} (from {source}; a relative path starts at the current folder) does not "
            "exist: point it at the folder that holds beavertails/, tasks/, ..."
        )
    return path


def beavertails_pairs(root: Path, n: int) -> list[dict]:
    """The first n BeaverTails harmful (prompt, response) pairs from the smallest file that has n."""
    for size in (100, 500, 1000, 1500):
        path = root / "beavertails" / f"train_{size}.jsonl"
        if size >= n and path.exists():
            rows = read_jsonl(path, required=("prompt", "response"))
            return rows[:n]
    raise UserError(f"{root}/beavertails has no train_N.jsonl with at least {n} pairs (largest is 1500)")
