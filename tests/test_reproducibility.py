"""Reproducible to the bit: fixed generation batches, a cache key that names one content, stage
manifests checked on reuse, and the board gate's warning when the two sides were made differently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import models, reproducibility
from bench.atomic import verified_manifest
from bench.generation import BATCH_TARGET, CachedGenerator, GenerationCache, Sampling, fixed_batches
from bench.hashing import hash_value

PROMPTS = [
    f"question number {i}: how do I {w}?"
    for i, w in enumerate(["bake bread", "fix a bike", "learn sql", "sort a list"] * 250)
]


@pytest.mark.parametrize("target", [64, BATCH_TARGET])
def test_fixed_batches_depend_on_content_only(target):
    batches = fixed_batches(PROMPTS, target)
    assert sorted(p for b in batches for p in b) == sorted(set(PROMPTS))  # every distinct prompt once
    assert fixed_batches(PROMPTS[::-1] + PROMPTS[:5], target) == batches  # order and duplicates do not matter
    assert all(len(b) <= 2 * target for b in batches) and len(batches) > 1
    # one more prompt changes the batch it joins (and the one after, where a batch was cut at the cap),
    # not every batch after it
    grown = fixed_batches(PROMPTS + ["a brand new question"], target)
    changed = [b for b in grown if b not in batches]
    assert len(batches) >= len(PROMPTS) // (2 * target) and 1 <= len(changed) <= 3


def test_batch_target_decides_the_batches_and_the_keys(tiny, tmp_path):
    """The setting's generation.batch_target reaches the generator: other batches, other cache keys."""
    cache = GenerationCache(tmp_path / "gen")
    handle = models.resolve(tiny["aligned"])
    sampling = Sampling(max_new_tokens=3)
    prompts = PROMPTS[:12]
    with CachedGenerator(handle, cache, engine="transformers", batch_target=2) as small:
        small.generate(prompts, sampling)
    assert small.stats["batches_generated"] == len(fixed_batches(prompts, 2)) > 1
    with CachedGenerator(handle, cache, engine="transformers") as default:
        default.generate(prompts, sampling)  # one batch at the default target: nothing reused from the small ones
    assert default.stats["generated"] == 12 and default.stats["batches_generated"] == 1


def test_cache_key_names_the_batch(tiny, tmp_path):
    """A greedy answer depends on its batch-mates, so an answer is reused only for the same batch."""
    cache = GenerationCache(tmp_path / "gen")
    handle = models.resolve(tiny["aligned"])
    sampling = Sampling(max_new_tokens=5)
    prompts = ["how do I make a cake", "write a poem about the sea", "kill a python process"]
    with CachedGenerator(handle, cache, engine="transformers") as gen:
        first = gen.generate(prompts, sampling)
    with CachedGenerator(handle, cache, engine="transformers") as again:
        assert again.generate(prompts[::-1], sampling) == first[::-1]  # the same batch: no generation
        assert again.stats["generated"] == 0
        again.generate(prompts[:2], sampling)  # another batch: generated, never taken from the first
        assert again.stats["generated"] == 2
    # the machine and the mode are part of the key
    ident = again._identity(sampling)
    assert (
        ident["mode"] == reproducibility.DETERMINISTIC
        and ident["compute"]["threads"] >= 1
        and ident["compute"]["torch"]
    )
    fast = CachedGenerator(handle, cache, engine="transformers", mode=reproducibility.FAST)._identity(sampling)
    assert GenerationCache.key(fast, prompts) != GenerationCache.key(ident, prompts)


def test_unknown_generation_mode_is_one_clear_error(tiny, tmp_path):
    from bench.errors import UserError

    with pytest.raises(UserError, match="generation mode must be one of"):
        CachedGenerator(models.resolve(tiny["aligned"]), GenerationCache(tmp_path), mode="sometimes")


def _stage(root: Path, text: str) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.jsonl").write_text(text)
    return root


def _content(root: Path) -> dict:
    return {"a": (root / "data" / "a.jsonl").read_text()}


def test_stage_manifest_verified_on_reuse(tmp_path):
    said: list[str] = []
    good = _stage(tmp_path / "testbed-good", "x\n")
    (good / "manifest.json").write_text(json.dumps({"content_hash": hash_value(_content(good)), "key": "k"}))
    assert verified_manifest(good, _content, said.append)["key"] == "k" and not said

    # the same key holding other content (edited, or a different build): removed, said in one line
    (good / "data" / "a.jsonl").write_text("y\n")
    assert verified_manifest(good, _content, said.append) is None
    assert not good.exists() and said == [
        "testbed-good: its files no longer match the content hash in its manifest; rebuilding it"
    ]

    # a stage made by older code has no content hash: its content cannot be vouched for
    old = _stage(tmp_path / "testbed-old", "x\n")
    (old / "manifest.json").write_text(json.dumps({"key": "k"}))
    assert verified_manifest(old, _content, said.append) is None and not old.exists()
    assert "made by older code" in said[-1]
    # a stage folder without its manifest (deleted by hand, a cache copy cut short): removed, so that
    # the next build is kept (building_dir keeps a folder that is already there)
    bare = _stage(tmp_path / "attack-bare", "x\n")
    assert verified_manifest(bare, _content, said.append) is None and not bare.exists()
    assert said[-1] == "attack-bare: has no manifest.json (a finished stage always has one); rebuilding it"
    assert not list(tmp_path.iterdir())  # nothing left behind, not even the renamed-aside copies
    assert verified_manifest(tmp_path / "never-built", _content, said.append) is None


def test_board_check_warns_when_generation_modes_differ(tmp_path):
    from bench.leaderboard.check import check

    published = sorted(Path("leaderboards/embedded-default/records").glob("*.json"))[:3]
    sides = {}
    for side, mode in (("published", reproducibility.DETERMINISTIC), ("new", reproducibility.FAST)):
        folder = tmp_path / side / "records"
        folder.mkdir(parents=True)
        for path in published:
            record = json.loads(path.read_text())
            record["reproducibility"] = {"generation_mode": mode}
            (folder / path.name).write_text(json.dumps(record))
        sides[side] = folder
    code, report = check([sides["new"]], sides["published"].parent)
    first = report.splitlines()[0]
    assert code == 0 and first.startswith("warning: new records were generated in mode 'fast-nondeterministic'")
    assert report.count("warning:") == 1
    code, report = check([sides["published"]], sides["published"].parent)
    assert "warning" not in report


SCRIPT = """
import json, sys
from bench import models
from bench.generation import CachedGenerator, GenerationCache, Sampling

if __name__ == "__main__":
    model, cache, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    gen = CachedGenerator(models.resolve(model), GenerationCache(cache), engine="vllm", max_model_len=256)
    print(json.dumps(gen.generate(prompts, Sampling(max_new_tokens=16))))
    # no close(): the process must still exit by itself
"""


@pytest.mark.vllm
def test_vllm_deterministic_answers_repeat_and_the_process_exits(tiny, tmp_path):
    pytest.importorskip("vllm")
    from bench.tiny_models import make_llama

    make_llama(tmp_path / "m", tiny["tok"], layers=2, hidden=128, heads=2, kv_heads=1)
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    prompts = [f"write a poem about the sea {i}" for i in range(40)]
    answers = []
    for run in range(2):  # two fresh processes, two empty caches
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "m"), str(tmp_path / f"cache{run}"), json.dumps(prompts)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=os.getcwd(),
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert answers[0] == answers[1] and len(answers[0]) == 40


def test_engine_options_that_change_answers_key_them(tiny, tmp_path):
    """vLLM's options that change an answer (max_num_seqs batches it, tensor parallelism splits its
    sums, max_model_len cuts its prompt) name the answer's cache key where they are not the defaults;
    at the defaults the key is the one answers were cached under before. The key before an engine
    starts equals the started (or pooled) generator's own, so a cached batch is found either way."""
    from bench.generation import VLLMGenerator, vllm_answer_options

    handle, sampling = models.resolve(tiny["aligned"]), Sampling(max_new_tokens=4)
    cache = GenerationCache(tmp_path)
    plain = CachedGenerator(handle, cache, engine="vllm")._identity(sampling)
    assert "engine_options" not in plain and vllm_answer_options() == {}
    options = {"engine_options": {"max_num_seqs": 8}, "tensor_parallel_size": 2, "max_model_len": 1024}
    keyed = CachedGenerator(handle, cache, engine="vllm", **options)._identity(sampling)
    assert keyed["engine_options"] == {"tensor_parallel_size": 2, "max_model_len": 1024, "max_num_seqs": 8}
    assert {k: v for k, v in keyed.items() if k != "engine_options"} == plain
    # a generator on a live engine (here a stand-in: no engine starts) keys its answers the same way
    on_engine = VLLMGenerator(handle, "bfloat16", llm=object(), **options)
    assert on_engine.identity(sampling) == keyed
