"""Reading set files in their published formats (CSV here; JSON Lines through bench.data.read_jsonl);
every error names the file, the line and the field.

Line numbers are the file's own (a CSV header is line 1), so a user can open the file at the line.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
from pathlib import Path

from bench.errors import UserError


def package_data(package: str, name: str, install: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package (the
    data packages' own modules pull dependencies the suite skips)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is missing: run `{install}`")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path} not found: put {what} there")
    return path


def _text(path: Path, lineno: int, row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}:{lineno}: missing or empty field {field!r}")
    return value.strip()


@contextlib.contextmanager
def _csv_errors(path: Path):
    """A file that is not UTF-8 text, or that the csv module cannot split, as one line."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8 CSV") from None
    except csv.Error as exc:
        raise UserError(f"{path}: not a readable CSV file ({exc}); check its quoting") from None


def csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header; the required columns must be non-empty."""
    with _csv_errors(path), open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{path}:1: header lacks column(s) {', '.join(missing)} (found: "
                f"{', '.join(reader.fieldnames or []) or 'nothing'})"
            )
        rows = []
        for row in reader:
            lineno = reader.line_num  # the line the row ends on (quoted cells may span lines)
            for field in required:
                row[field] = _text(path, lineno, row, field)
            rows.append((lineno, row))
    if not rows:
        raise UserError(f"{path}: no rows under the header")
    return rows


def headerless_csv_first_column(path: Path) -> list[str]:
    """The first cell of every line of a CSV file without a header (HEx-PHI's layout)."""
    with _csv_errors(path), open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        out = []
        for cells in reader:
            if not cells or not cells[0].strip():
                raise UserError(f"{path}:{reader.line_num}: empty line; the file holds one prompt a line")
            out.append(cells[0].strip())
    if not out:
        raise UserError(f"{path}: file is empty; it holds one prompt a line")
    return out
