"""`realign run --curves`: each method of the defenses list swept over its main knob.

A defense declares its default sweep as the class attribute `curve` (parameter -> values); an
entry of the defenses list becomes the same entry with those sweeps added in the list syntax
(`resta` -> `resta:gamma=[0.25,0.5,1,2,3]`), so the rows are parsed, cached and recorded like any
row. A knob the entry already fixes (or sweeps) is left as written.
"""

from __future__ import annotations

import functools

from defenses import DEFENSES


def with_curve(entry: str) -> str:
    """One entry of the defenses list with its defense's default sweep added."""
    from bench.runner import parse_row

    name, written = parse_row(entry)
    cls = DEFENSES.get(name)
    added = [
        f"{key}=[{','.join(format(v, 'g') if isinstance(v, float) else str(v) for v in values)}]"
        for key, values in cls.curve.items()
        # a knob the entry sets is kept; one the runner sweeps anyway (interpolation's alpha) keeps its labels
        if key not in written and getattr(cls, "sweep", {}).get(key) != values
    ]
    return ":".join([entry, *added]) if added else entry


def with_curves(entries: list[str]) -> list[str]:
    return [with_curve(e) for e in entries]


@functools.lru_cache(maxsize=None)
def knobs(name: str) -> frozenset[str]:
    """The parameters a defense's curve runs over (its `curve` and its runner `sweep`); empty for a
    defense that is not registered here (a record from a plugin not installed)."""
    try:
        cls = DEFENSES.get(name)
    except Exception:  # noqa: BLE001 - an unknown or broken plugin: its rows are points, not a curve
        return frozenset()
    return frozenset(cls.curve) | (frozenset(getattr(cls, "sweep", {})) if cls.role == "frontier" else frozenset())


def curve_label(name: str, params: dict) -> str:
    """The curve a row belongs to: the defense with its parameters other than its knobs
    ('gradient_restoration(mode=clean)', 'antidote(data=harmful_pairs)', 'resta')."""
    fixed = {k: v for k, v in sorted(params.items()) if k not in knobs(name)}
    return name + (f"({','.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else "")
