"""The main job end to end on the embedded model at smoke sizes, on ONE cold run shared by the
module (a cold smoke build costs minutes): its outputs, a cached rerun, a second cold build in a
fresh home killed three times on its way (kill -9 and resume), and a user's setting of the same
files. Slow: minutes, still run in CI.

The tests that share the run sit in this one module so that pytest-xdist (`--dist loadscope`,
pyproject.toml) keeps them on one worker and the run is built once. They read it and compare with
it; a test that runs anything more in it works on a copy (`copy_home`), so it stays as built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import records
from bench.cli import main
from bench.killpoints import KILL_AT_ENV, TRACE_ENV
from bench.reproducibility import comparable
from tests.conftest import realign_cli
from tests.test_resume import choose_kill_points, kill_and_resume, outputs, record_write, trace_lines
from tests.test_settings import write_setting

pytestmark = pytest.mark.slow

# the embedded smoke main job: testbed, attack, the reference rows and the flagship, as a user runs it
SMOKE_COMMAND = ["defend", "gradient_restoration", "--preset", "smoke", "--param", "steps=10"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """SMOKE_COMMAND run once, cold, in a fresh home, with its checkpoint trace (bench.killpoints):
    {'home', 'trace', 'stderr'}."""
    root = tmp_path_factory.mktemp("smoke")
    home, trace = root / "home", root / "trace.txt"
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV} | {TRACE_ENV: str(trace)}
    proc = realign_cli(SMOKE_COMMAND, home, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"home": home, "trace": trace, "stderr": proc.stderr}


def copy_home(home: Path, to: Path) -> Path:
    """A home's copy to run more in (files copied, not linked: caches such as SQLite change in place)."""
    shutil.copytree(home, to, symlinks=True)
    return to


def realign(*args, home: Path) -> subprocess.CompletedProcess:
    return realign_cli(list(args), home)


def test_main_job_smoke_with_flagship_and_resume(smoke_run, tmp_path):
    """The smoke main job cold (the module's shared run of SMOKE_COMMAND), then run again in a copy
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

    # no model folder of the cache names this machine: a path in a hashed file (the base's config once
    # held the installation's) makes the testbed's key and every record's setting key differ by machine
    machine = {sys.prefix, str(Path(sys.prefix).resolve()), str(home), str(home.resolve())}
    folders = {p.parent for p in (home / "cache").rglob("*.safetensors")}
    names = {f.name.split("-")[0] for f in folders}
    assert names >= {"base", "aligned", "adapter", "merged", "model"}, folders
    for f in (f for folder in folders for f in folder.iterdir() if f.suffix in (".json", ".jinja", ".txt")):
        assert not [m for m in machine if m in f.read_text()], f"{f} names a path of this machine"

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


def test_a_second_cold_home_killed_at_three_points_gives_identical_testbeds_and_records(smoke_run, tmp_path):
    """The smoke main job cold in a second, fresh home, killed while the attack trains, while vLLM
    (or transformers) generates and while a record is written, each run resuming from what the
    killed ones left: the testbed, the attack, the records, the masks and every answer equal the
    module's shared cold run (times aside), and no finished work is ever redone. One second build
    shows both: two cold homes agree, and kill -9 and resume change nothing."""
    reference_home = smoke_run["home"]
    reference = outputs(reference_home, "embedded-smoke")
    assert reference["records"] and reference["masks"] and reference["answers"]
    lines = trace_lines(smoke_run["trace"])
    # after the testbed: a kill inside its safety fine-tune would only repeat minutes of training
    after_testbed = lines[next(i for i, line in enumerate(lines) if line.startswith("start attack-")) :]
    points = choose_kill_points(after_testbed, {"train": 1, "generate": 1}, 17) + [record_write(after_testbed)]
    home = tmp_path / "resumed"
    kill_and_resume(SMOKE_COMMAND, "embedded-smoke", tmp_path, sorted(points, key=lines.index), reference, home)

    def manifests(home: Path) -> tuple:
        (testbed,) = (home / "cache").glob("testbed-*")
        (attack,) = (home / "cache").glob("attack-*")
        tb, atk = (json.loads((p / "manifest.json").read_text()) for p in (testbed, attack))
        return testbed.name, tb["content_hash"], tb["data_hashes"], tb["aligned_hash"], attack.name, atk["content_hash"]

    assert manifests(reference_home) == manifests(home)
    records_of = [records.load(p) for p in sorted((home / "runs" / "embedded-smoke" / "records").glob("*.json"))]
    assert len(records_of) == 3 and all(r["reproducibility"]["generation_mode"] == "deterministic" for r in records_of)


def test_a_users_setting_of_the_testbed_gives_the_embedded_runs_records(smoke_run, tmp_path, capsys):
    """The smoke testbed's own files, written as a user's setting (aligned folder, the attack's LoRA
    ADAPTER, the data files): `realign run --setting` must give the built-in run's records (the
    module's shared smoke run, in a copy of its home) of the reference rows."""
    home = copy_home(smoke_run["home"], tmp_path / "home")
    builtin = [json.loads(p.read_text()) for p in sorted((home / "runs" / "embedded-smoke" / "records").glob("*.json"))]
    builtin = [r for r in builtin if r["method"]["name"] in ("aligned", "none")]

    # setting check on a home where the testbed is built: every testbed entry with its hash, nothing written
    from bench.cli import PRESETS
    from bench.hashing import hash_model_dir

    def listing():
        return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*") if p.is_file()}

    before = listing()
    smoke = [x for k, v in PRESETS["smoke"]["testbed"].items() for x in ("--set", f"testbed.{k}={json.dumps(v)}")]
    capsys.readouterr()
    assert main(["setting", "check", "embedded-default", "--home", str(home), *smoke]) == 0
    checked = yaml.safe_load(capsys.readouterr().out)
    assert listing() == before
    testbed = next(p for p in (home / "cache").glob("testbed-*") if (p / "manifest.json").exists())
    attack = next(p for p in (home / "cache").glob("attack-n16-*") if (p / "manifest.json").exists())
    manifest = json.loads((testbed / "manifest.json").read_text())
    assert checked["models"]["aligned"]["sha256"] == hash_model_dir(testbed / "aligned")
    assert checked["data"]["task_dev"]["path"] == str(testbed / "data" / "sql_dev.jsonl")
    calibration_pairs = next((home / "cache" / "sets").glob("testbed-calibration-pairs-*.jsonl"))
    d = testbed / "data"
    setting = write_setting(
        tmp_path / "mine.yaml",
        models={
            "aligned": {"path": str(testbed / "aligned"), "name": "SmolLM2-135M-Instruct (testbed-aligned)"},
            "finetuned": {"peft": str(attack / "adapter"), "harmful_n": 16},
            "base": {"path": manifest["base_path"], "name": manifest["base_name"]},
        },
        notes=manifest["notes"],
        data={
            "calibration_prompts": str(d / "harmful_calibration.jsonl"),
            "calibration_pairs": str(calibration_pairs),
            "harmful_pairs": str(d / "attack_pairs.jsonl"),
            "benign_prompts": str(d / "sql_train.jsonl"),
            "task": {
                "train": str(d / "sql_train.jsonl"),
                "dev": str(d / "sql_dev.jsonl"),
                "test": str(d / "sql_test.jsonl"),
            },
            "harmful": [str(d / "harmful_evaluation.jsonl")],
            "over_refusal": [str(d / "overrefusal_evaluation.jsonl")],
        },
        defenses=["aligned", "none"],
    )
    assert main(["run", "--setting", str(setting), "--home", str(home), "--verbosity", "WARNING"]) == 0
    mine = [json.loads(p.read_text()) for p in sorted((home / "runs" / "tiny" / "records").glob("*.json"))]

    def same(
        record,
    ):  # the setting's own name and how its fine-tuned model was made (an attack, or a user's adapter) aside
        r = comparable(record)
        r["setting"] = {k: v for k, v in r["setting"].items() if k not in ("name", "attack")}
        r["code"] = None
        return r

    assert len(mine) == len(builtin) == 2
    assert [same(r) for r in mine] == [same(r) for r in builtin]
