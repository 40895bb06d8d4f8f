"""Escape a judge template's control sequences inside text that goes into the template.

An answer (or a prompt) that holds `[/INST]`, `<|eot_id|>` or `</s>` could close the judge's turn
early and write the judge's verdict for it: the HarmBench classifier is known to be prompt-injected
this way. Every control sequence found in the text gets a backslash after its first character
(`[/INST]` -> `[\\/INST]`, `<|eot_id|>` -> `<\\|eot_id|>`): the text stays readable to the judge,
and neither the template's parser nor the tokenizer's special-token matcher sees the sequence.
"""

from __future__ import annotations

import re

# sequences that delimit turns in the judges' templates (Llama 2/Mistral, Llama 3, ChatML, Tulu,
# Gemma, InternLM, Baichuan, ChatGLM); each judge adds its own and its tokenizer's special tokens
COMMON_CONTROL = (
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<reserved_106>",
    "<reserved_107>",
    "[gMASK]",
    "<eoh>",
)


def control_sequences(extra: tuple[str, ...] = (), tokenizer=None) -> tuple[str, ...]:
    """COMMON_CONTROL + a judge's own markers + every special token of its tokenizer."""
    special: list[str] = []
    if tokenizer is not None:
        special = list(getattr(tokenizer, "all_special_tokens", []))
        special += [
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
        ]
    return tuple(dict.fromkeys(s for s in (*COMMON_CONTROL, *extra, *special) if len(s) > 1))


def escape(text: str, sequences: tuple[str, ...]) -> str:
    """`text` with a backslash after the first character of every occurrence of `sequences`."""
    if not text or not sequences:
        return text
    # longest first, so that `<|eot_id|>` is escaped whole rather than a shorter sequence inside it
    pattern = re.compile("|".join(re.escape(s) for s in sorted(sequences, key=len, reverse=True)))
    while True:  # an escape can never create a new match, but overlapping matches need a second look
        escaped = pattern.sub(lambda m: m.group(0)[0] + "\\" + m.group(0)[1:], text)
        if escaped == text:
            return text
        text = escaped


def unescaped_count(text: str, sequences: tuple[str, ...]) -> int:
    """How many control sequences `text` holds (a test's and a debugger's check)."""
    return sum(text.count(s) for s in sequences)
