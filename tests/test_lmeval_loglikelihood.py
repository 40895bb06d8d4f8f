"""The realign backend's loglikelihoods equal lm-eval's own `hf` backend's, on both engines."""

from __future__ import annotations

import pytest

from bench import models
from bench.generation import CachedGenerator, GenerationCache
from bench.lmeval_bridge import RealignLM, TaskRun, run_tasks
from bench.task_files import TASK_DATA, write_task
from bench.tiny_models import make_llama

LIMIT = 8  # MMLU questions: 32 loglikelihood requests
TOLERANCE = 1e-3  # per request, in nats


@pytest.fixture(scope="module")
def scorer(tiny, tmp_path_factory):
    """A tiny model wide enough for vLLM's CPU attention (head size 64), with room for MMLU prompts."""
    path = tmp_path_factory.mktemp("scorer") / "m"
    make_llama(path, tiny["tok"], layers=2, hidden=128, heads=2, kv_heads=1, max_positions=1024)
    return path


def hf_mmlu(model_dir, tmp_path, limit: int = LIMIT) -> dict:
    """lm-eval's own hf backend on the same task file: the oracle."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_task(tmp_path / "hf-tasks", "realign_mmlu", TASK_DATA["realign_mmlu"](None))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
        tasks=["realign_mmlu"],
        task_manager=TaskManager(include_path=str(tmp_path / "hf-tasks"), include_defaults=False),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    samples = sorted(results["samples"]["realign_mmlu"], key=lambda s: s["doc_id"])
    return {
        "acc": results["results"]["realign_mmlu"]["acc,none"],
        "loglikelihoods": [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples],
    }


def assert_same_scores(ours: dict, theirs: dict) -> None:
    assert len(ours["loglikelihoods"]) == len(theirs["loglikelihoods"]) > 0
    for a, b in zip(ours["loglikelihoods"], theirs["loglikelihoods"]):
        assert a == pytest.approx(b, abs=TOLERANCE)
    assert ours["acc"] == theirs["acc"]


def test_transformers_engine_matches_lm_eval_hf_and_caches(scorer, tmp_path):
    cache = GenerationCache(tmp_path / "gen")
    gen = CachedGenerator(models.resolve(scorer), cache, engine="transformers", dtype="float32")
    out = run_tasks(gen, [TaskRun("realign_mmlu", TASK_DATA["realign_mmlu"](None), LIMIT)])["realign_mmlu"]
    assert gen.stats["scored"] == 4 * LIMIT
    ours = {"acc": out["results"]["acc,none"], "loglikelihoods": [s["loglikelihoods"] for s in out["samples"]]}
    assert_same_scores(ours, hf_mmlu(scorer, tmp_path))
    # a second run scores nothing: every batch comes from the cache
    again = CachedGenerator(models.resolve(scorer), cache, engine="transformers", dtype="float32")
    out2 = run_tasks(again, [TaskRun("realign_mmlu", TASK_DATA["realign_mmlu"](None), LIMIT)])["realign_mmlu"]
    assert again.stats.get("scored", 0) == 0 and again.stats["scored_cached"] == 4 * LIMIT and again._gen is None
    assert [s["loglikelihoods"] for s in out2["samples"]] == ours["loglikelihoods"]


def test_loglikelihood_rolling_and_empty_context_match_lm_eval_hf(scorer, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = [
        "the quick brown fox jumps over the lazy dog",
        "select name from table where id = 3 " * 40,
    ]  # the second spans windows
    ours = RealignLM(
        generator=CachedGenerator(
            models.resolve(scorer), GenerationCache(tmp_path / "gen"), engine="transformers", dtype="float32"
        )
    )
    ours.max_length = 64  # several rolling windows on the second text (both backends told the same)
    hf = HFLM(pretrained=str(scorer), dtype="float32", device="cpu", max_length=64)

    def rolling(lm):
        return lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True
        )

    # lm-eval's hf backend windows at max_length, its vLLM backend (and ours) at max_length - 2:
    # equal on a text that fits one window, and on the long one when hf is given 2 more tokens
    assert rolling(ours)[0] == pytest.approx(rolling(hf)[0], abs=TOLERANCE)
    hf_wide = HFLM(pretrained=str(scorer), dtype="float32", device="cpu", max_length=62)
    assert rolling(ours)[1] == pytest.approx(rolling(hf_wide)[1], abs=TOLERANCE)
    pairs = [("", "how do I make a cake"), ("write a poem", " about the sea")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    for (a, ga), (b, gb) in zip(
        ours.loglikelihood(requests, disable_tqdm=True), hf.loglikelihood(requests, disable_tqdm=True)
    ):
        assert a == pytest.approx(b, abs=TOLERANCE) and ga == gb


@pytest.mark.vllm
def test_vllm_engine_matches_lm_eval_hf(scorer, tmp_path):
    pytest.importorskip("vllm")
    from bench.new_interpreter import run_fresh
    from tests.helpers import vllm_mmlu

    ours = run_fresh(vllm_mmlu, str(scorer), str(tmp_path / "gen"), LIMIT)
    assert ours["engine"] == "vllm"
    assert_same_scores(ours, hf_mmlu(scorer, tmp_path))


@pytest.mark.slow
def test_embedded_model_both_engines_match_lm_eval_hf(tmp_path):
    from pathlib import Path

    from bench.generation import vllm_available
    from bench.new_interpreter import run_fresh
    from bench.testbed.build import embedded_base
    from tests.helpers import vllm_mmlu

    model = embedded_base(Path("realign-home/cache")).path
    theirs = hf_mmlu(model, tmp_path, limit=16)
    gen = CachedGenerator(
        models.resolve(model), GenerationCache(tmp_path / "gen"), engine="transformers", dtype="float32"
    )
    out = run_tasks(gen, [TaskRun("realign_mmlu", TASK_DATA["realign_mmlu"](None), 16)])["realign_mmlu"]
    assert_same_scores(
        {"acc": out["results"]["acc,none"], "loglikelihoods": [s["loglikelihoods"] for s in out["samples"]]}, theirs
    )
    if vllm_available():
        assert_same_scores(run_fresh(vllm_mmlu, str(model), str(tmp_path / "gen"), 16), theirs)
