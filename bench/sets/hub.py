"""Sets from the hub, through `datasets`: a setting's entry `hub:ORG/NAME` or `hub:ORG/NAME:SPLIT`.

The dataset's rows must have a `prompt` column (a `category` column, when there is one, gives the
per-category rates); any other layout is downloaded once and read with the `jsonl` / `csv` loader
and a field mapping. The id may also be a local dataset folder that `datasets.load_dataset` reads
(its data files), which works offline. A hub id while the hub is off, a gated or missing dataset,
or a dataset without a prompt column is one line saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.errors import UserError

PREFIX = "hub:"


def parse(entry: str) -> tuple[str, str | None]:
    """'hub:ORG/NAME[:SPLIT]' -> (id, split or None)."""
    spec = entry[len(PREFIX) :]
    dataset, _, split = spec.partition(":")
    if not dataset:
        raise UserError(f"set {entry!r}: give a dataset id after hub:, e.g. hub:PKU-Alignment/BeaverTails-Evaluation")
    return dataset, split or None


def label(entry: str) -> str:
    """How records and the board name the set: the dataset's name (and split)."""
    dataset, split = parse(entry)
    return Path(dataset).name + (f"-{split}" if split else "")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def load_hub(entry: str) -> list[dict]:
    """The rows {prompt, category?} of a hub dataset (one split)."""
    dataset, split = parse(entry)
    if not Path(dataset).expanduser().is_dir() and offline():
        raise UserError(
            f"set {entry}: the hub is off (HF_HUB_OFFLINE=1); download the dataset where the hub is reachable and "
            "pass a local file (JSON Lines with a prompt field) instead"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(str(Path(dataset).expanduser()) if Path(dataset).is_dir() else dataset)
    except Exception as exc:  # missing, gated, no network: the same fix for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"set {entry} could not be loaded through datasets ({type(exc).__name__}: {first}); if it is gated, "
            "accept its terms on its page and log in with `hf auth login`, or pass a local file instead"
        ) from None
    if split is None:
        if len(loaded) != 1:
            raise UserError(f"set {entry}: the dataset has splits {', '.join(loaded)}; name one: {entry}:SPLIT")
        split = next(iter(loaded))
    if split not in loaded:
        raise UserError(f"set {entry}: no split {split!r}; the dataset has {', '.join(loaded)}")
    rows = loaded[split]
    if "prompt" not in rows.column_names:
        raise UserError(
            f"set {entry}: its rows have no 'prompt' column (columns: {', '.join(rows.column_names)}); download it "
            "and use the jsonl or csv set with a field mapping"
        )
    out = [
        {"prompt": str(r["prompt"]).strip()} | ({"category": str(r["category"])} if r.get("category") else {})
        for r in rows
    ]
    if not out:
        raise UserError(f"set {entry}: split {split!r} holds no rows")
    return out
