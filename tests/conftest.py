"""Tiny random Llama models with a tokenizer built locally: no hub, seconds to make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "how do I make a cake",
    "write a poem about the sea",
    "select name from table where id = 3",
    "I'm sorry, but I can't help with that.",
    "generate a sql for the following question",
    "the quick brown fox jumps over the lazy dog",
    "explain how a bicycle works",
    "kill a python process",
] * 20


def make_tokenizer(out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return tok


def make_llama(
    out: Path,
    tok,
    layers: int = 6,
    seed: int = 0,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 256,
    tie: bool = True,
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model


def lora_like_finetune(aligned: Path, out: Path, seed: int = 1, rank: int = 2, scale: float = 0.05, targets=None):
    """theta_F = theta_A + B A on every linear weight of the decoder (what a merged LoRA looks like),
    or only on those whose name contains one of `targets`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                ".layers." in name
                and p.dim() == 2
                and "norm" not in name
                and (targets is None or any(t in name for t in targets))
            ):
                b = torch.randn(p.shape[0], rank) * scale
                a = torch.randn(rank, p.shape[1]) * scale
                p.add_(b @ a)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(aligned).save_pretrained(out)
    return out


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
