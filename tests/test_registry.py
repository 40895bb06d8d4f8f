"""The defense registry: decorators, lazy listing, and third-party plugins through entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from bench.errors import UserError
from bench.registry import Registry
from defenses import DEFENSES
from defenses.base import params_help


def test_register_and_get():
    reg = Registry("thing")

    @reg.register("a")
    class A:
        pass

    reg.register_lazy("b", "defenses.reference:Aligned")
    assert reg.names() == ["a", "b"]
    assert reg.get("a") is A and reg.get("b").__name__ == "Aligned"
    with pytest.raises(UserError, match="unknown thing 'c'"):
        reg.get("c")
    with pytest.raises(ValueError):
        reg.register("a")(type("Other", (), {}))


def test_builtin_defenses_are_listed_with_documented_params():
    assert {"aligned", "none", "gradient_restoration"} <= set(DEFENSES.names())
    helps = params_help(DEFENSES.get("gradient_restoration").Params)
    assert all(h["help"] for h in helps)
    assert {"recovery_rate": 0.002, "steps": 20, "warmup_steps": 5, "rollback_rate": 0.2}.items() <= {
        h["name"]: h["default"] for h in helps
    }.items()


PLUGIN = '''
from dataclasses import dataclass, field
from defenses import Defense, DefenseOutput

@dataclass
class ScaleParams:
    alpha: float = field(default=0.5, metadata={"help": "share of the fine-tuning delta kept"})

class Scale(Defense):
    """A third-party test defense."""
    Params = ScaleParams
    def apply(self, ctx):
        return DefenseOutput(model_path=ctx.aligned.path, info={"alpha": self.params.alpha})
'''


def test_third_party_plugin_through_entry_points(tmp_path):
    """A tiny package, pip-installed into a folder, adds a defense without touching this repo."""
    src = tmp_path / "src"
    (src / "realign_plugin_demo").mkdir(parents=True)
    (src / "realign_plugin_demo" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "realign-plugin-demo"
        version = "0.0.1"
        [project.entry-points."realign.defenses"]
        demo_scale = "realign_plugin_demo:Scale"
        [tool.setuptools]
        packages = ["realign_plugin_demo"]
    """)
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    listed = subprocess.run([sys.executable, "-m", "bench.cli", "list"], capture_output=True, text=True, env=env)
    assert "demo_scale" in listed.stdout and "realign_plugin_demo:Scale" in listed.stdout  # listed, not imported
    loaded = subprocess.run(
        [sys.executable, "-m", "bench.cli", "list", "--load-plugins"], capture_output=True, text=True, env=env
    )
    assert "A third-party test defense." in loaded.stdout and "alpha = 0.5" in loaded.stdout
    code = "from defenses import DEFENSES; d = DEFENSES.get('demo_scale')(alpha='0.25'); print(d.params.alpha)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "0.25", run.stderr


def test_one_typed_parser_for_key_value_parameters():
    """`key=value` strings from the CLI and from board rows, checked against each field's type."""
    from dataclasses import dataclass

    from defenses.base import key_values, parse_params

    @dataclass
    class P:
        rate: float = 0.5
        steps: int = 3
        on: bool = True
        name: str = "a"
        quirk: str | None = None
        alphas: list[float] | None = None
        counts: tuple[int, ...] = ()

    got = parse_params(
        P, key_values(["rate=0.25", "steps=7", "on=false", "name=b", "quirk=x", "alphas=0.1, 1", "counts=1,2"], "k=v")
    )
    assert got == P(0.25, 7, False, "b", "x", [0.1, 1.0], (1, 2))
    assert parse_params(P, {"quirk": "none", "on": "1", "steps": 4}) == P(steps=4, on=True)
    for bad, shown in (
        ({"steps": "1.5"}, "steps='1.5' is not a valid int"),
        ({"on": "maybe"}, "on='maybe' is not a valid bool"),
        ({"counts": "1,x"}, "is not a valid tuple[int, ...]"),
        ({"quirk": "3"}, None),
        ({"nope": "1"}, "unknown parameter 'nope'"),
    ):
        if shown is None:
            assert parse_params(P, bad).quirk == "3"  # text stays text
            continue
        with pytest.raises(UserError, match=re.escape(shown)) as exc:
            parse_params(P, bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="parameters are written name:key=value"):
        key_values(["steps"], "name:key=value")


@pytest.mark.parametrize(
    "defense, field, choices",
    [
        ("safelora", "mode", "'number', 'threshold'"),
        ("antidote", "data", "'calibration', 'harmful_pairs'"),
        ("gradient_restoration", "mode", "'faithful', 'clean'"),
        ("gradient_restoration", "compute_dtype", "'auto', 'float32', 'bfloat16'"),
    ],
)
def test_choice_parameters_name_their_choices(defense, field, choices):
    """Every defense's choice field goes through defenses.base.check_choice: one message shape."""
    with pytest.raises(UserError, match=re.escape(f"{field} must be one of {choices}, got 'bogus'")):
        DEFENSES.get(defense)(**{field: "bogus"})


def test_defend_checks_its_parameters_before_any_work(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "defend",
            "resta",
            "--param",
            "unalign_steps=many",
            "--home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(
        "realign: error: parameter unalign_steps='many' is not a valid int"
    ), proc.stderr
    assert not (tmp_path / "cache").exists()


def test_verbosity_sets_progress_lines_and_vllm_logging(tmp_path):
    code = (
        "import os, sys; from bench import cli, progress; from bench.runner import Clock; "
        "cli._quiet_libraries(sys.argv[1]); progress.configure(sys.argv[1]); Clock().say('stage line'); "
        "progress.log.debug('debug line'); print(os.environ['VLLM_LOGGING_LEVEL'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    runs = {
        v: subprocess.run([sys.executable, "-c", code, v], capture_output=True, text=True, env=env)
        for v in ("WARNING", "INFO", "DEBUG")
    }
    assert runs["WARNING"].stderr == "" and runs["WARNING"].stdout.strip() == "ERROR"
    assert (
        "stage line" in runs["INFO"].stderr
        and "debug line" not in runs["INFO"].stderr
        and runs["INFO"].stdout.strip() == "ERROR"
    )
    assert "debug line" in runs["DEBUG"].stderr and runs["DEBUG"].stdout.strip() == "DEBUG"


def test_a_registered_subclass_keeps_its_own_name_whatever_loaded_first():
    """harmbench_classifier_contextual subclasses harmbench_classifier (and xstest_unsafe
    xstest_safe, strongreject_small strongreject). Loaded after its parent, a subclass once took the
    parent's registry name, and a judge's name is its verdict cache's key and what a fresh
    interpreter rebuilds it from: the contextual judge would have been served the plain judge's
    verdicts. A fresh interpreter, so that the parents load first whatever other tests loaded."""
    code = (
        "from bench.judges import JUDGES; from bench.sets import SETS\n"
        "pairs = [(JUDGES, 'harmbench_classifier', 'harmbench_classifier_contextual'),\n"
        "         (SETS, 'xstest_safe', 'xstest_unsafe'), (SETS, 'strongreject', 'strongreject_small')]\n"
        "for registry, parent, child in pairs:\n"
        "    registry.get(parent)\n"
        "    print(registry.get(parent).registry_name, registry.get(child).registry_name)\n"
        "print(JUDGES.get('harmbench_classifier_contextual')(pretrained='x').name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:4] == [
        "harmbench_classifier harmbench_classifier_contextual",
        "xstest_safe xstest_unsafe",
        "strongreject strongreject_small",
        "harmbench_classifier_contextual",
    ]
