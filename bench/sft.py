"""Supervised fine-tuning on (prompt, response) pairs with the transformers Trainer.

Used by the testbed's safety fine-tune (full weights or LoRA), by the attack stage (LoRA) and by
defenses that need an extra fine-tune (RESTA's un-aligned model). The loss covers response tokens
only; each prompt is rendered with the model's chat template, exactly as at generation time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import models


@dataclass
class SFTConfig:
    """Hyper-parameters of one fine-tune. Every field is recorded in the stage's manifest."""

    method: str = field(default="lora", metadata={"help": "'lora' (peft adapter, merged after) or 'full'"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimiser steps (-1: use epochs)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (linear decay, no warm-up)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per optimiser step"})
    max_length: int = field(default=192, metadata={"help": "tokens per example; longer responses are cut"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast with fp32 master weights (CPU with AVX512-BF16, or GPU)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    seed: int = field(default=0, metadata={"help": "seed of data order and initialisation"})

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError(f"SFTConfig.method must be 'lora' or 'full', got {self.method!r}")
        if self.lr <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("SFTConfig: lr > 0, batch_size >= 1 and max_length >= 16 are required")

    def to_dict(self) -> dict:
        return asdict(self)


def _bf16_ok() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags  # else bf16 autocast is slower than fp32


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """input_ids + labels with the prompt (chat template, assistant header included) masked."""
    eot = models.end_of_turn(tokenizer)
    out = []
    for pair in pairs:
        prompt_ids = tokenizer(models.render_prompt(tokenizer, pair["prompt"]), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(pair["response"].strip() + eot, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        if all(label == -100 for label in labels):
            continue  # the prompt alone fills max_length: nothing to learn from this pair
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def train(model, tokenizer, pairs: list[dict], config: SFTConfig, work_dir: Path, progress: bool = True):
    """Fine-tune `model` in place (full) or return a peft model (LoRA). Returns (model, log)."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(config.seed)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=models.LORA_TARGETS,
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    tokenizer.padding_side = "right"  # training pads on the right; generation sets left again
    data = Dataset.from_list(tokenize_pairs(tokenizer, pairs, config.max_length))
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=max(1, steps_per_epoch // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=config.bf16 and _bf16_ok(),
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    result = trainer.train()
    tokenizer.padding_side = "left"
    model.eval()
    log = {
        "examples": len(data),
        "steps": result.global_step,
        "train_loss": round(float(result.training_loss), 4),
        "loss_curve": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 1),
    }
    return model, log
