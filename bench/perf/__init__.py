"""Performance benchmarks. Each prints its figures (ratios against a reference measured in the
same run) and, with --write, replaces its own section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def machine() -> str:
    """What the figures were measured on, in words (no host names)."""
    import psutil

    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - torch missing or broken: report the CPU only
        pass
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {psutil.virtual_memory().total / 2**30:.0f} GiB{gpu}"


def embedded_model_dir() -> str:
    """The embedded testbed's base model (converted once, cached under realign-home): the default
    model of the engine benchmarks."""
    from bench.testbed.build import embedded_base

    return str(embedded_base(Path("realign-home/cache")).path)


def write_section(name: str, body: str, path: Path = BENCHMARKS, command: str | None = None) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (appended when
    absent), stamped with the command, the date and the machine; atomic."""
    from bench.atomic import atomic_write_text

    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    command = command or f"python -m bench.perf.{name} --write"
    block = f"{start}\n_Written by `{command}` on {date.today()}, {machine()}._\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
