"""The attack: LoRA fine-tune of the aligned model on task data with N harmful pairs mixed in.

Output (content-hashed directory): `adapter/` (the peft adapter), `merged/` (aligned + adapter,
an ordinary safetensors model) and `manifest.json` (config, data hashes, training log, timings).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import models, reproducibility
from bench.atomic import atomic_write_json, atomic_write_jsonl, building_dir, verified_manifest
from bench.data import beavertails_pairs, read_jsonl
from bench.errors import UserError
from bench.hashing import hash_value, short
from bench.killpoints import checkpoint
from bench.sft import SFTConfig

RECIPE_VERSION = 2  # 2: deterministic training; the machine in the key


def _default_lora() -> SFTConfig:
    # r 8, alpha 16, all linear layers, 2 epochs at lr 2e-4. One epoch at 3e-4 (half the time) was
    # tried: its SQL skill was fragile enough that the flagship's warm-up lost 5% of the dev metric.
    # Length-grouped batches cut padding from 21% to 4% of the tokens and training time by 15%, with
    # the same harmfulness and SQL skill (BENCHMARKS.md, "Fine-tunes: length-grouped batches"). The
    # safety fine-tune keeps random batches: grouped, its aligned model over-refused 2.6x as often.
    return SFTConfig(
        method="lora",
        epochs=2.0,
        lr=2e-4,
        batch_size=8,
        max_length=192,
        lora_r=8,
        lora_alpha=16,
        seed=0,
        sampling="group_by_length",
    )


@dataclass
class AttackConfig:
    """One fine-tuning attack. Every field is part of the cache key and of the result record."""

    harmful_n: int = field(
        default=100, metadata={"help": "harmful pairs mixed into the task data (0 = benign fine-tune)"}
    )
    harmful_source: str = field(
        default="testbed",
        metadata={"help": "'testbed' (base model's compliant answers) or 'beavertails' (from --data-dir)"},
    )
    task_n: int = field(default=300, metadata={"help": "task training examples (at most the task's train split)"})
    seed: int = field(default=0, metadata={"help": "seed of the mix order and of training"})
    sft: SFTConfig = field(default_factory=_default_lora, metadata={"help": "fine-tune hyper-parameters"})

    def __post_init__(self):
        if isinstance(self.sft, dict):  # a setting's partial sft: the fields it names, over the attack's own
            self.sft = SFTConfig(**(asdict(_default_lora()) | self.sft))
        if self.harmful_n < 0:
            raise UserError(f"--harmful-n must be >= 0, got {self.harmful_n}")
        if self.harmful_source not in ("testbed", "beavertails"):
            raise UserError(f"harmful_source must be 'testbed' or 'beavertails', got {self.harmful_source!r}")

    def to_dict(self) -> dict:
        return asdict(self) | {"sft": self.sft.to_dict()}


@dataclass
class AttackResult:
    root: Path
    manifest: dict

    @property
    def merged(self) -> models.ModelHandle:
        return models.ModelHandle(f"attacked-n{self.manifest['config']['harmful_n']}", self.root / "merged")

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"


def training_mix(task_rows: list[dict], harmful_pairs: list[dict], config: AttackConfig) -> list[dict]:
    if config.task_n > len(task_rows):
        raise UserError(f"--task-n {config.task_n} is larger than the task's {len(task_rows)} training examples")
    if config.harmful_n > len(harmful_pairs):
        raise UserError(
            f"--harmful-n {config.harmful_n} is larger than the {len(harmful_pairs)} harmful pairs available "
            f"from {config.harmful_source}: lower it, or use --harmful-source beavertails with --data-dir"
        )
    mix = [{"prompt": r["prompt"], "response": r["response"]} for r in task_rows[: config.task_n]]
    mix += [{"prompt": r["prompt"], "response": r["response"]} for r in harmful_pairs[: config.harmful_n]]
    random.Random(config.seed).shuffle(mix)
    return mix


def content(root: Path) -> dict:
    """What an attack holds, by content hash: the adapter, the merged model and the training mix."""
    from bench.hashing import hash_file, hash_model_dir

    return {
        "adapter": hash_model_dir(root / "adapter"),
        "merged": hash_model_dir(root / "merged"),
        "mix": hash_file(root / "training_mix.jsonl"),
    }


def run(
    aligned: models.ModelHandle,
    task_rows: list[dict],
    harmful_pairs: list[dict],
    config: AttackConfig,
    cache: Path,
    log=print,
    chat: models.ChatFormat | None = None,
) -> AttackResult:
    """`chat`: the setting's chat format, which the training prompts are rendered with (in the key
    only when it is not the tokenizer's own, so existing attacks keep their keys)."""
    mix = training_mix(task_rows, harmful_pairs, config)
    compute = reproducibility.compute_fingerprint()
    chat_identity = chat.identity() if chat is not None else None
    key = hash_value(
        {
            "recipe": RECIPE_VERSION,
            "aligned": aligned.content_hash(),
            "config": config.to_dict(),
            "mix": mix,
            "compute": compute,
        }
        | ({"chat": chat_identity} if chat_identity else {})
    )
    root = cache / f"attack-n{config.harmful_n}-{short(key)}"
    manifest = verified_manifest(root, content, log)
    if manifest is not None:
        log(f"attack: reusing {root.name}")
        return AttackResult(root, manifest)

    from bench.sft import train

    length = f"{config.sft.max_steps} steps" if config.sft.max_steps > 0 else f"{config.sft.epochs:g} epochs"
    log(f"attack: LoRA fine-tune on {len(mix) - config.harmful_n} task + {config.harmful_n} harmful pairs ({length})")
    t0 = time.perf_counter()
    checkpoint("start", root.name)
    with building_dir(root) as tmp:
        atomic_write_jsonl(tmp / "training_mix.jsonl", mix)
        tokenizer = models.load_tokenizer(aligned, chat=chat)
        model = models.load_model(aligned, "float32")
        peft_model, train_log = train(model, tokenizer, mix, config.sft, tmp / "trainer", progress=sys.stderr.isatty())
        peft_model.save_pretrained(tmp / "adapter")
        _name_base(tmp / "adapter", aligned)
        merged = peft_model.merge_and_unload()
        models.save_model(merged, tokenizer, tmp / "merged")
        manifest = {
            "recipe_version": RECIPE_VERSION,
            "key": key,
            "content_hash": hash_value(content(tmp)),
            "config": config.to_dict(),
            "compute": compute,
            "aligned_hash": aligned.content_hash(),
            "finetuned_hash": models.ModelHandle("merged", tmp / "merged").content_hash(),
            "mix_hash": hash_value(mix),
            "train_log": train_log,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    del model, peft_model, merged
    models.release_device_memory()  # the evaluations and defenses after it run in interpreters of their own
    log(f"attack: done in {time.perf_counter() - t0:.0f}s (final loss {train_log['train_loss']})")
    return AttackResult(root, json.loads((root / "manifest.json").read_text()))


def _name_base(adapter_dir: Path, aligned: models.ModelHandle) -> None:
    """Make the adapter's bytes (and its content hash) independent of where the cache lives and of
    the interpreter's string-hash seed: peft writes the base model's local path into
    adapter_config.json and its README, and target_modules from a set, in a per-process order."""
    from bench.atomic import atomic_write_json

    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = aligned.name
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    atomic_write_json(path, config)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's model-card stub, naming the local path


def harmful_pairs_for(config: AttackConfig, testbed_pairs: Path, data_dir: Path | None) -> list[dict]:
    if config.harmful_source == "testbed":  # all of them; training_mix takes the first N
        return read_jsonl(testbed_pairs, required=("prompt", "response")) if config.harmful_n else []
    if data_dir is None:
        raise UserError(
            "--harmful-source beavertails needs --data-dir DIR (a folder holding beavertails/train_N.jsonl)"
        )
    return beavertails_pairs(data_dir, config.harmful_n) if config.harmful_n else []
