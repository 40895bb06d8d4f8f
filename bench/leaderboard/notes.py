"""Method notes: one short page per method (curve) of a board, linked from its row.

What the method is (its defense's docstring), the parameters its rows used (each row's own, over
the defense's defaults), the deviations from the released code that remain and why (the defense's
`deviations`), and its cost from the records (the defense's apply time and peak memory, in its own
process). Static text comes from the registry; a method not registered here gets its records' part.
"""

from __future__ import annotations

import html
import inspect

from bench.leaderboard.build import Board


def notes(board: Board) -> dict[str, str]:
    """curve name -> its note in Markdown, for every method and frontier curve of the board."""
    # joined once at the end: a thousand settings appended to one string would copy it each time
    parts: dict[str, list[str]] = {}
    for key, methods in board.methods.items():
        rows = {r["method"]: r for r in board.settings[key]}
        for c in methods:
            members = [rows[m] for m in c["rows"] if m in rows]
            if c["curve"] not in parts:  # the head once a curve (its registry lookups cost, a thousand settings over)
                parts[c["curve"]] = [_head(c["curve"], members[0]["name"] if members else "")]
            parts[c["curve"]].append(_note_for_setting(key, c, members))
    return {curve: "".join(text) for curve, text in parts.items()}


def _defense(name: str):
    from defenses import DEFENSES

    try:
        return DEFENSES.get(name)
    except Exception:  # noqa: BLE001 - an unknown or broken plugin: the note says so
        return None


def _head(curve: str, name: str) -> str:
    cls = _defense(name)
    if cls is None:
        return f"# {_cell(curve)}\n\nNot registered here: only what its records say.\n"
    from defenses.base import params_help

    about = inspect.cleandoc(inspect.getmodule(cls).__doc__ or cls.__doc__ or "").strip()
    defaults = ", ".join(f"{p['name']}={p['default']!r}" for p in params_help(cls.Params)) or "none"
    deviations = inspect.cleandoc(getattr(cls, "deviations", "") or "not written for this method")
    knobs = ", ".join(f"{k} in {v}" for k, v in getattr(cls, "curve", {}).items()) or "none (a single point)"
    return (
        f"# {_cell(curve)}\n\n## What it is\n\n{about}\n\n## Parameters\n\nDefaults: {defaults}.\n\n"
        f"Default curve (`realign run --curves`): {knobs}.\n\n"
        f"## Deviations from the released code\n\n{deviations}\n"
    )


def _note_for_setting(key: str, c: dict, members: list[dict]) -> str:
    lines = [
        f"\n## On {_cell(key)}\n",
        "| row | parameters | harmful % | task % | apply s | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(members, key=lambda r: r["method"]):
        params = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items())) or "defaults"
        lines.append(
            f"| {_cell(r['method'])} | {_cell(params)} | {_pct(r['harmful_rate'])} | {_pct(r['task_metric'])} | "
            f"{_num(r.get('apply_s'))} | {_num(r.get('peak_rss_mb'))} |"
        )
    applies = [r["apply_s"] for r in members if r.get("apply_s") is not None]
    peaks = [r["peak_rss_mb"] for r in members if r.get("peak_rss_mb") is not None]
    if applies:
        lines.append(
            f"\nCost: apply {min(applies):.1f} to {max(applies):.1f} s a row, peak memory {min(peaks):.0f} to "
            f"{max(peaks):.0f} MB (the defense's own process; the first row of a curve pays for what the others "
            "reuse from the cache)."
        )
    lines.append(f"\nFrontier hypervolume {c['hypervolume']:.4f}; frontier: {_cell(', '.join(c['frontier']))}.")
    return "\n".join(lines) + "\n"


def _cell(x) -> str:
    return html.escape(str(x)).replace("|", "\\|")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"
