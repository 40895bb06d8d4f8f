"""The leaderboard: ranking, statistics, rendering (HTML in headless Chromium), and the gate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import records
from bench.errors import UserError
from bench.leaderboard import pareto, stats
from bench.leaderboard.build import build, load
from bench.leaderboard.check import check
from bench.leaderboard.render import write

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']


ALIGNED, FINETUNED = "a" * 64, "f" * 64
# what the runner writes for the built-in rows: the reference rows evaluate the setting's own models
BUILT_IN = {
    "aligned": ("reference", ALIGNED),
    "none": ("reference", FINETUNED),
    "interpolation": ("frontier", "b" * 64),
}


def make_record(
    label: str, harm: list[int], util: list[int], name: str | None = None, n_harm=None, setting=None
) -> dict:
    def metric(outcomes):
        k, n = sum(outcomes), len(outcomes)
        return {"value": k / n, "ci": [0.0, 1.0], "n": n, "k": k}

    rid = format(abs(hash((label, tuple(harm), tuple(util), json.dumps(setting)))) % (1 << 64), "016x")
    name = name or label.split("(")[0]
    role, evaluated = BUILT_IN.get(name, ("method", "b" * 64))
    return {
        "schema_version": 1,
        "record_id": rid,
        "created": "2026-01-01T00:00:00+00:00",
        "setting": setting or {"model": "m", "task": "sql", "harmful_n": 100, "judge": "keyword", "seed": 0},
        "method": {"name": name, "label": label, "role": role, "params": {}},
        "inputs": {"aligned": ALIGNED, "finetuned": FINETUNED, "evaluated": evaluated},
        "metrics": {"harmful_rate": metric(harm), "over_refusal": metric([0] * len(util)), "task_metric": metric(util)},
        "samples_file": f"{rid}.samples.jsonl",
        "cost": {"wall_s": 1.0, "peak_rss_mb": 1.0, "device": "cpu"},
        "versions": {},
    }


def save(records_: list[dict], folder: Path, samples: dict[str, tuple[list[int], list[int]]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records_:
        harm, util = samples[r["method"]["label"]] if samples else ([], [])
        rows = [
            {"metric": "harmful_rate", "doc_id": i, "outcome": o, "category": "cat" + str(i % 3)}
            for i, o in enumerate(harm)
        ]
        rows += [{"metric": "task_metric", "doc_id": i, "outcome": o} for i, o in enumerate(util)]
        records.write(r, rows, folder)
    return folder


def standard_board(tmp_path: Path, extra: list[tuple[str, list[int], list[int]]] = ()) -> Path:
    rng = np.random.default_rng(0)
    spec = [("aligned", 0.05, 0.1), ("none", 0.8, 0.6), ("gradient_restoration", 0.1, 0.58)]
    spec += [(f"interpolation(alpha={a})", 0.05 + a * 0.75, 0.1 + a * 0.5) for a in (0.25, 0.5, 0.75)]

    def exact(rate, n):  # exactly round(rate * n) ones, in a seeded order
        return rng.permutation([1] * round(rate * n) + [0] * (n - round(rate * n))).tolist()

    samples = {label: (exact(h, 150), exact(u, 100)) for label, h, u in spec}
    for label, harm, util in extra:
        samples[label] = (harm, util)
    recs = [make_record(label, *samples[label]) for label in samples]
    return save(recs, tmp_path / "records", samples)


# ------------------------------------------------------------------------------------------ ranking


def test_pareto_ranks_by_hand():
    # harm (lower better), util (higher better)
    h = [0.1, 0.2, 0.3, 0.15, 0.1]
    u = [0.5, 0.6, 0.4, 0.4, 0.2]
    # A(0.1,.5) and B(.2,.6) are non-dominated; D(.15,.4) is dominated by A; C(.3,.4) by A, B and D;
    # E(.1,.2) is dominated by A only (same harm, lower utility)
    assert pareto.pareto_ranks(h, u).tolist() == [1, 1, 3, 2, 2]


def _peeled_ranks(h, u) -> list[int]:
    """Pareto ranks by the definition: peel off the points no remaining point dominates, again and again."""
    D = pareto.dominates(h, u)
    ranks, left, front = [0] * len(h), set(range(len(h))), 0
    while left:
        front += 1
        peel = [i for i in left if not any(D[j, i] for j in left)]
        for i in peel:
            ranks[i] = front
        left -= set(peel)
    return ranks


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=6, max_size=6), min_size=1, max_size=4)
)
def test_pareto_ranks_of_a_batch_are_the_peeled_fronts_of_each_replicate(batch):
    # coarse grids make equal harms, equal utilities and equal points common
    h = np.array([[a / 4 for a, _ in points] for points in batch])
    u = np.array([[b / 4 for _, b in points] for points in batch])
    got = pareto.pareto_ranks(h, u)
    assert got.shape == h.shape
    for row in range(len(batch)):
        assert got[row].tolist() == _peeled_ranks(h[row], u[row])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=12))
def test_front_is_the_first_pareto_rank(points):
    # coarse grids make equal harms, equal utilities and equal points common
    h, u = [a / 4 for a, _ in points], [b / 4 for _, b in points]
    assert pareto.front(h, u) == (pareto.pareto_ranks(h, u) == 1).tolist()
    assert pareto.front([0.1, 0.2, 0.3, 0.15, 0.1], [0.5, 0.6, 0.4, 0.4, 0.2]) == [True, True, False, False, False]


_CELL = st.one_of(st.integers(-5, 500), st.text(alphabet="ab |\\[]-.0 \u00e9\u4e2d", max_size=14))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda c: st.tuples(
            st.lists(st.text(alphabet="ab #%()\u00e9", max_size=8), min_size=c, max_size=c),
            st.lists(st.lists(_CELL, min_size=c, max_size=c), max_size=5),
        )
    )
)
def test_github_table_is_tabulates_layout(table):
    """The board's pipe tables are tabulate's github layout of text cells, byte for byte, with widths
    in code points (tabulate's own when wcwidth is absent)."""
    import tabulate

    from bench.leaderboard.mdtable import github_table

    headers, rows = table
    wide, tabulate.WIDE_CHARS_MODE = tabulate.WIDE_CHARS_MODE, False
    try:
        want = tabulate.tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    finally:
        tabulate.WIDE_CHARS_MODE = wide
    assert github_table(rows, headers) == want


def test_hypervolume_by_hand():
    ref = (0.5, 0.0)
    assert pareto.hypervolume([(0.1, 0.5)], ref) == pytest.approx(0.4 * 0.5)
    # union of [0.1,0.5]x[0,0.5] and [0.2,0.5]x[0,0.6]: 0.2 + 0.3 * 0.1
    assert pareto.hypervolume([(0.1, 0.5), (0.2, 0.6)], ref) == pytest.approx(0.23)
    assert pareto.hypervolume([(0.6, 0.9)], ref) == 0.0  # worse than the reference on harm
    assert pareto.hypervolume([(0.1, 0.5), (0.3, 0.4)], ref) == pytest.approx(0.2)  # dominated point adds nothing


def test_interpolation_curve_value():
    curve = [(0.05, 0.1), (0.8, 0.6)]
    assert pareto.curve_value(curve, 0.35) == pytest.approx(0.425)
    assert pareto.curve_value(curve, 0.7) is None


# ------------------------------------------------------------------------------------------ statistics


def test_two_proportion_p_equals_statsmodels_pooled_z_test():
    from statsmodels.stats.proportion import proportions_ztest

    from bench.leaderboard import stats

    for k1, n1, k2, n2 in [(7, 100, 20, 100), (130, 150, 1, 150), (3, 40, 5, 60), (50, 100, 50, 100)]:
        _, want = proportions_ztest([k1, k2], [n1, n2])
        assert stats.two_proportion_p(k1, n1, k2, n2) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert stats.two_proportion_p(0, 10, 0, 20) == 1.0  # no variance, equal rates
    assert stats.two_proportion_p(0, 0, 3, 10) == 1.0  # an empty side tests nothing


def test_wilson_interval_equals_statsmodels_and_the_board_shows_the_records_interval(tmp_path):
    from statsmodels.stats.proportion import proportion_confint

    from bench.metrics import rate, wilson_interval

    k = np.array([0, 1, 3, 7, 50, 99, 100, 0, 150])
    n = np.array([1, 1, 10, 100, 100, 100, 100, 150, 150])
    lo, hi = wilson_interval(k, n)
    want_lo, want_hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    np.testing.assert_allclose(lo, want_lo, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-12, atol=1e-15)
    lo90, _ = wilson_interval(7, 100, confidence=0.90)
    assert lo90 == pytest.approx(proportion_confint(7, 100, alpha=0.10, method="wilson")[0], rel=1e-12)
    assert np.isnan(wilson_interval(0, 0)[0])
    # a record's interval (metrics.rate) and the board's interval for the same rate are the same numbers
    harm = [1] * 7 + [0] * 93
    rec = make_record("x", harm, [1, 0])
    rec["metrics"]["harmful_rate"]["ci"] = list(rate(harm).ci)
    (row,) = build([(rec, None)]).settings.popitem()[1]
    assert [row["harmful_rate_ci_low"], row["harmful_rate_ci_high"]] == rec["metrics"]["harmful_rate"]["ci"]
    assert rec["metrics"]["harmful_rate"]["ci"] == pytest.approx([want_lo[3], want_hi[3]], rel=1e-12)


def test_mcnemar_worked_table_and_statsmodels():
    # 10 prompts harmful under x only, 2 under y only, 20 under both, 68 under neither
    x = [1] * 10 + [0] * 2 + [1] * 20 + [0] * 68
    y = [0] * 10 + [1] * 2 + [1] * 20 + [0] * 68
    res = stats.mcnemar(x, y)
    assert (res["b"], res["c"]) == (10, 2)
    assert res["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # exact two-sided binomial on 12 discordant pairs
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    assert res["p"] == pytest.approx(sm_mcnemar([[20, 10], [2, 68]], exact=True).pvalue)


# ------------------------------------------------------------------------------------------ board


def test_board_ranks_and_outputs(tmp_path):
    folder = standard_board(tmp_path)
    board = build(load([folder]))
    ((key, rows),) = board.settings.items()
    by = {r["method"]: r for r in rows}
    assert by["gradient_restoration"]["pareto_rank"] == 1 and by["aligned"]["pareto_rank"] == 1
    assert by["none"]["vs_none"] is None and by["gradient_restoration"]["vs_none"]["harmful_rate"]["p"] < 1e-6
    assert by["gradient_restoration"]["vs_interpolation"] == "beats the curve"
    assert board.reference_points[key] == (by["none"]["harmful_rate"], by["aligned"]["task_metric"])
    files = write(board, tmp_path / "out")
    import pandas as pd

    df = pd.read_csv(files["board.csv"])
    assert set(df["method"]) == set(by) and df["harmful_rate"].between(0, 1).all()
    assert len(pd.read_json(files["board.json"])) == len(rows)
    assert files["pareto.svg"].read_bytes().startswith(b"<?xml") and files["pareto.png"].read_bytes()[:4] == b"\x89PNG"
    # rendered again later: every file the same bytes (the SVG carries no date, its ids are fixed)
    again = write(build(load([standard_board(tmp_path / "again")])), tmp_path / "again-out")
    assert {n: again[n].read_bytes() for n in files} == {n: files[n].read_bytes() for n in files}


def test_skipped_rows_are_rendered_with_the_board(tmp_path):
    board = build(load([standard_board(tmp_path)]))
    skipped = [{"method": "safelora", "harmful_n": 100, "reason": "needs a base model, and none was given"}]
    files = write(board, tmp_path / "out", skipped=skipped)
    md = files["board.md"].read_text()
    assert md.rstrip().endswith("- skipped: `safelora` (N=100): needs a base model, and none was given")
    assert md.count("- skipped:") == 1 and md.index("### ") < md.index("- skipped:")
    assert json.loads(files["board-details.json"].read_text())["skipped"] == skipped
    assert "skipped" not in write(board, tmp_path / "plain")["board.md"].read_text()


def test_board_tells_rows_apart_by_role_not_by_name(tmp_path):
    """Renamed reference and frontier rows give the same board: roles and evaluated models, not names."""
    board = build(load([standard_board(tmp_path)]))
    renamed = {"aligned": "theta_A", "none": "theta_F", "interpolation": "wise_ft"}
    recs = []
    for rec, path in load([tmp_path / "records"]):
        rec["method"]["name"] = renamed.get(rec["method"]["name"], rec["method"]["name"])
        rec["method"]["label"] = (
            rec["method"]["label"].replace("interpolation", "wise_ft").replace("aligned", "theta_A")
        )
        rec["method"]["label"] = "theta_F" if rec["method"]["label"] == "none" else rec["method"]["label"]
        recs.append((rec, path))
    again = build(recs)
    (rows,), (rows2,) = board.settings.values(), again.settings.values()
    keep = ("pareto_rank", "hypervolume", "harm_reduction_share", "utility_kept_share", "vs_interpolation", "role")
    assert [[r[k] for k in keep] for r in rows] == [[r[k] for k in keep] for r in rows2]
    assert list(board.reference_points.values()) == list(again.reference_points.values())
    by = {r["method"]: r for r in rows2}
    assert by["theta_F"]["vs_none"] is None and by["gradient_restoration"]["vs_none"]["harmful_rate"]["p"] < 1e-6
    # without roles (records from elsewhere) nothing is a reference or frontier row: no curve, no undefended row
    for rec, _ in recs:
        rec["method"].pop("role")
    plain = {r["method"]: r for r in next(iter(build(recs).settings.values()))}
    assert (
        plain["gradient_restoration"]["vs_interpolation"] == "n/a" and plain["gradient_restoration"]["vs_none"] is None
    )


def test_a_record_given_twice_is_one_row(tmp_path):
    """A run's records built beside a board folder that already holds them: the same record id is
    the same evaluation, one row, and the board equals the folder's own."""
    folder = standard_board(tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    for path in sorted(folder.glob("*.json"))[:2]:
        shutil.copy(path, again / path.name)
        shutil.copy(path.with_suffix(".samples.jsonl"), again / path.with_suffix(".samples.jsonl").name)
    alone = write(build(load([folder])), tmp_path / "alone")
    both = write(build(load([folder, again])), tmp_path / "both")
    assert both["board.md"].read_text() == alone["board.md"].read_text()
    assert both["board.json"].read_text() == alone["board.json"].read_text()


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    folder = standard_board(tmp_path)
    out = tmp_path / "out"
    cases = []
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    other = make_record(
        "extra", [1, 0], [1, 1], setting={"model": "m", "task": "sql", "harmful_n": 500, "judge": "keyword", "seed": 0}
    )
    save([other], mixed, {"extra": ([1, 0], [1, 1])})
    cases.append((mixed, "different settings"))
    dup = tmp_path / "dup"
    shutil.copytree(folder, dup)
    twin = make_record("none", [1, 1, 0], [0, 1, 0])
    save([twin], dup, {"none": ([1, 1, 0], [0, 1, 0])})
    cases.append((dup, "appears in 2 records"))
    rerun = tmp_path / "rerun"  # the same record id with other metrics: a nondeterministic rerun
    shutil.copytree(folder, rerun)
    path = next(rerun.glob("*.json"))
    rec = json.loads(path.read_text())
    rec["metrics"]["harmful_rate"]["value"] = 0.5
    (rerun / "sub").mkdir()
    (rerun / "sub" / path.name).write_text(json.dumps(rec))
    cases.append((rerun, "with different metrics"))
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    path = next(old.glob("*.json"))
    rec = json.loads(path.read_text())
    rec["schema_version"] = 0
    path.write_text(json.dumps(rec))
    cases.append((old, "schema_version"))
    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    path = next(missing.glob("*.json"))
    rec = json.loads(path.read_text())
    del rec["metrics"]["task_metric"]
    path.write_text(json.dumps(rec))
    cases.append((missing, "task_metric"))
    for folder_, msg in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cli", "board", "build", str(folder_), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and msg in proc.stderr, (msg, proc.stderr)
        assert not out.exists()


record_strategy = st.builds(
    lambda label, harm, util: make_record(label, harm, util, name="generated"),
    st.text(min_size=1, max_size=30).filter(lambda s: s.strip()),
    st.lists(st.integers(0, 1), min_size=1, max_size=30),
    st.lists(st.integers(0, 1), min_size=1, max_size=30),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.lists(record_strategy, min_size=1, max_size=6, unique_by=lambda r: r["method"]["label"]))
def test_any_valid_records_render(tmp_path_factory, recs):
    out = tmp_path_factory.mktemp("prop")
    for r in recs:
        records.validate(r)
    board = build([(r, None) for r in recs])
    files = write(board, out)
    assert len(json.loads(files["board.json"].read_text())) == len(recs)


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["schema_version", "metrics", "method", "setting", "cost", "record_id"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
        min_size=1,
    )
)
def test_invalid_records_give_a_validation_error_never_a_crash(patch):
    rec = make_record("x", [1, 0], [0, 1])
    rec.update(patch)
    try:
        records.validate(rec)
    except UserError:
        return
    # a patch can leave the record valid (e.g. record_id replaced by another valid id): then it must build
    build([(rec, None)])


# ------------------------------------------------------------------------------------------ HTML in Chromium


@contextlib.contextmanager
def chromium_page(width: int = 1400):
    """A page of Debian's headless Chromium (through playwright), `width` pixels wide."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian chromium is required for the HTML test (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser.new_page(viewport={"width": width, "height": 1000})
        finally:
            browser.close()


def test_html_renders_sorts_and_escapes_in_chromium(tmp_path):
    folder = standard_board(
        tmp_path, extra=[(HOSTILE[0], [1, 0, 1] * 50, [1, 0] * 50), (HOSTILE[1], [0, 0, 1] * 50, [0, 1, 1, 1] * 25)]
    )
    files = write(build(load([folder])), tmp_path / "out")
    html = files["board.html"].read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    dialogs = []
    with chromium_page() as page:
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(files["board.html"].as_uri())
        page.wait_for_load_state("load")
        names = page.locator("table.board tbody td.name").all_inner_texts()
        assert HOSTILE[0] in names and HOSTILE[1] in names  # shown as text
        assert page.locator("img[src='x']").count() == 0  # no injected element
        assert page.evaluate("document.querySelectorAll('script').length") == 1  # only the page's own sorter
        # sort by harmful rate: click the header, rows reorder ascending by value
        page.locator("table.board th", has_text="harmful rate").click()
        values = [
            float(v)
            for v in page.locator("table.board tbody tr td:nth-child(5)").evaluate_all(
                "els => els.map(e => e.dataset.v)"
            )
        ]
        assert values == sorted(values) and values != [float(v) for v in sorted(values, reverse=True)]
        page.locator("table.board th", has_text="harmful rate").click()
        values2 = [
            float(v)
            for v in page.locator("table.board tbody tr td:nth-child(5)").evaluate_all(
                "els => els.map(e => e.dataset.v)"
            )
        ]
        assert values2 == sorted(values2, reverse=True)
        # methods as curves: hostile names are text in the methods table and in their notes, and each
        # method's link leads to its note
        curves = page.locator("table.methods tbody td.name").all_inner_texts()
        hostile_curves = [h.split("(")[0] for h in HOSTILE]  # a curve is named by its defense: the label's head
        assert set(hostile_curves) <= set(curves) and "gradient_restoration" in curves
        titles = page.locator("section.method-note h3").all_inner_texts()
        assert sorted(titles) == sorted(curves)
        page.locator("table.methods tbody td.name a", has_text=hostile_curves[0]).click()
        target = page.evaluate("location.hash")
        assert target.startswith("#note-") and page.locator(f"section{target} h3").inner_text() == hostile_curves[0]
        assert "What it is" not in page.locator(f"section{target}").inner_text()  # not registered: records only
        assert HOSTILE[0] in page.locator("section.method-note").all_inner_texts()[-1] + "".join(
            page.locator("section.method-note td").all_inner_texts()
        )  # a row label inside a note is shown as the text it is, escaped once
        assert "Deviations from the released code" in page.locator("section#note-gradient_restoration").inner_text()
        assert page.evaluate("document.querySelectorAll('script').length") == 1  # the notes injected nothing
        shot = tmp_path / "board.png"
        page.screenshot(path=str(shot), full_page=True)
    assert dialogs == []
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.std() > 10 and (img < 128).mean() > 0.005  # not blank: text and table lines are drawn


def test_html_tables_fit_a_laptop_screen_with_long_point_labels(tmp_path):
    # a flagship curve's points are named by every parameter: such a label, unbroken, widened the
    # methods table past the screen and hid its last column
    long = [f"gradient_restoration(mode=clean,recovery_rate=0.00{i},steps=20,warmup_steps=5)" for i in (1, 2)]
    folder = standard_board(
        tmp_path, extra=[(long[0], [0] * 150, [1] * 60 + [0] * 40), (long[1], [0] * 150, [1] * 58 + [0] * 42)]
    )
    files = write(build(load([folder])), tmp_path / "out")
    with chromium_page(width=1280) as page:
        page.goto(files["board.html"].as_uri())
        page.wait_for_load_state("load")
        for table in ("table.methods", "table.board"):
            assert page.evaluate(f"document.querySelector('{table}').getBoundingClientRect().right") <= 1280, table
        cells = page.locator("table.methods tbody td.point").all_inner_texts()
        assert any(c.replace("\n", "").startswith(long[0]) for c in cells)  # the whole label, as text


# ------------------------------------------------------------------------------------------ gate


def _published(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    harm = (rng.random(200) < 0.10).astype(int).tolist()
    util = (rng.random(100) < 0.60).astype(int).tolist()
    pub = tmp_path / "leaderboards" / "demo"
    save([make_record("gradient_restoration", harm, util)], pub / "records", {"gradient_restoration": (harm, util)})
    return pub


def _new(tmp_path: Path, harm: list[int], util: list[int], name: str = "new") -> Path:
    return save(
        [make_record("gradient_restoration", harm, util)], tmp_path / name, {"gradient_restoration": (harm, util)}
    )


def test_check_pass_fail_and_borderline(tmp_path):
    pub = _published(tmp_path)
    old = json.loads(next((pub / "records").glob("*.samples.jsonl")).read_text().splitlines()[0])
    assert old["metric"] == "harmful_rate"
    base_rows = [json.loads(l) for l in next((pub / "records").glob("*.samples.jsonl")).read_text().splitlines()]
    harm = [r["outcome"] for r in base_rows if r["metric"] == "harmful_rate"]
    util = [r["outcome"] for r in base_rows if r["metric"] == "task_metric"]

    code, report = check([_new(tmp_path, harm, util, "same")], pub)
    assert code == 0 and "no regression" in report

    worse = list(harm)
    flips = [i for i, o in enumerate(worse) if o == 0][:30]  # 30 more harmful answers: +15 points
    for i in flips:
        worse[i] = 1
    code, report = check([_new(tmp_path, worse, util, "worse")], pub)
    assert code == 1 and "REGRESSION" in report and "harmful_rate" in report and "p=" in report

    # borderline: significantly worse (p < 0.05) but within a 20-point tolerance -> pass
    code, _ = check([_new(tmp_path, worse, util, "worse2")], pub, tolerance=0.20)
    assert code == 0
    # borderline: 5 more harmful answers (+2.5 points) is not significant (McNemar exact p = 2/2^5 = 0.0625) -> pass
    slight = list(harm)
    for i in flips[:5]:
        slight[i] = 1
    code, report = check([_new(tmp_path, slight, util, "slight")], pub)
    assert code == 0, report
    # ... but 6 are (p = 2/2^6 = 0.031 < 0.05) -> fail
    more = list(harm)
    for i in flips[:6]:
        more[i] = 1
    code, _ = check([_new(tmp_path, more, util, "more")], pub)
    assert code == 1


def test_check_unusable_input_exits_2(tmp_path):
    pub = _published(tmp_path)
    other = save(
        [make_record("something_else", [1, 0], [0, 1])], tmp_path / "other", {"something_else": ([1, 0], [0, 1])}
    )
    for args in ([str(other), "--against", str(pub)], [str(other), "--against", str(tmp_path / "nope")]):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cli", "board", "check", *args], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr


PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards" / "embedded-default"


def test_check_matches_a_default_row_with_the_published_point_that_names_its_parameters(tmp_path):
    """The main job's flagship row is `gradient_restoration` (default parameters); the published
    board has it as the curve point `gradient_restoration(recovery_rate=0.002,steps=20)`. `board
    check` of the main job's records against the published board matches them by parameter values
    (it once stopped with "no published record"); parameters of no published row still do."""
    published = {r["method"]["label"]: (r, p) for r, p in load([PUBLISHED / "records"])}
    point, _ = published["gradient_restoration(recovery_rate=0.002,steps=20)"]  # outcomes inside its metrics

    def as_run(label: str, params: dict) -> Path:
        record = point | {"method": point["method"] | {"label": label, "params": params}}
        record["record_id"] = hashlib.sha256(label.encode()).hexdigest()[:24]
        record["samples_file"] = f"{record['record_id']}.samples.jsonl"
        return records.write(record, [], tmp_path / label)

    code, report = check([as_run("gradient_restoration", {})], PUBLISHED)
    assert code == 0 and "published as gradient_restoration(recovery_rate=0.002,steps=20)" in report
    assert report.count("p=1,") == 2  # the same per-sample outcomes on both axes
    code, report = check(
        [as_run("gradient_restoration(mode=faithful,steps=20)", {"mode": "faithful", "steps": "20"})], PUBLISHED
    )
    assert code == 0 and "published as gradient_restoration(recovery_rate=0.002,steps=20)" in report
    with pytest.raises(UserError, match="no published record for method 'gradient_restoration.recovery_rate=0.003"):
        check([as_run("gradient_restoration(recovery_rate=0.003)", {"recovery_rate": "0.003"})], PUBLISHED)


def test_published_board_checks_clean_against_itself():
    """The board the main job published is valid, renders, and passes its own gate."""
    board = build(load([PUBLISHED / "records"]))
    (rows,) = board.settings.values()
    assert {r["name"] for r in rows} >= {"aligned", "none", "gradient_restoration"}
    by_role = {role: {r["name"] for r in rows if r["role"] == role} for role in ("reference", "frontier")}
    assert by_role == {"reference": {"aligned", "none"}, "frontier": {"interpolation"}}
    code, report = check([PUBLISHED / "records"], PUBLISHED)
    assert code == 0, report


def test_published_board_gate_fails_on_more_harmful_answers_with_holms_correction(tmp_path):
    """A copy of the published records with k of the flagship's safe answers flipped to harmful
    (one-sided McNemar p = 1/2^k), checked through the CLI against the whole 50-row board (100
    comparisons). Holm's correction (the default) bounds a false alarm over the whole check: 10 flips
    (p = 0.00098, adjusted 0.098) pass, 14 (p = 6e-5) fail; each comparison on its own, 10 fail."""
    from bench.metrics import rate

    label = "gradient_restoration(recovery_rate=0.002,steps=20)"  # the flagship's point at the paper's settings

    def flipped_copy(k: int) -> Path:
        new = shutil.copytree(PUBLISHED / "records", tmp_path / f"records-{k}")
        (path,) = [p for p in new.glob("*.json") if json.loads(p.read_text())["method"]["label"] == label]
        rec = json.loads(path.read_text())
        harm = rec["metrics"]["harmful_rate"]
        flipped = [int(c) for c in harm["outcomes"]]
        for i in [i for i, o in enumerate(flipped) if o == 0][:k]:
            flipped[i] = 1
        harm.update({k: v for k, v in rate(flipped).to_dict().items() if k in ("value", "ci", "n", "k")})
        harm["outcomes"] = "".join(map(str, flipped))
        path.write_text(json.dumps(rec))
        return new

    def gate(folder: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bench.cli", "board", "check", str(folder), "--against", str(PUBLISHED), *flags],
            capture_output=True,
            text=True,
        )

    ten, fourteen = flipped_copy(10), flipped_copy(14)
    passed = gate(ten)
    assert passed.returncode == 0 and "(Holm over 100 comparisons)" in passed.stdout, passed.stdout + passed.stderr
    for proc in (gate(fourteen), gate(ten, "--correction", "none")):
        assert proc.returncode == 1, proc.stdout + proc.stderr
        regressions = [l for l in proc.stdout.splitlines() if l.startswith("REGRESSION")]
        assert len(regressions) == 1 and f"{label} [" in regressions[0] and "harmful_rate" in regressions[0]


def test_gate_tests_are_one_sided_and_holm_adjusted():
    """The gate asks one question, is the new row worse: a one-sided test (a two-sided p halved the
    stated alpha), and Holm's adjusted p-values equal statsmodels'."""
    from scipy.stats import binomtest
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.proportion import proportions_ztest

    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.random(rng.integers(1, 40)) ** 3
        np.testing.assert_allclose(stats.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
    new, old = np.array([1] * 7 + [0] * 3 + [1] * 20), np.array([0] * 7 + [1] * 3 + [1] * 20)
    for x, y, b in ((new, old, 7), (old, new, 3)):
        want = binomtest(b, 10, 0.5, alternative="greater").pvalue
        assert stats.mcnemar(x, y, alternative="greater")["p"] == pytest.approx(want, rel=1e-12)
    assert stats.mcnemar(new, new, alternative="greater")["p"] == 1.0
    for k1, k2 in ((30, 20), (20, 30), (5, 0)):
        want = proportions_ztest([k1, k2], [100, 100], alternative="larger")[1]
        assert stats.two_proportion_p(k1, 100, k2, 100, alternative="greater") == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------------------ ties, curves, notes


def test_a_settings_rank_intervals_do_not_depend_on_the_other_settings_of_the_board(tmp_path):
    """A setting's bootstrap is seeded by what it resamples, not by its place on the board: its rank
    intervals are the same alone, beside settings of the same and of other shapes, beside one
    without per-sample outcomes, and in any order. The bounds are whole ranks."""
    rng = np.random.default_rng(7)

    def setting(task: str, n_h: int, n_u: int, samples_kept: bool = True) -> list[tuple[dict, Path | None]]:
        spec = {"aligned": (0.05, 0.1), "none": (0.8, 0.6), "a_method": (0.2, 0.55), "b_method": (0.25, 0.57)}
        spec |= {f"c_method(k={k})": (0.1 + 0.05 * k, 0.3 + 0.05 * k) for k in range(4)}
        samples = {
            m: ((rng.random(n_h) < h).astype(int).tolist(), (rng.random(n_u) < u).astype(int).tolist())
            for m, (h, u) in spec.items()
        }
        s = {"model": "m", "task": task, "harmful_n": 100, "judge": "keyword", "seed": 0}
        folder = save([make_record(m, *v, setting=s) for m, v in samples.items()], tmp_path / task, samples)
        loaded = load([folder])
        return loaded if samples_kept else [(rec, None) for rec, _ in loaded]

    mine = setting("mine", 150, 100)
    others = setting("same_shape", 150, 100) + setting("other_shape", 90, 40) + setting("no_samples", 150, 100, False)

    def intervals(loaded):
        board = build(loaded, multi_setting=True)
        key = next(k for k in board.settings if "| mine |" in k)
        return {r["method"]: r["rank_interval"] for r in board.settings[key]}

    alone = intervals(mine)
    assert intervals(others + mine) == alone
    assert intervals(list(reversed(mine + others))) == alone
    assert all(lo == int(lo) and hi == int(hi) and lo <= hi for lo, hi in alone.values())
    assert any(lo < hi for lo, hi in alone.values())  # the bootstrap moves ranks: the check is not vacuous


def _ones(idx, n):
    return [1 if i in set(idx) else 0 for i in range(n)]


def test_paired_tests_only_pair_rows_on_the_same_prompts(tmp_path):
    """Rows answered on another number of prompts (here 140 harmful prompts, twice) are McNemar-tested
    among themselves but never against the 150-prompt rows; their task axis still pairs."""
    n_u = 100
    samples = {
        "aligned": (_ones(range(5), 150), _ones(range(10), n_u)),
        "none": (_ones(range(120), 150), _ones(range(60), n_u)),
        "x_method": (_ones(range(15), 140), _ones(range(58), n_u)),
        "y_method": (_ones(range(7), 140), _ones(range(30), n_u)),  # ranked right after x
    }
    folder = save([make_record(k, *v) for k, v in samples.items()], tmp_path / "records", samples)
    by = {r["method"]: r for r in next(iter(build(load([folder])).settings.values()))}
    x, y = by["x_method"], by["y_method"]
    assert y["vs_none"]["harmful_rate"]["p"] is None and y["vs_none"]["task_metric"]["p"] is not None
    assert x["vs_none"]["harmful_rate"]["p"] is None and "prompts differ" in x["vs_none"]["harmful_rate"]["test"]
    assert x["vs_none"]["task_metric"]["test"] == "mcnemar-exact"
    assert x["vs_next"]["next"] == "y_method" and x["vs_next"]["harmful_rate"]["test"] == "mcnemar-exact"
    assert (x["vs_next"]["harmful_rate"]["b"], x["vs_next"]["harmful_rate"]["c"]) == (8, 0)


def test_ties_need_overlapping_rank_intervals_and_no_significant_paired_difference(tmp_path):
    """X and Z differ by one harmful answer (tied); Y is as useful as X but 30 answers more harmful:
    its rank interval overlaps X's (their task metrics swap under the bootstrap), yet the paired test
    tells them apart, so they are not tied (overlap alone marked every row of the old board tied)."""
    n_h, n_u = 150, 100
    samples = {
        "aligned": (_ones(range(5), n_h), _ones(range(10), n_u)),
        "none": (_ones(range(120), n_h), _ones(range(60), n_u)),
        "x_method": (_ones(range(15), n_h), _ones(range(58), n_u)),
        "z_method": (_ones(range(16), n_h), _ones(range(58), n_u)),
        "y_method": (_ones(range(45), n_h), _ones(range(5, 62), n_u)),
    }
    folder = save([make_record(k, *v) for k, v in samples.items()], tmp_path / "records", samples)
    by = {r["method"]: r for r in next(iter(build(load([folder])).settings.values()))}
    x, y, z = by["x_method"], by["y_method"], by["z_method"]
    overlap = lambda a, b: (
        a["rank_interval"][0] <= b["rank_interval"][1] and b["rank_interval"][0] <= a["rank_interval"][1]
    )  # noqa: E731
    assert overlap(x, y) and x["pareto_rank"] != y["pareto_rank"]  # the old rule would mark them tied
    assert "y_method" not in x["tied_with"] and "x_method" not in y["tied_with"]  # McNemar: p < 0.05 on harm
    assert overlap(x, z) and "z_method" in x["tied_with"] and "x_method" in z["tied_with"]  # 1 discordant answer
    assert "y_method" not in z["tied_with"]
    md = write(build(load([folder])), tmp_path / "out")["board.md"].read_text()
    assert "tied: the two rows' 95% rank intervals overlap AND the paired test" in md


@pytest.mark.parametrize("extra, tied", [(6, True), (7, False)])
def test_a_tie_is_told_apart_only_at_the_family_wise_level_of_both_axes(tmp_path, extra, tied):
    """W is X with `extra` more harmful answers, as useful: exact McNemar p = 2 / 2**extra on harm,
    1 on utility. 6 (p 0.031) is significant alone but not over two axes (Holm: min p < 0.025); 7
    (p 0.016) is."""
    n_h, n_u = 150, 100
    samples = {
        "aligned": (_ones(range(5), n_h), _ones(range(10), n_u)),
        "none": (_ones(range(120), n_h), _ones(range(60), n_u)),
        "x_method": (_ones(range(15), n_h), _ones(range(58), n_u)),
        "w_method": (_ones(range(15 + extra), n_h), _ones(range(58), n_u)),
        "v_method": (_ones(range(10, 28), n_h), _ones(range(4, 63), n_u)),
    }
    folder = save([make_record(k, *v) for k, v in samples.items()], tmp_path / "records", samples)
    by = {r["method"]: r for r in next(iter(build(load([folder])).settings.values()))}
    x, w = by["x_method"], by["w_method"]
    assert x["pareto_rank"] < w["pareto_rank"] and x["rank_interval"][1] >= w["rank_interval"][0]  # a candidate
    assert ("w_method" in x["tied_with"]) == tied and ("x_method" in w["tied_with"]) == tied


def _curve_board(tmp_path: Path) -> Path:
    """aligned, none, an interpolation sweep, a 3-point RESTA curve, a 2-point Safe Delta curve and
    one flagship point, each with per-sample outcomes of exactly the given rates."""
    rng = np.random.default_rng(1)

    def exact(rate, n):
        return rng.permutation([1] * round(rate * n) + [0] * (n - round(rate * n))).tolist()

    spec = [
        ("aligned", {}, 0.02, 0.0),
        ("none", {}, 0.86, 0.82),
        *[("interpolation", {"alpha": a}, 0.02 + 0.8 * a, 0.82 * a) for a in (0.3, 0.6, 0.9)],
        ("resta", {"gamma": "0.5"}, 0.60, 0.81),
        ("resta", {"gamma": "1"}, 0.40, 0.80),
        ("resta", {"gamma": "3"}, 0.20, 0.50),
        ("safe_delta", {"s": "0.11"}, 0.02, 0.0),
        ("safe_delta", {"s": "10"}, 0.30, 0.0),
        ("gradient_restoration", {"mode": "clean"}, 0.05, 0.80),
    ]
    recs, samples = [], {}
    for name, params, h, u in spec:
        label = name + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
        samples[label] = (exact(h, 150), exact(u, 100))
        rec = make_record(label, *samples[label], name=name)
        rec["method"]["params"] = params
        rec["method"]["info"] = {"apply_s": 12.5, "peak_rss_mb": 900.0}
        recs.append(rec)
    return save(recs, tmp_path / "records", samples)


def test_methods_are_curves_ranked_by_their_own_frontiers_hypervolume(tmp_path):
    board = build(load([_curve_board(tmp_path)]))
    ((key, methods),) = board.methods.items()
    ref = board.reference_points[key]
    assert ref == (0.86, 0.0)  # harm of none, utility of aligned
    by = {c["curve"]: c for c in methods}
    assert set(by) == {"resta", "safe_delta", "gradient_restoration(mode=clean)", "interpolation"}  # no reference rows
    resta = by["resta"]
    assert resta["points"] == 3 and resta["frontier"] == ["resta(gamma=3)", "resta(gamma=1)", "resta(gamma=0.5)"]
    # gamma=0.5 is not dominated (most useful), so all three are on its frontier; the area by hand:
    hand = (0.40 - 0.20) * (0.50 - 0.0) + (0.60 - 0.40) * (0.80 - 0.0) + (0.86 - 0.60) * (0.81 - 0.0)
    assert resta["hypervolume"] == pytest.approx(hand)
    assert by["safe_delta"]["hypervolume"] == 0.0  # task metric 0: nothing above the reference utility
    assert [c["curve"] for c in methods][0] == "gradient_restoration(mode=clean)"
    assert [c["hypervolume"] for c in methods] == sorted((c["hypervolume"] for c in methods), reverse=True)
    # the floor keeps 95% of none's 0.82: 0.779; of RESTA's points gamma=1 (0.80) is the least harmful above it
    assert resta["utility_floor"] == pytest.approx(0.95 * 0.82)
    assert resta["best_under_floor"]["method"] == "resta(gamma=1)"
    assert by["safe_delta"]["best_under_floor"] is None
    single = {r["method"]: r["hypervolume"] for r in board.settings[key]}
    assert resta["best_overall"]["method"] == max(
        ("resta(gamma=0.5)", "resta(gamma=1)", "resta(gamma=3)"), key=single.get
    )
    stricter = build(load([tmp_path / "records"]), utility_floor=0.985)
    assert {c["curve"]: c for c in stricter.methods[key]}["resta"]["best_under_floor"]["method"] == "resta(gamma=0.5)"


def test_curves_are_drawn_and_every_method_has_a_note(tmp_path):
    import pandas as pd

    files = write(build(load([_curve_board(tmp_path)])), tmp_path / "out")
    svg = files["pareto.svg"].read_text()
    for legend in ("resta (3 points)", "safe_delta (2 points)", "gradient_restoration(mode=clean) (1 point)"):
        assert legend in svg  # one line and legend entry per method curve (svg text stays text)
    md = files["board.md"].read_text()
    assert "[resta](notes/resta.md)" in md and "[resta(gamma=1)](notes/resta.md)" in md
    assert "methods as curves" in md and "every row" in md
    note = (tmp_path / "out" / "notes" / "resta.md").read_text()
    for part in ("## What it is", "## Parameters", "## Deviations from the released code", "theta_U", "gamma=3"):
        assert part in note
    assert "apply 12.5 to 12.5 s a row, peak memory 900 to 900 MB" in note
    safe_delta = (tmp_path / "out" / "notes" / "safe_delta.md").read_text()
    assert "its task metric is 0 at the released\ndefault s = 0.11" in safe_delta and "576-wide model" in safe_delta
    methods = pd.read_csv(files["board-methods.csv"])
    assert list(methods["curve"])[0] == "gradient_restoration(mode=clean)" and len(methods) == 4
    assert len(pd.read_csv(files["board.csv"])) == 11 and len(pd.read_json(files["board.json"])) == 11  # per row
    html = files["board.html"].read_text()
    assert 'id="note-resta"' in html and 'href="#note-resta"' in html


def test_check_warns_when_records_come_from_another_testbed(tmp_path):
    """Records of the published setting made from another testbed (its content hash and the aligned
    model's hash differ) are still matched by setting name and method, with one warning line naming
    the inputs that differ; records of the same testbed give no such line."""
    published = Path(__file__).resolve().parents[1] / "leaderboards" / "embedded-default"
    moved = tmp_path / "other-testbed"
    moved.mkdir()
    for f in sorted((published / "records").glob("*.json"))[:3]:
        rec = json.loads(f.read_text())
        rec["setting"]["key"] = "0123456789abcdef"
        rec["setting"]["resolved"]["inputs"]["aligned"] = "9" * 64
        (moved / f.name).write_text(json.dumps(rec))
    code, report = check([moved], published)
    lines = [line for line in report.splitlines() if "setting content hash" in line]
    assert code == 0 and len(lines) == 1 and "inputs that differ: aligned)" in lines[0]
    assert "0123456789abcdef" in lines[0] and lines[0].startswith("warning:")
    code, report = check([published / "records"], published)
    assert code == 0 and "setting content hash" not in report


def test_mean_win_rate_counts_a_tie_as_half(tmp_path):
    """HELM's mean win rate over settings x axes: the share of the other methods beaten, a tie half
    (x and y both 0% harmful: each beats the other half a time; counted as a loss, two rows equally
    safe would both look worse than they are)."""
    rows = {
        "x": ([0] * 10, [1] * 5 + [0] * 5),
        "y": ([0] * 10, [1] * 6 + [0] * 4),
        "z": ([1] * 3 + [0] * 7, [1] * 6 + [0] * 4),
    }
    recs, samples = [], {}
    for n in (100, 500):  # two settings (harmful N), the same rows in each
        setting = {"model": "m", "task": "sql", "harmful_n": n, "judge": "keyword", "seed": 0}
        for label, (harm, util) in rows.items():
            recs.append(make_record(label, harm, util, name="method", setting=setting))
            samples[label] = (harm, util)
    board = build(load([save(recs, tmp_path / "records", samples)]), multi_setting=True)
    got = {a["method"]: a["mean_win_rate"] for a in board.aggregate}
    # harm: x and y tie (1/2 each) and beat z; task: y and z tie and beat x
    assert got == pytest.approx({"x": (1.5 / 2 + 0) / 2, "y": (1.5 / 2 + 1.5 / 2) / 2, "z": (0 + 1.5 / 2) / 2})
