"""The main job end to end on the embedded model (smoke sizes). Slow: minutes, still run in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import records

pytestmark = pytest.mark.slow


def realign(*args, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "bench.cli", *args, "--home", str(home)], capture_output=True, text=True, env=env)


def test_main_job_smoke_with_flagship_and_resume(tmp_path):
    home = tmp_path / "home"
    t0 = time.perf_counter()
    proc = realign("defend", "gradient_restoration", "--preset", "smoke", "--param", "steps=10", home=home)
    cold = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = home / "runs" / "embedded-smoke"
    recs = [records.load(p) for p in sorted((run_dir / "records").glob("*.json"))]
    labels = sorted(r["method"]["label"] for r in recs)
    assert labels == ["aligned", "gradient_restoration(steps=10)", "none"], labels
    for r in recs:
        samples = records.load_samples((run_dir / "records" / f"{r['record_id']}.json"), r)
        assert {s["metric"] for s in samples} == {"harmful_rate", "over_refusal", "task_metric"}
        assert r["metrics"]["harmful_rate"]["n"] == 24 and r["metrics"]["task_metric"]["n"] == 16
        assert r["inputs"]["aligned"] != r["inputs"]["finetuned"]
    flagship = next(r for r in recs if r["method"]["name"] == "gradient_restoration")
    info = flagship["method"]["info"]
    assert info["E"] == 20 and info["L"] == 30 and info["chosen_step"] in (5, 10)
    board = (run_dir / "board.md").read_text()
    assert "gradient_restoration" in board and "Pareto rank" in board
    for name in ("board.csv", "board.html", "pareto.png", "pareto.svg"):
        assert (run_dir / name).stat().st_size > 0
    assert json.loads((run_dir / "board.json").read_text())[0]["method"]

    # a second run redoes nothing: every stage and record is reused
    t0 = time.perf_counter()
    again = realign("defend", "gradient_restoration", "--preset", "smoke", "--param", "steps=10", home=home)
    warm = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("reusing record") == 3 and "reusing" in again.stderr
    assert warm < cold  # reuse, not a timing target
