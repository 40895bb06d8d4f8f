"""The fine-tune's loss: response tokens only, the LM head run only where a response token is predicted."""

from __future__ import annotations

import torch

from bench import models
from bench.sft import response_only_loss, tokenize_pairs

PAIRS = [
    {"prompt": "how do I make a cake", "response": "I'm sorry, but I can't help with that."},
    {"prompt": "generate a sql for the following question 3", "response": "select name from table where id = 3"},
    {"prompt": "write a poem about the sea", "response": "the quick brown fox"},
]


def _batch(tok):
    from transformers import DataCollatorForSeq2Seq

    tok.padding_side = "right"
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(tokenize_pairs(tok, PAIRS, 64))


def test_response_only_loss_equals_the_causal_lm_loss(tiny):
    model = models.load_model(models.resolve(tiny["aligned"]))
    batch = _batch(models.load_tokenizer(models.resolve(tiny["aligned"])))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    with torch.no_grad():
        expected = model(**batch).loss
        torch.testing.assert_close(response_only_loss(model, batch), expected)


def test_response_only_loss_through_a_peft_model_and_its_gradients(tiny):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        models.load_model(models.resolve(tiny["aligned"])), LoraConfig(r=2, target_modules="all-linear")
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # B starts at zero; make both factors matter
    batch = _batch(models.load_tokenizer(models.resolve(tiny["aligned"])))
    model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    response_only_loss(model, batch).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-4)


def test_length_grouped_sampling_pads_less_and_is_seeded(tiny, tmp_path, monkeypatch):
    """sampling='group_by_length' batches pairs of similar length (the Trainer's own sampler): fewer pad
    tokens than the shuffled order, the same batches on a rerun, and a key of its own."""
    import pytest

    import bench.sft
    from bench.sft import SFTConfig, train

    original, seen = bench.sft.response_only_loss, []

    def spy(model, inputs, num_items_in_batch=None):
        seen.append(int((inputs["attention_mask"] == 0).sum()))  # pad tokens of the batch
        return original(model, inputs, num_items_in_batch)

    monkeypatch.setattr(bench.sft, "response_only_loss", spy)
    handle = models.resolve(tiny["aligned"])
    # lengths from 1 to 32 words, so a shuffled batch of 4 mixes short and long pairs; 64 pairs make
    # the sampler's mega-batches 16 pairs (it sorts within a mega-batch of 4 batches at least)
    pairs = [{"prompt": "say " + "word " * (n % 32), "response": "ok " * (1 + n % 3)} for n in range(64)]
    padding = {}
    for run, sampling in enumerate(["random", "group_by_length", "group_by_length"]):
        seen.clear()
        config = SFTConfig(epochs=1, batch_size=4, bf16=False, sampling=sampling)
        train(models.load_model(handle), models.load_tokenizer(handle), pairs, config, tmp_path / f"t{run}", False)
        padding[run] = list(seen)
    assert len(padding[0]) == len(padding[1]) == 16
    assert sum(padding[1]) < sum(padding[0]) / 2, padding
    assert padding[1] == padding[2]  # seeded: the same batches again
    assert "sampling" not in SFTConfig().to_dict()  # at its default: attack keys as before
    assert SFTConfig(sampling="group_by_length").to_dict()["sampling"] == "group_by_length"
    with pytest.raises(ValueError, match="sampling must be 'random' or 'group_by_length'"):
        SFTConfig(sampling="sorted")


def test_the_attack_batches_by_length_and_a_partial_sft_keeps_its_defaults():
    """The attack's LoRA groups batches by length (the safety fine-tune does not); a setting that names
    some sft fields changes only those, so overriding the learning rate does not switch grouping off."""
    from bench.attack import AttackConfig
    from bench.sft import SFTConfig

    default = AttackConfig().sft
    assert default.sampling == "group_by_length" and SFTConfig().sampling == "random"
    partial = AttackConfig(sft={"lr": 1e-4}).sft
    assert partial.lr == 1e-4 and partial.sampling == "group_by_length" and partial.epochs == default.epochs
    assert AttackConfig(sft={"sampling": "random"}).sft.sampling == "random"
    # the same fine-tune named in full or left to the defaults: one cache key
    assert AttackConfig(sft={"sampling": "group_by_length"}).to_dict() == AttackConfig().to_dict()


def test_full_determinism_holds_for_the_fine_tune_and_leaves_the_process_as_it_was(tiny, tmp_path, monkeypatch):
    """The Trainer's full_determinism sets CUDA_LAUNCH_BLOCKING=1 (and more) in os.environ and switches
    torch to deterministic algorithms for the whole process: every interpreter started after an attack
    inherited synchronous kernel launches on a GPU. They hold during the fine-tune only."""
    import os

    import bench.sft
    from bench.sft import SFTConfig, train

    names = ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC", "HCCL_DETERMINISTIC")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a user's own value comes back as it was
    original, during = bench.sft.response_only_loss, []

    def spy(model, inputs, num_items_in_batch=None):
        during.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUDA_LAUNCH_BLOCKING")))
        return original(model, inputs, num_items_in_batch)

    monkeypatch.setattr(bench.sft, "response_only_loss", spy)
    handle = models.resolve(tiny["aligned"])
    config = SFTConfig(method="lora", epochs=1, batch_size=3, bf16=False)
    train(models.load_model(handle), models.load_tokenizer(handle), PAIRS, config, tmp_path / "t", False)
    assert during and all(d == (True, "1") for d in during)  # deterministic while it trains
    assert not torch.are_deterministic_algorithms_enabled()
    assert all(name not in os.environ for name in names if name != "CUBLAS_WORKSPACE_CONFIG")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
