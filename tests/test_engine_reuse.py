"""One engine for many rows (bench.engine_pool): which models may share an engine, answers equal to
a fresh engine's after swapping weights, the fallback said once, and the kept interpreter that
carries the engine from row to row (bench.new_interpreter.Interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from bench import models
from bench.engine_pool import EnginePool, engine_key
from bench.generation import CachedGenerator, GenerationCache, Sampling
from bench.new_interpreter import Interpreter, run_fresh
from bench.tiny_models import lora_like_finetune, make_llama

PROMPTS = [f"write a poem about the sea {i}" for i in range(24)] + ["how do I make a cake", "kill a python process"]


# ------------------------------------------------------------------------------------ the key


def test_rows_of_one_family_share_a_key_and_anything_the_engine_reads_splits_it(tmp_path, tiny):
    aligned, finetuned = models.resolve(tiny["aligned"]), models.resolve(tiny["finetuned"])
    options = {"max_model_len": 256, "mode": "deterministic", "trust_remote_code": False}
    key = engine_key(aligned, "bfloat16", options)
    assert engine_key(finetuned, "bfloat16", options) == key  # other weights, same architecture and tokenizer
    assert engine_key(aligned, "float32", options) != key
    assert engine_key(aligned, "bfloat16", options | {"max_model_len": 128}) != key

    def variant(name: str, change) -> str:
        folder = tmp_path / name
        shutil.copytree(tiny["aligned"], folder)
        change(folder)
        return engine_key(models.resolve(folder), "bfloat16", options)

    def edit_config(**fields):
        def change(folder: Path):
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(config | fields))

        return change

    # where and by which library version it was saved is no architecture
    assert variant("renamed", edit_config(_name_or_path="elsewhere", transformers_version="0.0")) == key
    assert variant("rope", edit_config(rope_theta=1234.0)) != key
    assert variant("template", lambda f: (f / "chat_template.jinja").write_text("{{ messages }}")) != key
    deeper = tmp_path / "deeper"
    make_llama(deeper, tiny["tok"], layers=7)
    assert engine_key(models.resolve(deeper), "bfloat16", options) != key


def test_rows_with_the_same_tokenizer_files_share_one_tokenizer_and_any_difference_loads_its_own(tmp_path, tiny):
    pool = EnginePool()
    first = pool.tokenizer(models.resolve(tiny["aligned"]))
    assert pool.tokenizer(models.resolve(tiny["finetuned"])) is first  # other weights, the same files
    changed = tmp_path / "changed"
    shutil.copytree(tiny["finetuned"], changed)
    fields = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps(fields | {"model_max_length": 77}))
    own = pool.tokenizer(models.resolve(changed))
    assert own is not first and own.model_max_length == 77 and first.model_max_length != 77
    # the same files under another chat format: another tokenizer, and the first keeps its format
    chat = models.ChatFormat(system_prompt="Answer briefly.")
    formatted = pool.tokenizer(models.resolve(changed), chat=chat)
    assert formatted is not own and formatted.realign_system_prompt == "Answer briefly."
    assert getattr(own, "realign_system_prompt", None) is None
    assert pool.tokenizer(models.resolve(changed), chat=chat) is formatted
    assert pool.tokenizer(models.resolve(tiny["aligned"])) is first  # kept while later rows took others


# --------------------------------------------------------------------------- fallback, said once


def test_the_transformers_engine_says_once_that_rows_do_not_share_an_engine(tmp_path, tiny, capsys):
    pool = EnginePool()
    answers = {}
    for name in ("aligned", "finetuned", "aligned"):
        with CachedGenerator(
            models.resolve(tiny[name]),
            GenerationCache(tmp_path / f"pooled-{len(answers)}"),
            engine="transformers",
            pool=pool,
        ) as gen:
            answers[len(answers)] = gen.generate(PROMPTS[:4], Sampling(max_new_tokens=6))
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "engine reuse off" in line]
    assert said == [
        "realign: engine reuse off: the transformers engine has no engine to share (it loads each row's model); "
        "one engine a row"
    ]
    with CachedGenerator(
        models.resolve(tiny["aligned"]), GenerationCache(tmp_path / "alone"), engine="transformers"
    ) as g:
        assert g.generate(PROMPTS[:4], Sampling(max_new_tokens=6)) == answers[0] == answers[2]
    assert "engine reuse off" not in capsys.readouterr().err
    assert pool.stats["engine_starts"] == 0


# ------------------------------------------------------------------------------ kept interpreter

_calls = []


def remember(value):
    """Runs in the kept interpreter: what earlier calls left in this module stays there."""
    _calls.append(value)
    return os.getpid(), list(_calls)


def die():
    os._exit(3)


def test_the_kept_interpreter_keeps_state_between_calls_and_survives_a_death():
    with Interpreter() as worker:
        pid, seen = worker.call(remember, "a")
        assert seen == ["a"]
        assert worker.call(remember, "b") == (pid, ["a", "b"])
        with pytest.raises(RuntimeError, match="died in its fresh process .exit code 3"):
            worker.call(die)
        again, seen = worker.call(remember, "c")  # a new interpreter, empty-handed
        assert again != pid and seen == ["c"]
    assert pid != os.getpid()


# ---------------------------------------------------------------------- vLLM: swap B in, then A


def shared_then_fresh(root: str) -> dict:
    """In a fresh interpreter: A, B, A through one pool (each into an empty cache), then A and B on
    an engine of their own; answers, scores, the cache files' rows and the pool's counters."""
    root_path = Path(root)
    sampling = Sampling(max_new_tokens=12)
    ll_requests = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13])]
    out: dict = {"answers": {}, "scores": {}, "cache_rows": {}}
    pool = EnginePool()
    runs = [("shared_a1", "a", pool), ("shared_b", "b", pool), ("shared_a2", "a", pool), ("fresh_a", "a", None)]
    runs.append(("fresh_b", "b", None))
    for label, model, shared in runs:
        cache = GenerationCache(root_path / label)
        with CachedGenerator(
            models.resolve(root_path / model), cache, engine="vllm", max_model_len=256, pool=shared
        ) as gen:
            out["answers"][label] = gen.generate(PROMPTS, sampling)
            out["scores"][label] = gen.loglikelihoods(ll_requests)
            out.setdefault("engine_has_the_rows_tokenizer", []).append(gen._gen.tokenizer is gen.tokenizer)
            out.setdefault("took_an_engine", {})[label] = gen.started_engine
        with sqlite3.connect(root_path / label / GenerationCache.FILE) as db:
            out["cache_rows"][label] = sorted(db.execute("SELECT key, answers FROM batches").fetchall())
    # A again through the pool, from the cache A filled: every batch is found, so no engine is taken
    # (nothing reloaded, and the row's cost names no engine: bench.evaluate)
    handle = models.resolve(root_path / "a")
    with CachedGenerator(
        handle, GenerationCache(root_path / "shared_a1"), engine="vllm", max_model_len=256, pool=pool
    ) as gen:
        out["answers"]["cached_a"] = gen.generate(PROMPTS, sampling)
        out["took_an_engine"]["cached_a"] = gen.started_engine
    out["stats"] = dict(pool.stats)
    pool.close()
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_a_shared_engine_after_swapping_weights_answers_as_a_fresh_engine(tmp_path, tiny):
    pytest.importorskip("vllm")
    make_llama(tmp_path / "a", tiny["tok"], layers=2, hidden=128, heads=2, kv_heads=1)
    lora_like_finetune(tmp_path / "a", tmp_path / "b", scale=0.5)
    out = run_fresh(shared_then_fresh, str(tmp_path))
    answers, scores, rows = out["answers"], out["scores"], out["cache_rows"]
    assert out["stats"]["engine_starts"] == 1 and out["stats"]["reloads"] == 2
    assert answers["cached_a"] == answers["shared_a1"]
    assert out["took_an_engine"] == {label: True for label in answers if label != "cached_a"} | {"cached_a": False}
    assert out["engine_has_the_rows_tokenizer"] == [True] * 5  # loaded once a row, pooled engine or not
    assert answers["shared_a1"] == answers["shared_a2"] == answers["fresh_a"]
    assert answers["shared_b"] == answers["fresh_b"]
    assert scores["shared_a1"] == scores["shared_a2"] == scores["fresh_a"]
    assert scores["shared_b"] == scores["fresh_b"]
    # the swap mattered: B answers otherwise (else this test could not fail)
    assert sum(a != b for a, b in zip(answers["shared_a1"], answers["shared_b"])) > len(PROMPTS) // 2
    # nothing about the cache changes: the same keys hold the same answers
    assert rows["shared_b"] == rows["fresh_b"] and rows["shared_a2"] == rows["fresh_a"]


# ------------------------------------------------------------------------------------ the runner


@pytest.mark.slow
def test_a_board_run_evaluates_its_rows_in_one_interpreter_and_the_switch_changes_no_record(tmp_path, tiny_lora, capfd):
    from bench.cli import main
    from bench.settings import load_setting
    from bench.settings.resolve import resolve
    from tests.test_settings import data_files, write_setting

    setting = write_setting(
        tmp_path / "tiny.yaml",
        models={"aligned": str(tiny_lora["aligned"]), "finetuned": str(tiny_lora["finetuned"])},
        data=data_files(tmp_path / "data"),
        defenses=["aligned", "none"],
        generation={"engine": "transformers", "limit": 2},
    )
    described = [
        resolve(load_setting(setting, [f"generation.reuse_engine={flag}"]), tmp_path / "cache").description()
        for flag in ("true", "false")
    ]
    assert described[0] == described[1]  # so the records' ids are the same either way

    home = tmp_path / "home"
    capfd.readouterr()
    assert main(["run", "--setting", str(setting), "--home", str(home), "--verbosity", "WARNING"]) == 0
    err = capfd.readouterr().err
    # both rows were evaluated in one interpreter: its pool said the fallback once, not once a row
    assert err.count("engine reuse off: the transformers engine") == 1, err
    assert len(list((home / "runs" / "tiny" / "records").glob("*.samples.jsonl"))) == 2
