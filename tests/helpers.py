"""Functions tests run in a fresh interpreter (vLLM needs one)."""


def vllm_generate(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    from bench import models
    from bench.generation import Sampling, VLLMGenerator

    gen = VLLMGenerator(models.resolve(model_dir), dtype="float32", max_model_len=256)
    return gen.generate(prompts, Sampling(max_new_tokens=max_new_tokens))


def vllm_mmlu(model_dir: str, cache_dir: str, limit: int) -> dict:
    """realign_mmlu through the realign backend on vLLM (fp32): per-request loglikelihoods and accuracy."""
    from pathlib import Path

    from bench import models
    from bench.generation import CachedGenerator, GenerationCache
    from bench.lmeval_bridge import TaskRun, run_tasks
    from bench.task_files import TASK_DATA

    gen = CachedGenerator(
        models.resolve(model_dir), GenerationCache(Path(cache_dir)), engine="vllm", dtype="float32", max_model_len=1024
    )
    with gen:
        out = run_tasks(gen, [TaskRun("realign_mmlu", TASK_DATA["realign_mmlu"](None), limit)])["realign_mmlu"]
    return {
        "engine": gen.engine_used,
        "acc": out["results"]["acc,none"],
        "loglikelihoods": [s["loglikelihoods"] for s in out["samples"]],
    }


def fail_writing(path: str) -> None:
    """A write that fails as on a full disk (for the bad-input catalogue)."""
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
