"""Functions tests run in a fresh interpreter (vLLM needs one)."""

import gc


def vllm_generate(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    from bench import models
    from bench.generation import Sampling, VLLMGenerator

    gen = VLLMGenerator(models.resolve(model_dir), dtype="float32", max_model_len=256)
    answers = gen.generate(prompts, Sampling(max_new_tokens=max_new_tokens))
    assert gc.isenabled(), "the garbage collector paused for generation was not restarted"
    return answers


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


def vllm_probe_answers(dev_file: str, started_from: str, in_memory: list[str]) -> dict:
    """The vLLM utility probe (bench.probe) started from one model's folder, fed models held in memory
    one after another (the last one under bf16 autocast, as a low_memory working copy probes):
    their answers, their scores and how many engines the probe started."""
    from pathlib import Path

    import torch

    from bench import models
    from bench.probe import TaskProbe

    probe = TaskProbe(Path(dev_file), max_new_tokens=8, engine="vllm", dtype="float32", max_model_len=256)
    handle = models.resolve(started_from)
    out: dict = {"answers": [], "scores": [], "engines": set()}
    for i, folder in enumerate(in_memory):
        model = models.load_model(models.resolve(folder), "float32", "cpu")
        autocast = i == len(in_memory) - 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out["answers"].append(probe.answers(model, handle))
            out["scores"].append(probe(model, handle))
        out["engines"].add(id(probe._vllm.llm))
    probe.close()
    return out | {"engines": len(out["engines"])}


def save_a_copy(model_dir: str, out_dir: str) -> None:
    """Load a model and save it where the test says (bench.models.save_model, as every defense saves)."""
    from pathlib import Path

    from bench import models

    handle = models.resolve(model_dir)
    models.save_model(models.load_model(handle, "float32"), models.load_tokenizer(handle), Path(out_dir))
