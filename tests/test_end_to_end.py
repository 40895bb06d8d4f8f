"""The main job end to end on the embedded model (smoke sizes). Slow: minutes, still run in CI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import records
from tests.conftest import SMOKE_COMMAND, copy_home, realign_cli

pytestmark = pytest.mark.slow


def realign(*args, home: Path) -> subprocess.CompletedProcess:
    return realign_cli(list(args), home)


def test_main_job_smoke_with_flagship_and_resume(smoke_run, tmp_path):
    """The smoke main job cold (the session's shared run of SMOKE_COMMAND), then run again in a copy
    of its home: the rerun trains and generates nothing, and a second judge labels the cached answers."""
    home = smoke_run["home"]
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

    # a second run trains and generates nothing: each stage says it reuses its cached result, no
    # stage says it builds, and the generation caches are byte for byte what the first run left
    home = copy_home(home, tmp_path / "home")
    run_dir = home / "runs" / "embedded-smoke"
    caches = sorted((home / "cache").rglob("*.sqlite"))
    assert caches, "the first run generated through no SQLite cache"
    before = {p: p.read_bytes() for p in caches}
    again = realign(*SMOKE_COMMAND, home=home)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stderr
    assert log.count("testbed: reusing") == 1, log
    assert log.count("attack: reusing") == 1, log
    assert log.count("defense gradient_restoration: reusing") == 1, (
        log
    )  # aligned and none are the cached models themselves
    assert log.count("reusing record") == 3, log
    for building in (
        "testbed: building",
        "testbed: generating",
        "safety fine-tune",
        "attack: LoRA fine-tune",
        "rebuilding",
    ):
        assert building not in log, (building, log)
    assert not [line for line in log.splitlines() if "evaluate " in line and "reusing record" not in line], log
    assert sorted((home / "cache").rglob("*.sqlite")) == caches and {p: p.read_bytes() for p in caches} == before

    # a second judge for the same 3 rows: chat_rubric on the embedded model (the testbed's aligned
    # model) over the testbed's evaluation set; the answers are read, never generated again
    testbed = next(p for p in (home / "cache").glob("testbed-*") if (p / "manifest.json").exists())
    rubric = f"chat_rubric:pretrained={testbed / 'aligned'}:rubric=xstest:max_new_tokens=64"
    judged = realign("judge", "embedded-smoke", "--judges", rubric, home=home)
    assert judged.returncode == 0, judged.stderr[-2000:]
    assert "evaluate " not in judged.stderr and "generating" not in judged.stderr, judged.stderr
    generations = [p for p in caches if p.name == "generations.sqlite"]
    assert generations and all(p.read_bytes() == before[p] for p in generations)  # not one answer added
    label = "chat_rubric(max_new_tokens=64,rubric=xstest)"
    for r in (records.load(p) for p in sorted((run_dir / "records").glob("*.json"))):
        m = r["metrics"][f"harmful_rate:{label}"]
        assert m["n"] + m["n_unknown"] == 24 and m["judge"]["weights"]
    agree = realign("judges", "agree", "embedded-smoke", home=home)
    assert agree.returncode == 0, agree.stderr[-2000:]
    kappa = next(line for line in agree.stdout.splitlines() if f"keyword vs {label}: kappa=" in line)
    print(f"chat_rubric on the embedded model against the keyword judge (no threshold: a 135 M model): {kappa}")
    assert "Judge agreement on" in (run_dir / "board.html").read_text()
