"""Render a Board: Markdown (tabulate), CSV and JSON (one row per method and setting, read by pandas
without options), a self-contained HTML page (Jinja2 with autoescape), and the Pareto plot as PNG
and SVG (matplotlib). All files are written atomically, and only after everything rendered."""

from __future__ import annotations

import base64
import csv
import html as _html
import io
import json
import re
from pathlib import Path
from typing import Sequence

from markupsafe import Markup

from bench.atomic import atomic_write_bytes
from bench.leaderboard import judges as extra
from bench.leaderboard.build import SHOWN, UTILITY_PREFIX, Board, utility_tasks

FLAT_COLUMNS = [
    "setting",
    "position",
    "method",
    "name",
    "role",
    "pareto_rank",
    "rank_low",
    "rank_high",
    "tied",
    "hypervolume",
    *[f"{m}{suffix}" for m in SHOWN for suffix in ("", "_ci_low", "_ci_high", "_n")],
    "harm_reduction_share",
    "utility_kept_share",
    "p_harm_vs_none",
    "p_utility_vs_none",
    "p_harm_vs_next",
    "vs_interpolation",
    "wall_s",
    "record_id",
]
MAX_PLOTS = 4  # settings that get a plot: matplotlib costs ~0.4 s per figure (PNG + SVG)


def flat_columns(board: Board) -> list[str]:
    """FLAT_COLUMNS, then five columns per extra judge (rate, interval, n, unknown) when records have them,
    then value, interval and n of every utility task on the board ("utility:mmlu", ...)."""
    judges = sorted({j for rows in board.settings.values() for j in extra.judges_of(rows)})
    return (
        FLAT_COLUMNS
        + [c for j in judges for c in extra.flat_columns(j)]
        + [f"{UTILITY_PREFIX}{t}{suffix}" for t in utility_tasks(board) for suffix in ("", "_ci_low", "_ci_high", "_n")]
    )


def _utility_flat(r: dict) -> dict:
    return {
        f"{UTILITY_PREFIX}{t}{suffix}": u[key]
        for t, u in r.get("utility", {}).items()
        for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"), ("_n", "n"))
    }


def _setting_utility(rows: list[dict]) -> list[str]:
    """The utility tasks the rows of one setting report."""
    return sorted({t for r in rows for t in r.get("utility", {})})


def _utility_pct(r: dict, task: str) -> str:
    u = r.get("utility", {}).get(task)
    if not u or u["value"] is None:
        return "-"
    return f"{100 * u['value']:.1f} [{100 * u['ci_low']:.1f}, {100 * u['ci_high']:.1f}]"


def flat_rows(board: Board) -> list[dict]:
    columns = flat_columns(board)
    out = []
    judges = sorted({j for rows in board.settings.values() for j in extra.judges_of(rows)})
    for rows in board.settings.values():
        for r in rows:
            vs_none, vs_next = r.get("vs_none") or {}, r.get("vs_next") or {}
            flat = {k: r.get(k) for k in FLAT_COLUMNS if k in r}
            flat.update(
                rank_low=r["rank_interval"][0],
                rank_high=r["rank_interval"][1],
                tied=bool(r["tied_with"]),
                p_harm_vs_none=vs_none.get("harmful_rate", {}).get("p"),
                p_utility_vs_none=vs_none.get("task_metric", {}).get("p"),
                p_harm_vs_next=vs_next.get("harmful_rate", {}).get("p"),
            )
            for j in judges:
                flat.update(zip(extra.flat_columns(j), extra.flat_values(r, j)))
            flat.update(_utility_flat(r))
            out.append({k: flat.get(k) for k in columns})
    return out


def _pct(r: dict, m: str) -> str:
    if r.get(m) is None:
        return "-"
    return f"{100 * r[m]:.1f} [{100 * r[m + '_ci_low']:.1f}, {100 * r[m + '_ci_high']:.1f}]"


def markdown(board: Board, skipped: Sequence[dict] = ()) -> str:
    """The board as Markdown tables; `skipped` rows (method, harmful_n, reason: defenses that could
    not run on these inputs) are listed under them."""
    from tabulate import tabulate

    parts = []
    for key, rows in board.settings.items():
        judges = extra.judges_of(rows)
        tasks = _setting_utility(rows)
        table = [
            [
                r["position"],
                r["method"],
                f"{r['pareto_rank']}{' (tied)' if r['tied_with'] else ''}",
                f"{r['rank_interval'][0]:.0f}-{r['rank_interval'][1]:.0f}",
                _pct(r, "harmful_rate"),
                *[" ".join(extra.cell_text(r, j)).strip() for j in judges],
                _pct(r, "over_refusal"),
                _pct(r, "task_metric"),
                *[_utility_pct(r, t) for t in tasks],
                f"{r['hypervolume']:.4f}",
                _p(r.get("vs_none"), "harmful_rate"),
                r["vs_interpolation"],
            ]
            for r in rows
        ]
        n = rows[0]["harmful_rate_n"] if rows else 0
        parts.append(
            f"### {key}\n\n"
            + tabulate(
                table,
                headers=[
                    "#",
                    "method",
                    "Pareto rank",
                    "rank 95%",
                    f"harmful % (n={n})",
                    *[f"harmful % ({j})" for j in judges],
                    "over-refusal %",
                    "task %",
                    *[f"{t} %" for t in tasks],
                    "hypervolume",
                    "p vs none",
                    "vs interpolation",
                ],
                tablefmt="github",
                disable_numparse=True,
            )
        )  # cells are pre-formatted; parsing them is most of tabulate's time
    if len(board.settings) > 1 and board.aggregate:
        parts.append(
            "### Aggregate (mean win rate over settings x axes)\n\n"
            + tabulate(
                [[a["method"], f"{a['mean_win_rate']:.3f}", a["settings_x_axes"]] for a in board.aggregate],
                headers=["method", "mean win rate", "settings x axes"],
                tablefmt="github",
            )
        )
    if skipped:
        parts.append("\n".join(f"- skipped: `{s['method']}` (N={s['harmful_n']}): {s['reason']}" for s in skipped))
    return "\n\n".join(parts) + "\n"


def _p(test: dict | None, axis: str) -> str:
    if not test or test.get(axis, {}).get("p") is None:
        return "-"
    return f"{test[axis]['p']:.3g}"


def plot(board: Board, key: str) -> tuple[bytes, bytes]:
    """(png, svg) of one setting: points with CI whiskers, the interpolation curve, the frontier.

    Drawn on a bare matplotlib Figure with the Agg canvas: pyplot's import and figure manager cost
    more than the drawing, and a fixed layout replaces tight_layout's extra draw. SVG text stays text
    (svg.fonttype none): smaller files, searchable labels.
    """
    import warnings

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)  # exotic method names

    rows = board.settings[key]
    fig = Figure(figsize=(7, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.1, 0.86, 0.83))
    curve = sorted(
        (
            (r["task_metric"], r["harmful_rate"])
            for r in rows
            if r["role"] == "frontier" and r["task_metric"] is not None
        )
    )
    if curve:
        ax.plot(
            [100 * u for u, _ in curve],
            [100 * h for _, h in curve],
            "--",
            color="grey",
            label="interpolation curve",
            zorder=1,
        )
    front = sorted(
        ((r["task_metric"], r["harmful_rate"]) for r in rows if r["pareto_rank"] == 1 and r["task_metric"] is not None)
    )
    if front:
        ax.plot(
            [100 * u for u, _ in front],
            [100 * h for _, h in front],
            "-",
            color="tab:green",
            alpha=0.6,
            label="Pareto frontier",
            zorder=1,
        )
    shown = [r for r in rows if r["harmful_rate"] is not None and r["task_metric"] is not None]
    for grey in (False, True):  # one errorbar call per colour, not one per point
        pts = [r for r in shown if (r["role"] == "frontier") == grey]
        if not pts:
            continue
        x = [100 * r["task_metric"] for r in pts]
        y = [100 * r["harmful_rate"] for r in pts]
        xerr = [
            [xi - 100 * r["task_metric_ci_low"] for xi, r in zip(x, pts)],
            [100 * r["task_metric_ci_high"] - xi for xi, r in zip(x, pts)],
        ]
        yerr = [
            [yi - 100 * r["harmful_rate_ci_low"] for yi, r in zip(y, pts)],
            [100 * r["harmful_rate_ci_high"] - yi for yi, r in zip(y, pts)],
        ]
        ax.errorbar(
            x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, ms=5, zorder=2, color="lightgrey" if grey else "tab:blue"
        )
        if not grey:
            for r, xi, yi in zip(pts, x, y):
                ax.annotate(r["method"], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("task metric (%)  \u2192 better")
    ax.set_ylabel("harmful rate (%)  \u2193 better")
    ax.set_title(key, fontsize=9)
    ax.grid(alpha=0.3)
    if curve or front:
        ax.legend(fontsize=8, loc="upper left")
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png")
    with matplotlib.rc_context(
        {"svg.fonttype": "none", "svg.hashsalt": "realign"}
    ):  # fixed ids: same board, same bytes
        fig.savefig(svg, format="svg")
    return png.getvalue(), svg.getvalue()


def _cells(r: dict, judges: Sequence[str] = (), tasks: Sequence[str] = ()) -> list[tuple]:
    """One board row as (css class, sort value, text, CI text) cells: formatted here, where Python's
    own formatting is several times cheaper than a Jinja filter per cell on a 10,000-row page."""
    cells = [
        ("", r["position"], str(r["position"]), ""),
        ("name", r["method"], r["method"], ""),
        ("rank", r["pareto_rank"], f"{r['pareto_rank']}{' (tied)' if r['tied_with'] else ''}", ""),
        ("", r["rank_interval"][0], f"{r['rank_interval'][0]:.0f}\u2013{r['rank_interval'][1]:.0f}", ""),
    ]
    for m in SHOWN:
        if r[m] is None:
            cells.append(("", -1, "\u2013", ""))
        else:
            cells.append(
                (
                    "",
                    r[m],
                    f"{100 * r[m]:.1f}",
                    f"[{100 * r[m + '_ci_low']:.1f}, {100 * r[m + '_ci_high']:.1f}] n={r[m + '_n']}",
                )
            )
        if m == "harmful_rate":  # the other judges beside the primary one
            for j in judges:
                value = (r.get("judges", {}).get(j) or {}).get("value")
                cells.append(("", -1 if value is None else value, *extra.cell_text(r, j)))
    for t in tasks:  # the setting's utility tasks, after the task metric
        u = r.get("utility", {}).get(t)
        if not u or u["value"] is None:
            cells.append(("", -1, "\u2013", ""))
        else:
            ci = f"[{100 * u['ci_low']:.1f}, {100 * u['ci_high']:.1f}] n={u['n']}"
            cells.append(("", u["value"], f"{100 * u['value']:.1f}", ci))
    cells.append(("", r["hypervolume"], f"{r['hypervolume']:.4f}", ""))
    p = (r.get("vs_none") or {}).get("harmful_rate", {}).get("p")
    cells.append(("", 2 if p is None else p, "\u2013" if p is None else f"{p:.3g}", ""))
    cells.append(("", r["vs_interpolation"], r["vs_interpolation"], ""))
    cells.append(("", r["wall_s"], f"{r['wall_s']:.0f}", ""))
    return cells


def _esc(x) -> str:
    """Escaped text for HTML (stdlib html.escape, quotes too); numbers need none."""
    return str(x) if isinstance(x, (int, float)) else _html.escape(str(x))


def _row_html(r: dict, judges: Sequence[str] = (), tasks: Sequence[str] = ()) -> Markup:
    """One <tr>, every text escaped. Joined in Python because a Jinja loop over 110,000 cells is
    the slowest part of a 10,000-record page; the page around the rows stays in the template."""
    tds = "".join(
        f'<td class="{cls}" data-v="{_esc(v)}">{_esc(text)}'
        + (f' <span class="ci">{_esc(ci)}</span>' if ci else "")
        + "</td>"
        for cls, v, text, ci in _cells(r, judges, tasks)
    )
    return Markup(f'<tr class="{"tied" if r["tied_with"] else ""}">{tds}</tr>')


def _category_rows_html(cats: dict[str, dict[str, float]], names: list[str]) -> Markup:
    rows = []
    for method, by in cats.items():
        tds = "".join(
            f'<td data-v="{by[c]}">{100 * by[c]:.0f}</td>' if c in by else '<td data-v="-1">\u2013</td>' for c in names
        )
        rows.append(f'<tr><td class="name" data-v="{_esc(method)}">{_esc(method)}</td>{tds}</tr>')
    return Markup("\n".join(rows))


def html(board: Board, plots: dict[str, bytes], title: str) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    settings = []
    for key, rows in board.settings.items():
        cats = board.categories.get(key, {})
        names = sorted({c for v in cats.values() for c in v})
        judges = extra.judges_of(rows)
        tasks = _setting_utility(rows)
        settings.append(
            {
                "key": key,
                "judges": judges,
                "utility": tasks,
                "agreement": board.agreement.get(key, {}),
                "rows": Markup("\n").join(_row_html(r, judges, tasks) for r in rows),
                "ref": board.reference_points[key],
                "categories": _category_rows_html(cats, names) if cats else "",
                "category_names": names,
                "plot": base64.b64encode(plots[key]).decode() if key in plots else None,
            }
        )
    return env.get_template("board.html.j2").render(
        title=title, settings=settings, aggregate=board.aggregate if len(settings) > 1 else []
    )


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-")[:80]


def write(
    board: Board, out: Path, title: str = "realign-bench leaderboard", skipped: Sequence[dict] = ()
) -> dict[str, Path]:
    """Render everything in memory first, then write: a failure leaves no half-written board."""
    return save(render(board, title, skipped), out)


def render(board: Board, title: str = "realign-bench leaderboard", skipped: Sequence[dict] = ()) -> dict[str, bytes]:
    """Every file of a board by name, in memory: Markdown, CSV, JSON, HTML, the Pareto plots."""
    rows = flat_rows(board)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=flat_columns(board))
    writer.writeheader()
    writer.writerows(rows)
    files: dict[str, bytes] = {
        "board.md": markdown(board, skipped).encode(),
        "board.csv": buf.getvalue().encode(),
        "board.json": json.dumps(rows).encode(),
    }  # no indent: json's C encoder only runs without it
    svgs = {}
    for i, key in enumerate(board.settings):
        if i >= MAX_PLOTS:
            break
        png, svg = plot(board, key)
        name = "pareto" if len(board.settings) == 1 else f"pareto-{slug(key)}"
        files[f"{name}.png"], files[f"{name}.svg"] = png, svg
        svgs[key] = svg
    files["board.html"] = html(board, svgs, title).encode()
    files["board-details.json"] = json.dumps(
        {
            "settings": board.settings,
            "aggregate": board.aggregate,
            "reference_points": board.reference_points,
            "categories": board.categories,
            "skipped": list(skipped),
            "judge_agreement": board.agreement,
        }
    ).encode()
    return files


def save(files: dict[str, bytes], out: Path) -> dict[str, Path]:
    """Write rendered files into `out`, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return {name: out / name for name in files}
