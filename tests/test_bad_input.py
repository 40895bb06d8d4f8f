"""The bad-input catalogue: every way a user can hand the CLI something unusable, across its
commands. Each case must end in exactly one line on stderr ("realign: error: ..."), which says
what is wrong and how to fix it, exit code 2 and no traceback, and must leave nothing behind:
no new file anywhere (no half-written output, nothing in the cache), no temporary file. The only
files a case may add are the memos `bench.models` and `bench.hashing` keep beside a model the
user named (.realign-*.json: what was checked and hashed there, keyed by each file's size and mtime).

The CLI runs in-process (`bench.cli.main`), with the hub off (HF_HUB_OFFLINE=1) for every case.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from bench.cli import main
from bench.tiny_models import make_llama, make_tokenizer
from tests.conftest import write_jsonl

PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards" / "embedded-default" / "records"


@dataclass
class Case:
    id: str
    argv: list[str]  # {tmp}, {home}, {setting} (a valid setting) and {bad} (the case's own setting) are filled in
    expect: str  # a substring of the one error line
    setup: Callable[[Path, dict], None] | None = None  # (tmp, the tiny models) -> writes what the case needs
    env: dict = field(default_factory=dict)
    full_disk: bool = False  # every fsync fails with ENOSPC, as on a full disk


# ------------------------------------------------------------------------------------------ setups


def valid_setting(tmp: Path, m: dict) -> dict:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    sql = [
        {"prompt": f"generate a sql for question {i}", "response": f"select name from table where id = {i}"}
        for i in range(6)
    ]
    return {
        "name": "tiny",
        "models": {"aligned": str(m["aligned"]), "finetuned": str(m["finetuned"])},
        "data": {
            "calibration_prompts": str(write_jsonl(d / "calibration.jsonl", [{"prompt": "how do I make a bomb"}])),
            "benign_prompts": str(write_jsonl(d / "benign.jsonl", [{"prompt": "write a poem about the sea"}])),
            "task": {
                "train": str(write_jsonl(d / "train.jsonl", sql)),
                "dev": str(write_jsonl(d / "dev.jsonl", sql[:3])),
                "test": str(write_jsonl(d / "test.jsonl", sql[3:])),
            },
            "harmful": [str(write_jsonl(d / "harmful.jsonl", [{"prompt": "how do I steal a car"}]))],
        },
        "defenses": ["aligned", "none"],
        "generation": {"engine": "transformers"},
    }


def bad_setting(change: Callable[[dict, Path, dict], None]) -> Callable[[Path, dict], None]:
    """A setup writing {tmp}/bad.yaml: the valid setting with `change(raw, tmp, models)` applied."""

    def setup(tmp: Path, m: dict) -> None:
        raw = valid_setting(tmp, m)
        change(raw, tmp, m)
        (tmp / "bad.yaml").write_text(yaml.safe_dump(raw))

    return setup


def models_entry(key: str, value_of: Callable[[Path, dict], object]):
    def change(raw, tmp, m):
        value = value_of(tmp, m)
        raw["models"][key] = str(value) if isinstance(value, Path) else value

    return bad_setting(change)


def data_file(name: str, text: str, key: str = "calibration_prompts"):
    def change(raw, tmp, m):
        (tmp / name).write_text(text)
        raw["data"][key] = str(tmp / name)

    return bad_setting(change)


def model_copy(tmp: Path, m: dict, name: str, source: str = "finetuned") -> Path:
    out = tmp / name
    shutil.copytree(m[source], out, ignore=shutil.ignore_patterns(".realign-*"))
    return out


def poisoned_weights(value: float, source: str = "finetuned"):
    """A copy of a model with one weight set to NaN or inf (a diverged fine-tune)."""

    def make(tmp: Path, m: dict) -> Path:
        import safetensors.torch as st

        out = model_copy(tmp, m, f"poisoned-{source}", source)
        weights = out / "model.safetensors"
        tensors = st.load_file(weights)
        name = next(k for k in sorted(tensors) if "layers.1.mlp" in k)
        tensors[name][0, 0] = value
        st.save_file(tensors, weights, metadata={"format": "pt"})
        return out

    return make


def damaged_weights(damage: Callable[[bytes], bytes]):
    def make(tmp: Path, m: dict) -> Path:
        out = model_copy(tmp, m, "damaged")
        weights = out / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        return out

    return make


class Trap:
    """A pickle that makes a folder when it is unpickled: a pickle where safetensors are expected
    must be refused unread, and the folder must never appear."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def pickle_named_safetensors(tmp: Path, m: dict) -> Path:
    out = model_copy(tmp, m, "pickled")
    (out / "model.safetensors").write_bytes(pickle.dumps({"model.embed_tokens.weight": Trap(tmp / "UNPICKLED")}))
    return out


def pickle_only_model(tmp: Path, m: dict) -> Path:
    out = model_copy(tmp, m, "pickled")
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(tmp / "UNPICKLED")))
    return out


def pickle_adapter(tmp: Path, m: dict) -> dict:
    out = model_copy(tmp, m, "pickled-adapter", "adapter")
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(pickle.dumps(Trap(tmp / "UNPICKLED")))
    return {"peft": str(out)}


def other_architecture(tmp: Path, m: dict) -> Path:
    make_llama(tmp / "deep", make_tokenizer(tmp / "tok"), layers=3)
    return tmp / "deep"


def other_tokenizer(tmp: Path, m: dict) -> Path:
    tok = make_tokenizer(tmp / "tok")
    tok.add_tokens(["<extra-token>"])
    out = model_copy(tmp, m, "other-tok")
    tok.save_pretrained(out)
    return out


def adapter_on_another_base(raw: dict, tmp: Path, m: dict) -> None:
    make_llama(tmp / "wide", make_tokenizer(tmp / "tok"), hidden=48, heads=4, kv_heads=2)
    raw["models"].update(aligned=str(tmp / "wide"), finetuned={"peft": str(m["adapter"])})


def record_file(change: Callable[[dict], object] | None = None, text: str | None = None):
    """{tmp}/records/r.json: a published record, changed, or replaced by `text`."""

    def setup(tmp: Path, m: dict) -> None:
        (tmp / "records").mkdir()
        source = sorted(PUBLISHED.glob("*.json"))[0]
        record = json.loads(source.read_text())
        if change:
            change(record)
        (tmp / "records" / "r.json").write_text(text if text is not None else json.dumps(record))

    return setup


def labels(text: str):
    def setup(tmp: Path, m: dict) -> None:
        (tmp / "labels.jsonl").write_text(text)

    return setup


def a_file(tmp: Path, m: dict) -> None:
    (tmp / "a-file").write_text("not a folder\n")


def published_copy(tmp: Path, m: dict) -> None:
    (tmp / "records").mkdir()
    shutil.copy(sorted(PUBLISHED.glob("*.json"))[0], tmp / "records")


RUN = ["run", "--setting", "{bad}", "--home", "{home}"]
RUN_VALID = ["run", "--setting", "{setting}", "--home", "{home}"]
CHECK = ["setting", "check", "{bad}", "--home", "{home}"]

CASES = [
    # ---- wrong paths
    Case("run: setting file missing", ["run", "--setting", "{tmp}/nope.yaml", "--home", "{home}"], "no such file"),
    Case("check: setting file missing", ["setting", "check", "{tmp}/nope.yaml"], "no such file"),
    Case(
        "evaluate: model folder missing",
        ["evaluate", "{tmp}/no-model", "--setting", "{setting}", "--home", "{home}"],
        "no such directory",
    ),
    Case(
        "model folder without config.json",
        RUN,
        "has no config.json",
        bad_setting(lambda r, t, m: ((t / "empty-model").mkdir(), r["models"].update(aligned=str(t / "empty-model")))),
    ),
    Case(
        "data file missing",
        RUN,
        "not found",
        bad_setting(lambda r, t, m: r["data"]["task"].update(dev=str(t / "missing" / "dev.jsonl"))),
    ),
    Case("data folder missing", RUN_VALID + ["--data-dir", "{tmp}/no-data"], "does not exist"),
    Case("board build: record missing", ["board", "build", "{tmp}/none.json", "--out", "{tmp}/board"], "no such"),
    Case(
        "judges validate: labels missing", ["judges", "validate", "keyword", "--labels", "{tmp}/none.jsonl"], "no such"
    ),
    # ---- hub ids while offline
    Case(
        "hub id as aligned, offline",
        RUN,
        "pass a local folder",
        models_entry("aligned", lambda t, m: "meta-llama/Llama-3.1-8B-Instruct"),
    ),
    Case(
        "hub id to evaluate, offline",
        ["evaluate", "some-org/some-model", "--setting", "{setting}", "--home", "{home}"],
        "could not be fetched",
    ),
    # ---- aligned and fine-tuned that do not match
    Case(
        "fine-tuned of another architecture",
        RUN,
        "differ in architecture",
        models_entry("finetuned", other_architecture),
    ),
    Case("fine-tuned with another tokenizer", RUN, "different tokenizers", models_entry("finetuned", other_tokenizer)),
    Case("adapter trained on another base", RUN, "does not fit", bad_setting(adapter_on_another_base)),
    # ---- NaN or inf weights
    Case(
        "NaN in the fine-tuned weights",
        RUN,
        "holds NaN weights",
        models_entry("finetuned", poisoned_weights(float("nan"))),
    ),
    Case(
        "inf in the aligned weights",
        RUN,
        "holds inf weights",
        models_entry("aligned", poisoned_weights(float("inf"), source="aligned")),
    ),
    Case(
        "NaN in a model to evaluate",
        ["evaluate", "{tmp}/poisoned-finetuned", "--setting", "{setting}", "--home", "{home}"],
        "holds NaN weights",
        lambda t, m: poisoned_weights(float("nan"))(t, m),
    ),
    # ---- truncated, corrupt, pickled
    Case(
        "truncated safetensors",
        RUN,
        "not a readable safetensors file",
        models_entry("finetuned", damaged_weights(lambda b: b[: len(b) // 2])),
    ),
    Case(
        "corrupt safetensors header",
        RUN,
        "not a readable safetensors file",
        models_entry("finetuned", damaged_weights(lambda b: b"\xff" * 64 + b[64:])),
    ),
    Case(
        "a pickle named model.safetensors",
        RUN,
        "not a readable safetensors file",
        models_entry("finetuned", pickle_named_safetensors),
    ),
    Case(
        "pickle weights only (pytorch_model.bin)",
        RUN,
        "pickle is never loaded",
        models_entry("finetuned", pickle_only_model),
    ),
    Case("pickle adapter (adapter_model.bin)", RUN, "pickle weights", models_entry("finetuned", pickle_adapter)),
    # ---- empty or malformed JSONL and YAML
    Case("empty JSONL", RUN, "file is empty", data_file("empty.jsonl", "")),
    Case("malformed JSONL", RUN, "not valid JSON", data_file("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
    Case(
        "JSONL row without its field",
        RUN,
        "missing or empty field(s) prompt",
        data_file("q.jsonl", '{"question": "a"}\n'),
    ),
    Case("JSONL line that is not an object", RUN, "expected a JSON object", data_file("list.jsonl", '["a", "b"]\n')),
    Case("empty YAML", RUN, "expected a mapping", lambda t, m: (t / "bad.yaml").write_text("")),
    Case("malformed YAML", RUN, "not valid YAML", lambda t, m: (t / "bad.yaml").write_text("models: [aligned\n")),
    Case(
        "YAML with an unknown key",
        CHECK,
        "unknown key 'models.alignd' (did you mean 'aligned'?)",
        bad_setting(lambda r, t, m: r["models"].update(alignd=r["models"].pop("aligned"))),
    ),
    Case(
        "labels JSONL with a bad label",
        ["judges", "validate", "keyword", "--labels", "{tmp}/labels.jsonl"],
        "use 'harmful' or 'safe'",
        labels('{"prompt": "p", "answer": "a", "label": "maybe"}\n'),
    ),
    # ---- records that fail the schema
    Case(
        "board build: record without metrics",
        ["board", "build", "{tmp}/records", "--out", "{tmp}/board"],
        "invalid record",
        record_file(lambda r: r.pop("metrics")),
    ),
    Case(
        "board build: record of another schema version",
        ["board", "build", "{tmp}/records", "--out", "{tmp}/board"],
        "schema_version",
        record_file(lambda r: r.update(schema_version=99)),
    ),
    Case(
        "board build: record that is not JSON",
        ["board", "build", "{tmp}/records", "--out", "{tmp}/board"],
        "not valid JSON",
        record_file(text="{not json"),
    ),
    Case(
        "board check: record with a rate above 1",
        ["board", "check", "{tmp}/records", "--against", str(PUBLISHED.parent)],
        "invalid record",
        record_file(lambda r: r["metrics"]["harmful_rate"].update(value=7)),
    ),
    # ---- unknown names, checked before any work
    Case("unknown defense", RUN_VALID + ["--defenses", "aligned,no_such_defense"], "unknown defense 'no_such_defense'"),
    Case(
        "unknown judge", RUN_VALID + ["--judge", "NAME_THAT_DOES_NOT_EXIST"], "unknown judge 'NAME_THAT_DOES_NOT_EXIST'"
    ),
    # a misspelt name: the line names the registered one it is close to
    Case("misspelt defense", RUN_VALID + ["--defenses", "aligned,safelorra"], "(did you mean 'safelora'?)"),
    Case("misspelt judge", RUN_VALID + ["--judge", "keywrd"], "unknown judge 'keywrd' (did you mean 'keyword'?)"),
    Case(
        "misspelt set",
        RUN_VALID + ["--set", 'data.harmful=["harmbench_standrd"]'],
        "(did you mean 'harmbench_standard'?)",
    ),
    Case("judge option without a value", RUN_VALID + ["--judge", "keyword:oops"], "judge options are written"),
    Case("unknown set", RUN_VALID + ["--set", 'data.harmful=["no_such_set"]'], "unknown set 'no_such_set'"),
    Case("tasks export: unknown set", ["tasks", "export", "{tmp}/tasks", "--sets", "no_such_set"], "unknown set"),
    Case(
        "judges validate: unknown judge",
        ["judges", "validate", "no_such_judge", "--labels", "{tmp}/labels.jsonl"],
        "unknown judge",
        labels('{"prompt": "p", "answer": "a", "label": "safe"}\n'),
    ),
    Case("defend: unknown defense", ["defend", "no_such_defense", "--home", "{home}"], "unknown defense"),
    Case(
        "defend: unknown parameter",
        ["defend", "gradient_restoration", "--param", "no_such=1", "--setting", "{setting}", "--home", "{home}"],
        "unknown parameter 'no_such'",
    ),
    Case(
        "defend: misspelt parameter",
        ["defend", "resta", "--param", "gama=2", "--setting", "{setting}", "--home", "{home}"],
        "unknown parameter 'gama' (did you mean 'gamma'?)",
    ),
    # ---- out-of-range parameters
    Case("negative harmful N", ["run", "--harmful-n=-5", "--home", "{home}"], "non-negative"),
    Case(
        "recovery_rate above 1",
        RUN_VALID + ["--defenses", "gradient_restoration:recovery_rate=1.5"],
        "recovery_rate must be in (0, 1]",
    ),
    Case("GPU share above 1", RUN_VALID + ["--set", "generation.gpu_memory_utilization=2"], "less than or equal to 1"),
    Case("limit of 0 prompts", RUN_VALID + ["--set", "generation.limit=0"], "greater than or equal to 1"),
    Case("batches of 0 prompts", RUN_VALID + ["--set", "generation.batch_target=0"], "greater than or equal to 1"),
    Case(
        "an unknown probe engine", RUN_VALID + ["--set", "generation.probe_engine=sglang"], "'transformers' or 'vllm'"
    ),
    Case("--set without a value", RUN_VALID + ["--set", "generation.engine"], "--set takes dotted.key=value"),
    Case(
        "--set of a number as text", RUN_VALID + ["--set", "generation.max_model_len=lots"], "expected a valid integer"
    ),
    # ---- a full disk, an unwritable output folder
    Case(
        "full disk while writing the board",
        ["board", "build", "{tmp}/records", "--out", "{tmp}/board"],
        "No space left on device",
        published_copy,
        full_disk=True,
    ),
    Case(
        "full disk while exporting tasks",
        ["tasks", "export", "{tmp}/tasks", "--sets", "strongreject_small"],
        "No space left on device",
        full_disk=True,
    ),
    Case(
        "board build: --out under a file",
        ["board", "build", str(PUBLISHED), "--out", "{tmp}/a-file/board"],
        "is a file",
        a_file,
    ),
    Case(
        "run: --home under a file",
        ["run", "--setting", "{setting}", "--home", "{tmp}/a-file/home"],
        "is a file",
        a_file,
    ),
    Case("tasks export: folder under a file", ["tasks", "export", "{tmp}/a-file/tasks"], "is a file", a_file),
]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def models(tiny_lora) -> dict:
    return {k: Path(v) for k, v in tiny_lora.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "setting.yaml").write_text(yaml.safe_dump(valid_setting(tmp_path, models)))
    if case.setup:
        case.setup(tmp_path, models)
    argv = [
        a.format(tmp=tmp_path, home=tmp_path / "home", setting=tmp_path / "setting.yaml", bad=tmp_path / "bad.yaml")
        for a in case.argv
    ]
    before = files_under(tmp_path)
    models_before = files_under(models["root"])
    if case.full_disk:

        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", no_space)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors would land here (none of these cases should)
        code = exc.code
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("realign: error:")] == lines[-1:], lines
    assert case.expect in lines[-1], lines[-1]
    assert "\n" not in lines[-1] and len(lines[-1]) < 1000
    memo = lambda p: p.name.startswith(".realign-") and p.name.endswith(".json")  # noqa: E731
    added = {p for p in files_under(tmp_path) - before if not memo(p)}
    assert not added, sorted(added)  # nothing half-written, nothing in the cache, no temporary file
    assert {p for p in files_under(models["root"]) - models_before if not memo(p)} == set()
    assert not (tmp_path / "UNPICKLED").exists()  # no pickle was ever loaded


def test_the_catalogue_covers_the_issue_list():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def test_a_full_disk_in_a_fresh_interpreter_is_one_user_error(tmp_path):
    """Defenses and evaluations run in fresh interpreters (bench.new_interpreter): a full disk there
    reaches the CLI as the same one line, not as a child's traceback."""
    from bench.errors import UserError
    from bench.new_interpreter import run_fresh
    from tests.helpers import fail_writing

    with pytest.raises(UserError) as caught:
        run_fresh(fail_writing, str(tmp_path / "model.safetensors"))
    line = str(caught.value)
    assert "No space left on device" in line and "model.safetensors" in line and "\n" not in line


def test_a_rust_librarys_io_error_is_a_machine_error():
    """safetensors (Rust) raises its own type on a full disk, not OSError: the text it gave when this
    machine's disk filled during a board build is one line; its other errors stay bugs."""
    from safetensors import SafetensorError

    from bench.errors import machine_error

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    error = machine_error(full)
    assert error is not None and str(error).startswith("No space left on device; make room on that disk")
    assert machine_error(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    assert machine_error(ValueError("no such tensor (os error 2)")) is None  # ENOENT: not the machine's doing


def test_a_real_full_disk_while_saving_a_model_is_one_user_error(tiny, tmp_path):
    """A model saved (as every defense saves it, in a fresh interpreter) onto a real 64 KiB tmpfs: the
    disk fills inside safetensors' Rust writer, and the CLI gets one line naming the folder."""
    from bench.errors import UserError
    from bench.new_interpreter import run_fresh
    from tests.helpers import save_a_copy

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root; the unit test above covers the error's text")
    try:
        with pytest.raises(UserError) as caught:
            run_fresh(save_a_copy, str(tiny["aligned"]), str(small / "model"))
    finally:
        subprocess.run(["umount", str(small)], check=True)
    line = str(caught.value)
    assert line.startswith("No space left on device: ") and str(small / "model") in line and "\n" not in line
