"""The defense registry: decorators, lazy listing, and third-party plugins through entry points."""

from __future__ import annotations

import os
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
    assert {"recovery_rate": 0.002, "steps": 20, "warmup_steps": 5, "rollback_rate": 0.2}.items() <= {h["name"]: h["default"] for h in helps}.items()


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
    (src / "pyproject.toml").write_text(textwrap.dedent('''
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
    '''))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    listed = subprocess.run([sys.executable, "-m", "bench.cli", "list"], capture_output=True, text=True, env=env)
    assert "demo_scale" in listed.stdout and "realign_plugin_demo:Scale" in listed.stdout  # listed, not imported
    loaded = subprocess.run([sys.executable, "-m", "bench.cli", "list", "--load-plugins"], capture_output=True, text=True, env=env)
    assert "A third-party test defense." in loaded.stdout and "alpha = 0.5" in loaded.stdout
    code = "from defenses import DEFENSES; d = DEFENSES.get('demo_scale')(alpha='0.25'); print(d.params.alpha)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "0.25", run.stderr
