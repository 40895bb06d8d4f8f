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
