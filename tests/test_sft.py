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
