"""Supervised fine-tuning on (prompt, response) pairs with the transformers Trainer.

Used by the testbed's safety fine-tune (full weights or LoRA), by the attack stage (LoRA) and by
defenses that need an extra fine-tune (RESTA's un-aligned model). The loss covers response tokens
only; each prompt is rendered with the model's chat template, exactly as at generation time.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import models


@dataclass
class SFTConfig:
    """Hyper-parameters of one fine-tune. Every field is recorded in the stage's manifest."""

    method: str = field(default="lora", metadata={"help": "'lora' (peft adapter, merged after) or 'full'"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimiser steps (-1: use epochs)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (no warm-up)"})
    lr_scheduler: str = field(
        default="linear", metadata={"help": "'linear' (decay to 0 over the run) or 'constant' (RESTA's theta_U)"}
    )
    batch_size: int = field(default=8, metadata={"help": "pairs per optimiser step"})
    max_length: int = field(default=192, metadata={"help": "tokens per example; longer responses are cut"})
    bf16: bool = field(
        default=True, metadata={"help": "bf16 autocast with fp32 master weights (CPU with AVX512-BF16, or GPU)"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    seed: int = field(default=0, metadata={"help": "seed of data order and initialisation"})
    sampling: str = field(
        default="random",
        metadata={
            "help": "'random' (a shuffled order, each batch padded to its longest pair) or 'group_by_length' "
            "(the Trainer's length-grouped sampler: pairs of similar length batched together, less padding, "
            "another order and so another model; BENCHMARKS.md, 'Fine-tunes: length-grouped batches')"
        },
    )
    deterministic: bool = field(
        default=True,
        metadata={
            "help": "torch's deterministic algorithms (the Trainer's full_determinism): an op "
            "without a deterministic kernel fails instead of varying"
        },
    )

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError(f"SFTConfig.method must be 'lora' or 'full', got {self.method!r}")
        if self.lr_scheduler not in ("linear", "constant"):
            raise ValueError(f"SFTConfig.lr_scheduler must be 'linear' or 'constant', got {self.lr_scheduler!r}")
        if self.sampling not in ("random", "group_by_length"):
            raise ValueError(f"SFTConfig.sampling must be 'random' or 'group_by_length', got {self.sampling!r}")
        if self.lr <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("SFTConfig: lr > 0, batch_size >= 1 and max_length >= 16 are required")

    def to_dict(self) -> dict:
        d = asdict(self)
        for added_later, default in (("lr_scheduler", "linear"), ("sampling", "random")):
            if d[added_later] == default:
                del d[added_later]  # left out at its default, so older caches stay valid
        return d


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


def response_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Next-token cross-entropy on response tokens, with the LM head run only where a response
    token is predicted. The same loss as transformers' causal-LM loss (mean over the response
    tokens of the batch), without projecting the prompt positions onto the vocabulary: on the
    testbed's SQL pairs the prompt is about 3/4 of the tokens and the LM head (vocabulary x hidden)
    about a fifth of the per-token compute. transformers' `logits_to_keep` takes one set of
    positions for the whole batch, so it cannot express a per-row set."""
    import torch

    labels = inputs["labels"]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft keeps its LoRA layers inside
    hidden = inner.get_decoder()(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
    ).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep]).float()
    total = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else keep.sum())


def _step_checkpoints(work_dir: Path):
    """A kill point after every optimiser step (bench.killpoints; off unless a test turns it on)."""
    from transformers import TrainerCallback

    from bench.killpoints import checkpoint, stage_path

    class StepCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            checkpoint("train", f"{stage_path(work_dir)} step {state.global_step}")

    return StepCheckpoints()


# what transformers' full_determinism sets for the whole process (trainer_utils.enable_full_determinism)
_DETERMINISM_ENV = (
    "CUDA_LAUNCH_BLOCKING",
    "CUBLAS_WORKSPACE_CONFIG",
    "ASCEND_LAUNCH_BLOCKING",
    "HCCL_DETERMINISTIC",
    "FLASH_ATTENTION_DETERMINISTIC",
)


@contextlib.contextmanager
def _determinism_for_training_only():
    """The Trainer's full_determinism for the fine-tune alone. It sets process-wide state and leaves it:
    CUDA_LAUNCH_BLOCKING=1 in os.environ, which every interpreter started afterwards (evaluation,
    defenses, judges) inherited, so on a GPU each launched its kernels synchronously; and
    torch's deterministic-algorithms switch for the rest of the process."""
    import torch

    env = {k: os.environ.get(k) for k in _DETERMINISM_ENV}
    algorithms = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def train(model, tokenizer, pairs: list[dict], config: SFTConfig, work_dir: Path, progress: bool = True):
    """Fine-tune `model` in place (full) or return a peft model (LoRA). Returns (model, log)."""
    with _determinism_for_training_only():
        return _train(model, tokenizer, pairs, config, work_dir, progress)


def _train(model, tokenizer, pairs: list[dict], config: SFTConfig, work_dir: Path, progress: bool):
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
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=max(1, steps_per_epoch // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=config.bf16 and models.native_bf16(models.default_device()),
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy=config.sampling,
        # on a CPU at a fixed thread count training repeats bit for bit either way; the switch makes
        # it fail loudly where it would not (GPU kernels); the cost is in BENCHMARKS.md
        full_determinism=config.deterministic,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )

    class ResponseOnlyTrainer(Trainer):
        loss_is_scaled_for_ga = True  # normalised by the response tokens of the whole accumulation window

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = response_only_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    trainer = ResponseOnlyTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_step_checkpoints(work_dir)],
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
