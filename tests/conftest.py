"""Shared fixtures: tiny random model pairs (bench.tiny_models builds them), one Ray cluster, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tiny_models import lora_like_finetune, make_llama, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """The slowest module (the shared smoke run, minutes) first: under pytest-xdist (`--dist
    loadscope`, pyproject.toml) it then starts at once on one worker while the other takes the rest,
    instead of starting after others and finishing alone."""
    items.sort(key=lambda item: item.module.__name__ != "tests.test_end_to_end")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny aligned/fine-tuned pair: {'aligned': dir, 'finetuned': dir, 'tok': tokenizer}."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer(root / "tok")
    make_llama(root / "aligned", tok)
    lora_like_finetune(root / "aligned", root / "finetuned")
    return {"aligned": root / "aligned", "finetuned": root / "finetuned", "tok": tok, "root": root}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny):
    """base -> aligned (a small full update) -> LoRA fine-tune (real peft adapter, random B) -> merged."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("tiny_lora")
    make_llama(root / "base", tiny["tok"], seed=3)
    lora_like_finetune(root / "base", root / "aligned", seed=4, rank=8, scale=0.1)
    random_lora(
        root, tiny["tok"], LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"), seed=5
    )
    return {
        "base": root / "base",
        "aligned": root / "aligned",
        "finetuned": root / "finetuned",
        "adapter": root / "adapter",
        "root": root,
    }


def random_lora(root: Path, tok, config, seed: int) -> None:
    """A real peft adapter on root/aligned with random B (a fresh LoRA's B is zero): writes
    root/adapter and the merged root/finetuned."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "finetuned", safe_serialization=True)
    tok.save_pretrained(root / "finetuned")


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE real local Ray cluster for the whole test session (Ray 2.60 has no local mode). It declares
    two GPUs: Ray only schedules them (gives each task its ids); nothing touches CUDA."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def realign_cli(command: list[str], home: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`realign COMMAND --home HOME` in a fresh interpreter, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1") | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *command, "--home", str(home)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        **kwargs,
    )
