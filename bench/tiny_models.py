"""Tiny random Llama models with a byte-level BPE tokenizer trained on the spot: no hub, seconds to
make. The unit tests build their models with these, and so do the benchmarks that need a model
smaller than the embedded one (one builder, so a benchmark measures the tests' kind of model)."""

from __future__ import annotations

from pathlib import Path

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
