"""`realign board check NEW --against leaderboards/NAME`: the regression gate of a CI pipeline.

Each new record is matched with the published record of the same setting and method label (else
of the same method with the same parameter values, defaults filled in). It is
a regression when, on an axis, the new value is worse by more than `tolerance` (absolute, in rate
units: the practical threshold) AND it is significantly worse at `alpha`: a one-sided test (exact
McNemar when both sides carry per-sample outcomes on the same prompts, else a pooled two-proportion
z-test from k and n), its p-value adjusted by Holm's method over every comparison of the check (20
rows x 2 axes at 0.05 each, unadjusted, would fail a run with no real change 64% of the time).
Exit codes: 0 no regression, 1 regression (with a short report), 2 unusable input.

A warning line comes first when the two sides were not made the same way (generation mode): a
record generated in the fast, nondeterministic mode differs from a deterministic board by engine
noise as well as by the model, and the paired test cannot tell the two apart. Likewise when the
records come from different testbeds (the setting's content hash, which names the hash of every
model and data file): a record is then matched with the published record of the same setting
name, model, task, N, judge and method, and the warning names the inputs that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import UserError
from bench.leaderboard import stats
from bench.leaderboard.build import load, outcomes, setting_key

AXES = {"harmful_rate": False, "task_metric": True}  # axis -> higher is better


@dataclass
class Finding:
    setting: str
    method: str
    metric: str
    published: float
    new: float
    worse_by: float
    p: float  # one-sided, that the new value is worse
    test: str
    regression: bool = False
    p_adjusted: float | None = None  # over the check's comparisons (Holm); None: not adjusted

    def line(self) -> str:
        verdict = "REGRESSION" if self.regression else "ok"
        adjusted = "" if self.p_adjusted is None else f", Holm-adjusted {self.p_adjusted:.3g}"
        return (
            f"{verdict}: {self.method} [{self.setting}] {self.metric}: {100 * self.published:.1f}% -> "
            f"{100 * self.new:.1f}% "
            f"(worse by {100 * self.worse_by:+.1f} points, one-sided p={self.p:.3g}{adjusted}, {self.test})"
        )


def loose_key(record: dict) -> str:
    """The setting key without its content hash: the same setting as named, from any testbed."""
    s = record["setting"]
    return f"{s.get('name', '')} | {s['model']} | {s['task']} | N={s['harmful_n']} | judge={s['judge']}"


def method_identity(record: dict) -> str:
    """A row by its method and the value of every parameter, defaults filled in: the main job's
    `gradient_restoration` (default parameters) and the published curve point that names them,
    `gradient_restoration(recovery_rate=0.002,steps=20)`, are one row. A method this installation
    does not know, or parameters it does not parse, leave the label."""
    import dataclasses
    import json

    from defenses import DEFENSES
    from defenses.base import parse_params

    m = record["method"]
    try:
        values = dataclasses.asdict(parse_params(DEFENSES.get(m["name"]).Params, m.get("params") or {}))
    except (UserError, TypeError):
        return m["label"]
    return json.dumps([m["name"], values], sort_keys=True, default=str)


def match(new: list[tuple[dict, Path]], published: list[tuple[dict, Path]]) -> dict[int, tuple[dict, Path]]:
    """index of each new record -> its published record: the same setting (content hash included),
    else the same setting as named (another testbed); within it the same method label, else the
    same method with the same parameter values (defaults written out on one side only)."""
    out = {}
    for setting in (setting_key, loose_key):
        by_label = {(setting(r), r["method"]["label"]): (r, p) for r, p in published}
        by_identity = None  # parsed only when a label is missing (it imports the registry)
        for i, (rec, _) in enumerate(new):
            if i in out:
                continue
            found = by_label.get((setting(rec), rec["method"]["label"]))
            if found is None:
                if by_identity is None:
                    by_identity = {(setting(r), method_identity(r)): (r, p) for r, p in published}
                found = by_identity.get((setting(rec), method_identity(rec)))
            if found is not None:
                out[i] = found
    return out


def testbed_warnings(new: list[tuple[dict, Path]], published: list[tuple[dict, Path]]) -> list[str]:
    """One line per pair of different setting content hashes among the compared records, naming the
    inputs (models, data files) whose hashes differ."""
    lines = {}
    for i, (old, _) in match(new, published).items():
        rec = new[i][0]
        a, b = rec["setting"].get("key"), old["setting"].get("key")
        if a == b:
            continue
        ia = (rec["setting"].get("resolved") or {}).get("inputs") or {}
        ib = (old["setting"].get("resolved") or {}).get("inputs") or {}
        differ = sorted(k for k in set(ia) | set(ib) if ia.get(k) != ib.get(k)) or ["options only"]
        lines[(a, b)] = (
            f"warning: new records come from setting content hash {a or 'unrecorded'}, the published board from "
            f"{b or 'unrecorded'} (a different testbed or data; inputs that differ: {', '.join(differ)}): "
            "differences include the inputs, not only the method"
        )
    return [lines[k] for k in sorted(lines, key=str)]


def _eval_set(record: dict, metric: str) -> dict:
    """The content hashes of the prompts a metric was measured on (records of every age name them
    differently: harmful_set, harmful:NAME, task_test)."""
    inputs = record.get("inputs", {})
    if metric == "harmful_rate":
        return {k: v for k, v in inputs.items() if k == "harmful_set" or k.startswith("harmful:")}
    return {k: v for k, v in inputs.items() if k == "task_test"}


def compare(
    new: list[tuple[dict, Path]],
    published: list[tuple[dict, Path]],
    tolerance: float,
    alpha: float,
    correction: str = "holm",
) -> list[Finding]:
    if correction not in ("holm", "none"):
        raise UserError(f"--correction must be holm or none, got {correction!r}")
    matched = match(new, published)
    findings = []
    for i, (rec, path) in enumerate(new):
        key = (setting_key(rec), rec["method"]["label"])
        if i not in matched:
            raise UserError(
                f"no published record for method {key[1]!r} in setting {key[0]}: check the method label and settings"
            )
        old, old_path = matched[i]
        if old["method"]["label"] != key[1]:  # the same parameters, written out on one side
            key = (key[0], f"{key[1]} (published as {old['method']['label']})")
        s_new, s_old = outcomes(rec, path), outcomes(old, old_path)
        for metric, higher_better in AXES.items():
            a, b = rec["metrics"][metric], old["metrics"][metric]
            worse_by = (b["value"] - a["value"]) if higher_better else (a["value"] - b["value"])
            # paired when both sides scored the same prompts (same evaluation set hash, same length)
            same_prompts = (
                s_new
                and s_old
                and metric in s_new
                and metric in s_old
                and len(s_new[metric]) == len(s_old[metric])
                and _eval_set(rec, metric) == _eval_set(old, metric)
            )
            if same_prompts:
                known = ~(np.isnan(s_new[metric]) | np.isnan(s_old[metric]))
                x, y = s_new[metric][known], s_old[metric][known]
                if higher_better:
                    x, y = 1 - x, 1 - y  # McNemar on "bad" outcomes: b counts prompts where new is worse
                t = stats.mcnemar(x, y, alternative="greater")
                p, test = t["p"], "McNemar (paired)"
            else:
                k_new, k_old = a.get("k", round(a["value"] * a["n"])), b.get("k", round(b["value"] * b["n"]))
                if higher_better:  # count the bad outcomes on both sides
                    k_new, k_old = a["n"] - k_new, b["n"] - k_old
                p = stats.two_proportion_p(k_new, a["n"], k_old, b["n"], alternative="greater")
                test = "two-proportion z"
            findings.append(
                Finding(
                    key[0],
                    key[1],
                    metric,
                    b["value"],
                    a["value"],
                    worse_by,
                    p,
                    test,
                )
            )
    if correction == "holm":
        for f, adjusted in zip(findings, stats.holm([f.p for f in findings])):
            f.p_adjusted = float(adjusted)
    for f in findings:
        f.regression = f.worse_by > tolerance and (f.p if f.p_adjusted is None else f.p_adjusted) < alpha
    return findings


def generation_mode(record: dict) -> str:
    return record.get("reproducibility", {}).get(
        "generation_mode", "unrecorded (made before realign-bench recorded it)"
    )


def mode_warnings(new: list[tuple[dict, Path]], published: list[tuple[dict, Path]]) -> list[str]:
    """One line per (new mode, published mode) pair that differs."""
    matched = match(new, published)
    pairs = sorted(
        {
            (generation_mode(new[i][0]), generation_mode(old))
            for i, (old, _) in matched.items()
            if generation_mode(new[i][0]) != generation_mode(old)
        }
    )
    return [
        f"warning: new records were generated in mode {a!r}, the published board in mode {b!r}: differences include "
        "engine noise, not only the model; rerun without --fast-nondeterministic to compare like with like"
        for a, b in pairs
    ]


def check(
    new_paths: list[Path], against: Path, tolerance: float = 0.0, alpha: float = 0.05, correction: str = "holm"
) -> tuple[int, str]:
    if not 0 <= tolerance < 1 or not 0 < alpha < 1:
        raise UserError("--tolerance must be in [0, 1) and --alpha in (0, 1)")
    against = Path(against)
    if not against.is_dir():
        raise UserError(f"{against}: no such published board folder")
    published = load([against / "records"] if (against / "records").is_dir() else [against])
    new = load(new_paths)
    findings = compare(new, published, tolerance, alpha, correction)
    bad = [f for f in findings if f.regression]
    report = "\n".join(f.line() for f in (bad or findings))
    how = f"tolerance {100 * tolerance:.1f} points, alpha {alpha}" + (
        f" (Holm over {len(findings)} comparisons)" if correction == "holm" else " (each comparison on its own)"
    )
    head = f"{len(bad)} regression(s) at {how}" if bad else f"no regression: {len(findings)} comparisons at {how}"
    warnings = mode_warnings(new, published) + testbed_warnings(new, published)
    return (1 if bad else 0), "\n".join(warnings + [head, report])
