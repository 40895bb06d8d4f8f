"""A GitHub (pipe) Markdown table from cells that are already text.

Written here rather than through tabulate: a board of a thousand settings renders two thousand small
tables, and tabulate's per-cell type inference and alignment passes were a fifth of the 10,000-record
budget while every cell here is pre-formatted text. The layout is tabulate's
`tablefmt="github", disable_numparse=True` (the tests hold it to tabulate's output byte for byte),
with one difference: widths count code points, never terminal cells, so the file does not depend on
whether wcwidth happens to be installed.
"""

from __future__ import annotations

from typing import Sequence

MIN_PADDING = 2  # tabulate's: a column is at least its header and two spaces wide


def github_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Every cell stripped, left-aligned and padded to its column's width; a dashed rule under the
    headers."""
    text = [[str(c).strip() for c in row] for row in rows]
    widths = [len(h) + MIN_PADDING for h in headers]
    for row in text:
        for i, c in enumerate(row):
            if len(c) > widths[i]:
                widths[i] = len(c)
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in text]
    return "\n".join(lines)
