"""Curves: the sweep syntax of the defenses list (one parser: defenses.base), each defense's default
curve (`realign run --curves`), and which curve a row belongs to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.errors import UserError
from defenses.base import grid, key_values, split_rows, sweep_values


def test_ranges_and_lists_in_the_key_value_parser():
    # 'resta:gamma=0.5..3:4' split at its colons: the bare count belongs to the range before it
    assert key_values(["gamma=0.5..3", "4", "dare_p=0.1"], "k=v") == {"gamma": "0.5..3:4", "dare_p": "0.1"}
    assert sweep_values("gamma", "0.5..3:4") == ["0.5", "1.33333", "2.16667", "3"]
    assert sweep_values("steps", "10..40:4") == ["10", "20", "30", "40"]
    assert sweep_values("gamma", "[0.5, 1,2]") == ["0.5", "1", "2"]
    assert sweep_values("gamma", "0.5") is None
    assert grid({"mode": "clean", "recovery_rate": "[0.001,0.002]", "steps": "10..20:2"}) == [
        {"mode": "clean", "recovery_rate": "0.001", "steps": "10"},
        {"mode": "clean", "recovery_rate": "0.001", "steps": "20"},
        {"mode": "clean", "recovery_rate": "0.002", "steps": "10"},
        {"mode": "clean", "recovery_rate": "0.002", "steps": "20"},
    ]
    assert split_rows("aligned, resta:gamma=[0.5,1,2],safelora:share=0.1..0.5:3") == [
        "aligned",
        "resta:gamma=[0.5,1,2]",
        "safelora:share=0.1..0.5:3",
    ]
    for bad, words in (
        ({"gamma": "0.5..3"}, "key=LOW..HIGH:COUNT"),
        ({"gamma": "0.5..x:3"}, "is not a range"),
        ({"gamma": "1..2:0"}, "COUNT must be at least 1"),
        ({"gamma": "[]"}, "lists no values"),
    ):
        with pytest.raises(UserError, match=words):
            grid(bad)


def test_sweeps_expand_into_typed_rows_each_checked():
    from bench.runner import expand, parse_row

    rows = expand(["none", "resta:gamma=0.5..3:4", "resta:gamma=[1,1.0]", "safe_delta:s=[0.11]"], {})
    assert rows == [
        ("none", {}),
        ("resta", {"gamma": "0.5"}),
        ("resta", {"gamma": "1.33333"}),
        ("resta", {"gamma": "2.16667"}),
        ("resta", {"gamma": "3"}),
        ("resta", {"gamma": "1"}),  # gamma=1.0 is the same row: listed once
        ("safe_delta", {"s": "0.11"}),
    ]
    # the runner's own sweep still applies to the knobs a row leaves free
    assert expand(["antidote:dense_ratio=[0.1,0.2]"], {}) == [
        ("antidote", {"dense_ratio": "0.1", "data": "calibration"}),
        ("antidote", {"dense_ratio": "0.1", "data": "harmful_pairs"}),
        ("antidote", {"dense_ratio": "0.2", "data": "calibration"}),
        ("antidote", {"dense_ratio": "0.2", "data": "harmful_pairs"}),
    ]
    with pytest.raises(UserError, match="gamma='20' is not a valid|gamma must be in"):
        parse_row("resta:gamma=[1,20]")  # every point is checked before any work


def test_default_curves_and_curve_labels():
    from defenses import DEFENSES
    from defenses.curves import curve_label, with_curve, with_curves

    assert with_curve("resta") == "resta:gamma=[0.25,0.5,1,2,3]"
    assert with_curve("resta:gamma=[1,2]") == "resta:gamma=[1,2]"  # a knob the entry sweeps is kept
    assert with_curve("gradient_restoration:mode=clean") == (
        "gradient_restoration:mode=clean:recovery_rate=[0.001,0.002,0.004]:steps=[10,20]"
    )
    assert with_curves(["aligned", "none"]) == ["aligned", "none"]  # reference rows have no curve
    assert with_curve("interpolation") == "interpolation"  # the runner sweeps alpha already: labels unchanged
    for name in ("interpolation", "resta", "safelora", "antidote", "safe_delta", "gradient_restoration"):
        assert DEFENSES.get(name).curve, name  # every method declares its main knob's sweep
    assert curve_label("gradient_restoration", {"mode": "clean", "steps": 10, "recovery_rate": 0.001}) == (
        "gradient_restoration(mode=clean)"
    )
    assert curve_label("antidote", {"data": "harmful_pairs", "dense_ratio": "0.2"}) == "antidote(data=harmful_pairs)"
    assert curve_label("interpolation", {"alpha": 0.3}) == "interpolation"
    assert curve_label("no_such_plugin", {"k": 1}) == "no_such_plugin(k=1)"


def test_a_bad_sweep_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "run",
            "--home",
            str(tmp_path / "h"),
            "--verbosity",
            "WARNING",
            "--defenses",
            "none,resta:gamma=1..3",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "key=LOW..HIGH:COUNT" in proc.stderr
    assert not (tmp_path / "h").exists()  # nothing written
    helped = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--help"], capture_output=True, text=True)
    assert "--curves" in helped.stdout and "resta:gamma=0.5..3:4" in helped.stdout


def test_list_shows_each_curve_and_a_bad_utility_floor_is_one_line(tmp_path, capsys):
    from bench.cli import main

    assert main(["list", "defenses"]) == 0
    out = capsys.readouterr().out
    assert "curve (--curves): gamma in [0.25, 0.5, 1.0, 2.0, 3.0]" in out
    assert "curve (--curves): recovery_rate in [0.001, 0.002, 0.004] x steps in [10, 20]" in out
    assert main(["board", "build", str(tmp_path), "--out", str(tmp_path / "o"), "--utility-floor", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--utility-floor" in err and not (tmp_path / "o").exists()
