"""Fuzzing the parsers that read a user's files: whatever the bytes, the record loader, the JSONL
and CSV set readers and the setting parser either return a value or raise the project's validation error
(UserError: one line, exit 2 in the CLI), never anything else.

The sweep spec parser (`realign sweep`) is fuzzed the same way.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench import records
from bench.data import read_jsonl
from bench.errors import UserError
from bench.settings import load_setting, set_dotted, validate
from bench.sweep.spec import load_spec

PUBLISHED = sorted(
    (Path(__file__).resolve().parents[1] / "leaderboards" / "embedded-default" / "records").glob("*.json")
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def in_file(data: bytes, suffix: str, call):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        return call(path)


def only_user_errors(call) -> None:
    try:
        call()
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)


# -------------------------------------------------------------------------------------------- records


@FUZZ
@given(st.binary(max_size=300))
@example(b"[" * 100_000)  # deeper than the parsers' recursion limit
@example(b"\xef\xbb\xbf{}")  # a byte-order mark
def test_record_loader_on_any_bytes(data):
    only_user_errors(lambda: in_file(data, ".json", records.load))


@FUZZ
@given(json_values)
def test_record_loader_on_any_json(value):
    only_user_errors(lambda: in_file(json.dumps(value).encode(), ".json", records.load))


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indexes)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


PUBLISHED_RECORD = json.loads(PUBLISHED[0].read_text())
RECORD_PATHS = [p for p in _paths(PUBLISHED_RECORD) if p]


@FUZZ
@given(st.sampled_from(RECORD_PATHS), json_values | st.just("__delete__"))
def test_record_loader_on_a_published_record_with_one_field_changed(path, value):
    record = copy.deepcopy(PUBLISHED_RECORD)
    node = record
    for part in path[:-1]:
        node = node[part]
    if value == "__delete__":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    only_user_errors(lambda: in_file(json.dumps(record).encode(), ".json", records.load))


@FUZZ
@given(st.binary(max_size=300))
@example(b"[" * 100_000)  # deeper than the parsers' recursion limit
@example(b"\xef\xbb\xbf{}")  # a byte-order mark
def test_jsonl_reader_on_any_bytes(data):
    only_user_errors(lambda: in_file(data, ".jsonl", lambda p: read_jsonl(p, required=("prompt", "response"))))


@FUZZ
@given(st.binary(max_size=300))
@example(b"prompt\n\xff\n")  # not UTF-8
@example(b'prompt\n"a\x00b"\n')  # a NUL inside quotes
def test_csv_set_readers_on_any_bytes(data):
    from bench.sets.files import csv_rows, headerless_csv_first_column

    only_user_errors(lambda: in_file(data, ".csv", lambda p: csv_rows(p, ("prompt",))))
    only_user_errors(lambda: in_file(data, ".csv", headerless_csv_first_column))


# -------------------------------------------------------------------------------------------- settings

SECTIONS = [
    "name",
    "seed",
    "notes",
    "models",
    "attack",
    "data",
    "utility",
    "judge",
    "generation",
    "defenses",
    "testbed",
]
KEYS = SECTIONS + ["aligned", "finetuned", "base", "peft", "path", "harmful_n", "task", "train", "dev", "test"]
setting_like = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=8),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
        max_leaves=15,
    ),
    max_size=8,
)


@FUZZ
@given(st.binary(max_size=300))
@example(b"[" * 100_000)  # deeper than the parsers' recursion limit
@example(b"\xef\xbb\xbf{}")  # a byte-order mark
def test_setting_parser_on_any_bytes(data):
    only_user_errors(lambda: in_file(data, ".yaml", load_setting))


@FUZZ
@given(setting_like)
def test_setting_parser_on_any_mapping(raw):
    only_user_errors(lambda: in_file(yaml.safe_dump(raw).encode(), ".yaml", load_setting))
    only_user_errors(lambda: validate(raw, "fuzz.yaml"))


EMBEDDED = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "bench" / "settings" / "embedded-default.yaml").read_text()
)


@FUZZ
@given(st.lists(st.text(max_size=40), max_size=4))
def test_set_overrides_on_any_text(items):
    raw = copy.deepcopy(EMBEDDED)

    def apply():
        for item in items:
            set_dotted(raw, item)
        validate(raw, "embedded-default")

    only_user_errors(apply)


@FUZZ
@given(
    st.sampled_from(["models.aligned", "attack.harmful_n", "generation", "data.harmful", "defenses", "judge"]),
    st.text(max_size=30),
)
def test_set_override_of_a_real_key_with_any_value(key, text):
    raw = copy.deepcopy(EMBEDDED)
    only_user_errors(lambda: (set_dotted(raw, f"{key}={text}"), validate(raw, "embedded-default")))


# -------------------------------------------------------------------------------------------- sweep specs

spec_like = st.dictionaries(
    st.sampled_from(["name", "settings", "harmful_n", "defenses", "seeds", "judges", "resources", "executor", "x"]),
    json_values,
    max_size=6,
)


@FUZZ
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
@example(b"settings: [" + b"[" * 5_000)
def test_sweep_spec_parser_on_any_bytes(data):
    only_user_errors(lambda: in_file(data, ".yaml", load_spec))


@FUZZ
@given(spec_like)
def test_sweep_spec_parser_on_any_mapping(raw):
    only_user_errors(lambda: in_file(yaml.safe_dump(raw).encode(), ".yaml", load_spec))


@FUZZ
@given(st.sampled_from(["defenses", "settings", "resources", "harmful_n", "seeds"]), json_values)
def test_sweep_spec_example_with_one_field_changed(key, value):
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "smoke-grid.yaml").read_text())
    raw[key] = value
    only_user_errors(lambda: in_file(yaml.safe_dump(raw).encode(), ".yaml", load_spec))
