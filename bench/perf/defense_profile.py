"""Profile lines: where the time goes of every baseline whose apply costs more than its evaluation.

    python -m bench.perf.defense_profile RECORDS... [--write]

Reads result records (one run), keeps the rows of role "method" other than the flagship (it has
its own benchmark sections) whose defense apply (info.apply_s, its fresh process) took longer
than the row's evaluation (cost.wall_s, the reference, measured in the same run), and prints one
line each: apply against evaluation, the defense's own peak memory, and the parts of apply the
defense records in info.seconds (RESTA: training theta_U, the harm probe, the safety vector).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FLAGSHIP = "gradient_restoration"


def lines(folders: list[Path]) -> list[str]:
    from bench.leaderboard.build import load

    out = []
    for record, _ in sorted(load(folders), key=lambda rp: rp[0]["method"]["label"]):
        method, cost = record["method"], record["cost"]
        info = method.get("info") or {}
        apply_s, evaluate_s = info.get("apply_s"), cost.get("wall_s")
        if method.get("role", "method") != "method" or method["name"] == FLAGSHIP or not apply_s or not evaluate_s:
            continue
        if apply_s <= evaluate_s:
            continue
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in (info.get("seconds") or {}).items())
        out.append(
            f"- `{method['label']}`: apply {apply_s:.1f} s = {apply_s / evaluate_s:.2f}x its evaluation "
            f"({evaluate_s:.1f} s); peak {info.get('peak_rss_mb', 0):.0f} MB; "
            + (f"where it goes: {parts}" if parts else "no breakdown recorded")
            + (
                f"; theta_U {info['theta_U_steps']} steps at lr {info['theta_U_lr']:g}, harmful rate "
                f"{100 * info['theta_U_harmful_rate']:.1f}% vs the attacked model's "
                f"{100 * info['attacked_harmful_rate']:.1f}%"
                if "theta_U_steps" in info
                else ""
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", help="folders or files of result records (one run)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    found = lines([Path(p) for p in args.records]) or ["- no baseline's apply took longer than its evaluation"]
    print("\n".join(found))
    if args.write:
        from bench.perf import write_section

        write_section(
            "defense_profile",
            "Baselines whose apply (their own fresh process) took longer than their evaluation, measured in the "
            "same run; the flagship has its own sections above.\n\n" + "\n".join(found),
            command=f"python -m bench.perf.defense_profile {' '.join(args.records)} --write",
        )


if __name__ == "__main__":
    main()
