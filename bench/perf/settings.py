"""Benchmark: `realign setting check` on the embedded setting, and the LoRA merge cold against warm.

    python -m bench.perf.settings --home HOME [--repeat 3] [--write]

HOME holds a run of the embedded default (its testbed and attack are read, never written):
- `realign setting check embedded-default --home HOME`, as a user runs it (a subprocess), the
  median of --repeat runs; reference: the same interpreter importing the CLI and exiting, measured
  in the same run (what any `realign` command costs before it does anything). The home's files are
  listed (path, size, mtime) before and after: the check must write nothing.
- the merge of the attack's LoRA adapter onto the testbed's aligned model (copies of both, so the
  home stays as it is) into a new cache, in a fresh interpreter (cold), then again in another
  fresh interpreter (warm: the second run of a setting that names the adapter). Reference: the
  cold merge.
Issue targets: the check at most 5 s; a second run spends 0 s merging.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.new_interpreter import run_fresh


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _wall(argv: list[str]) -> float:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def time_setting_check(home: Path, repeat: int) -> dict:
    before = _listing(home)
    check = [_wall([sys.executable, "-m", "bench.cli", "setting", "check", "embedded-default", "--home", str(home)])]
    check += [
        _wall([sys.executable, "-m", "bench.cli", "setting", "check", "embedded-default", "--home", str(home)])
        for _ in range(repeat - 1)
    ]
    startup = [_wall([sys.executable, "-c", "import bench.cli"]) for _ in range(repeat)]
    changed = sorted(set(before.items()) ^ set(_listing(home).items()))
    return {
        "check_s": [round(x, 2) for x in check],
        "check_median_s": round(statistics.median(check), 2),
        "startup_median_s": round(statistics.median(startup), 2),
        "files_written": len(changed),
    }


def _merge(adapter: str, aligned: str, cache: str) -> dict:
    """One run's merge (in a fresh interpreter): its wall time and whether it merged."""
    from bench import adapters, models

    handle = models.resolve(aligned)
    t0 = time.perf_counter()
    merged = adapters.merge_adapter(Path(adapter), handle, Path(cache), log=lambda _: None)
    return {"s": round(time.perf_counter() - t0, 2), "merged": adapters.merges_done, "path": str(merged.path)}


def time_merge(home: Path) -> dict:
    testbed = next(p for p in sorted((home / "cache").glob("testbed-*")) if (p / "manifest.json").exists())
    attack = next(p for p in sorted((home / "cache").glob("attack-n*")) if (p / "manifest.json").exists())
    with tempfile.TemporaryDirectory(prefix="realign-perf-merge-") as tmp:
        aligned, adapter = Path(tmp) / "aligned", Path(tmp) / "adapter"
        shutil.copytree(testbed / "aligned", aligned)  # copy2 keeps mtimes: the hash memo stays valid
        shutil.copytree(attack / "adapter", adapter)
        cache = Path(tmp) / "cache"
        cold = run_fresh(_merge, str(adapter), str(aligned), str(cache))
        warm = run_fresh(_merge, str(adapter), str(aligned), str(cache))
    assert cold["path"] == warm["path"]
    return {"cold_s": cold["s"], "cold_merges": cold["merged"], "warm_s": warm["s"], "warm_merges": warm["merged"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True, help="a realign home holding a run of the embedded default (read only)")
    ap.add_argument("--repeat", type=int, default=3, help="setting check runs (the median is reported)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    home = Path(args.home)
    check = time_setting_check(home, args.repeat)
    merge = time_merge(home)
    result = {"setting_check": check, "merge": merge}
    print(json.dumps(result, indent=2))
    if args.write:
        from bench.perf import write_section

        c, m = check, merge
        write_section(
            "settings",
            "\n".join(
                [
                    "`realign setting check embedded-default` on a home holding the embedded run (a subprocess, "
                    f"median of {args.repeat}); reference: the interpreter importing the CLI, same run. The merge: "
                    "the attack's LoRA adapter onto the testbed's aligned model (copies), a fresh interpreter per run.",
                    "",
                    "| what | seconds | against the reference | target |",
                    "|---|---|---|---|",
                    f"| `realign setting check` (runs: {', '.join(map(str, c['check_s']))}) | "
                    f"**{c['check_median_s']}** | {c['check_median_s'] / c['startup_median_s']:.1f}x startup | 5 s |",
                    f"| reference: `python -c 'import bench.cli'` | {c['startup_median_s']} | 1x | |",
                    f"| files the check wrote in the home | {c['files_written']} | | 0 |",
                    f"| LoRA merge, first run (merged: {m['cold_merges']}) | {m['cold_s']} | 1x (reference) | |",
                    f"| LoRA merge, second run (merged: {m['warm_merges']}; finding the cached merge) | "
                    f"**{m['warm_s']}** | {m['warm_s'] / m['cold_s']:.3f}x | 0 s merging |",
                ]
            ),
            command=f"python -m bench.perf.settings --home HOME --repeat {args.repeat} --write",
        )


if __name__ == "__main__":
    main()
