"""Render a Board: Markdown (GitHub pipe tables), CSV and JSON (one row per method and setting, read by pandas
without options), a self-contained HTML page (Jinja2 with autoescape), and the Pareto plot as PNG
and SVG (matplotlib). All files are written atomically, and only after everything rendered."""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import html as _html
import io
import json
import re
from pathlib import Path
from typing import Sequence

from markupsafe import Markup

from bench.atomic import atomic_write_bytes
from bench.gc_pause import without_cyclic_gc
from bench.leaderboard import judges as extra
from bench.leaderboard.build import SHOWN, UTILITY_PREFIX, Board, utility_tasks
from bench.leaderboard.mdtable import github_table

FLAT_COLUMNS = [
    "setting",
    "position",
    "method",
    "name",
    "curve",
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
METHOD_COLUMNS = [
    "setting",
    "position",
    "curve",
    "role",
    "points",
    "hypervolume",
    "utility_floor",
    "best_under_floor",
    "best_under_floor_harmful_rate",
    "best_under_floor_task_metric",
    "best_overall",
    "best_overall_harmful_rate",
    "best_overall_task_metric",
    "frontier",
]
TIES = (
    "tied: the two rows' 95% rank intervals overlap AND the paired test between them (exact McNemar on the same "
    "prompts, each axis) is significant on neither axis (Holm over the two axes, family-wise 0.05)"
)
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


def flat_methods(board: Board) -> list[dict]:
    """One row per method curve and setting (board-methods.csv / .json)."""
    out = []
    for key, methods in board.methods.items():
        for c in methods:
            flat = {"setting": key, **{k: c.get(k) for k in ("position", "curve", "role", "points", "hypervolume")}}
            flat["utility_floor"] = c.get("utility_floor")
            for which in ("best_under_floor", "best_overall"):
                p = c[which] or {}
                flat[which] = p.get("method")
                flat[f"{which}_harmful_rate"] = p.get("harmful_rate")
                flat[f"{which}_task_metric"] = p.get("task_metric")
            flat["frontier"] = "; ".join(c["frontier"])
            out.append(flat)
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
        methods = board.methods.get(key, [])
        if methods:
            parts.append(f"### {key}: methods as curves\n\n" + _methods_markdown(board, key))
        table = [
            [
                r["position"],
                _md_text(r["method"])
                if r["role"] == "reference"
                else f"[{_md_text(r['method'])}](notes/{note_slug(r['curve'])}.md)",
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
            f"### {key}: every row\n\n"
            + github_table(
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
            )
        )
    if len(board.settings) > 1 and board.aggregate:
        parts.append(
            "### Aggregate (mean win rate over settings x axes)\n\n"
            + tabulate(
                [[a["method"], f"{a['mean_win_rate']:.3f}", a["settings_x_axes"]] for a in board.aggregate],
                headers=["method", "mean win rate", "settings x axes"],
                tablefmt="github",
            )
        )
    parts.append(f"_{TIES}._")
    if skipped:
        parts.append("\n".join(f"- skipped: `{s['method']}` (N={s['harmful_n']}): {s['reason']}" for s in skipped))
    return "\n\n".join(parts) + "\n"


def _point_text(p: dict | None) -> str:
    if p is None:
        return "-"
    return f"{p['method']}: {100 * p['harmful_rate']:.1f}% harmful, {100 * p['task_metric']:.1f}% task"


def _methods_markdown(board: Board, key: str) -> str:
    methods = board.methods[key]
    floor = methods[0].get("utility_floor") if methods else None
    floor_text = "-" if floor is None else f"{100 * floor:.1f}%"
    table = [
        [
            c["position"],
            f"[{_md_text(c['curve'])}](notes/{note_slug(c['curve'])}.md)",
            c["points"],
            f"{c['hypervolume']:.4f}",
            _md_text(_point_text(c["best_under_floor"])),
            _md_text(_point_text(c["best_overall"])),
        ]
        for c in methods
    ]
    return (
        f"Ranked by the hypervolume of each method's own frontier against the reference point (harmful rate "
        f"{board.reference_points[key][0]:.3f}, task metric {board.reference_points[key][1]:.3f}). Best under the "
        f"floor: the lowest harmful rate among the points keeping at least {100 * (board.utility_floor or 0):.0f}% of "
        f"the undefended row's task metric (task metric >= {floor_text}); best overall: the point with the largest "
        "hypervolume of its own.\n\n"
        + github_table(
            table,
            headers=["#", "method (note)", "points", "frontier hypervolume", "best under the floor", "best overall"],
        )
    )


def _md_text(x: str) -> str:
    """Text for a Markdown table cell: pipes and link brackets escaped, HTML special characters
    as entities (a Markdown viewer renders inline HTML)."""
    return _html.escape(str(x)).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


@functools.lru_cache(maxsize=4096)  # a board names a few curves in every one of its settings
def note_slug(curve: str) -> str:
    """A file and anchor name for a curve's note: letters, digits, '.', '_' and '-' only, with a
    short hash of the name where that changed it (two names never share a note)."""
    plain = slug(curve)
    if plain == curve:
        return plain
    return f"{plain or 'method'}-{hashlib.sha256(curve.encode()).hexdigest()[:8]}"


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
    from matplotlib.collections import LineCollection
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
    shown = [r for r in rows if r["harmful_rate"] is not None and r["task_metric"] is not None]
    # every point's whiskers in one LineCollection and its marker in one scatter: an errorbar call per
    # method made ~7 artists each, and drawing them was most of a plot's time
    marks = [(r, "lightgrey", 1.0) for r in shown if r["role"] == "frontier"]  # (row, colour, alpha), in drawing order
    references = [r for r in shown if r["role"] == "reference"]
    marks += [(r, "black", 1.0) for r in references]
    for r in references:
        ax.annotate(
            r["method"],
            (100 * r["task_metric"], 100 * r["harmful_rate"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    # each method as its curve: every point of its sweep, its own frontier joined by a line
    colours = matplotlib.colormaps["tab10"].colors
    methods = [c for c in board.methods.get(key, []) if c["role"] == "method"]
    by_label = {r["method"]: r for r in shown}
    for i, c in enumerate(methods):
        colour = colours[i % len(colours)]
        marks += [(by_label[m], colour, 0.8) for m in c["rows"] if m in by_label]
        front = [by_label[m] for m in c["frontier"] if m in by_label]
        ax.plot(
            [100 * r["task_metric"] for r in front],
            [100 * r["harmful_rate"] for r in front],
            "-",
            color=colour,
            label=f"{c['curve']} ({c['points']} point{'s' if c['points'] != 1 else ''})",
            zorder=3,
        )
    if marks:
        segments, seg_colours = [], []
        for r, colour, alpha in marks:
            x, y = 100 * r["task_metric"], 100 * r["harmful_rate"]
            rgba = matplotlib.colors.to_rgba(colour, alpha)
            segments.append([(100 * r["task_metric_ci_low"], y), (100 * r["task_metric_ci_high"], y)])
            segments.append([(x, 100 * r["harmful_rate_ci_low"]), (x, 100 * r["harmful_rate_ci_high"])])
            seg_colours += [rgba, rgba]
        ax.add_collection(LineCollection(segments, colors=seg_colours, linewidths=0.6, zorder=2))
        # the caps: a bar's two ends as markers, "|" across the horizontal bars and "_" across the vertical
        for marker, bars in (("|", segments[0::2]), ("_", segments[1::2])):
            ax.scatter(
                [x for bar in bars for x, _ in bar],
                [y for bar in bars for _, y in bar],
                marker=marker,
                s=16,
                c=[rgba for rgba in seg_colours[0::2] for _ in (0, 1)],
                linewidths=0.6,
                zorder=2,
            )
        ax.scatter(
            [100 * r["task_metric"] for r, _, _ in marks],
            [100 * r["harmful_rate"] for r, _, _ in marks],
            c=[matplotlib.colors.to_rgba(colour, alpha) for _, colour, alpha in marks],
            s=16,
            zorder=2,
        )
        ax.autoscale_view()
    ax.set_xlabel("task metric (%)  \u2192 better")
    ax.set_ylabel("harmful rate (%)  \u2193 better")
    ax.set_title(key, fontsize=9)
    ax.grid(alpha=0.3)
    if curve or methods:
        ax.legend(fontsize=7, loc="upper left")
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png")
    # fixed ids and no date in the metadata: the same board gives the same bytes
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "realign"}):
        fig.savefig(svg, format="svg", metadata={"Date": None})
    return png.getvalue(), svg.getvalue()


def _cells(r: dict, judges: Sequence[str] = (), tasks: Sequence[str] = ()) -> list[tuple]:
    """One board row as (css class, sort value, text, CI text) cells: formatted here, where Python's
    own formatting is several times cheaper than a Jinja filter per cell on a 10,000-row page.

    Every text and CI text is a number formatted here (HTML-safe as it is) or escaped here, except
    the method's label in the "name" cell, which _row_html escapes; so are the sort values."""
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
    where = _esc(r["vs_interpolation"])
    cells.append(("", where, where, ""))
    cells.append(("", r["wall_s"], f"{r['wall_s']:.0f}", ""))
    return cells


def _esc(x) -> str:
    """Escaped text for HTML (stdlib html.escape, quotes too); numbers need none."""
    return str(x) if isinstance(x, (int, float)) else _html.escape(str(x))


_BREAK_AFTER = re.compile(r"(?<=[(,])")


def _breakable(label: str) -> str:
    """A row label escaped, free to break after its "(" and commas: a point is named by every
    parameter, and such a label unbroken widened the tables past a laptop's screen."""
    return "<wbr>".join(_esc(part) for part in _BREAK_AFTER.split(str(label)))


def _row_html(r: dict, judges: Sequence[str] = (), tasks: Sequence[str] = ()) -> Markup:
    """One <tr>, every text escaped. Joined in Python because a Jinja loop over 110,000 cells is
    the slowest part of a 10,000-record page; the page around the rows stays in the template."""
    link = f'<a href="#note-{_esc(note_slug(r["curve"]))}">' if r["role"] != "reference" and "curve" in r else ""

    tds = []
    for cls, v, text, ci in _cells(r, judges, tasks):  # texts are safe as _cells makes them, but the name's
        if cls == "name":
            v, text = _esc(v), f"{link}{_breakable(text)}</a>" if link else _breakable(text)
        tds.append(
            f'<td class="{cls}" data-v="{v}">{text} <span class="ci">{ci}</span></td>'
            if ci
            else f'<td class="{cls}" data-v="{v}">{text}</td>'
        )
    tds = "".join(tds)
    return Markup(f'<tr class="{"tied" if r["tied_with"] else ""}">{tds}</tr>')


def _category_rows_html(cats: dict[str, dict[str, float]], names: list[str]) -> Markup:
    rows = []
    for method, by in cats.items():
        tds = "".join(
            f'<td data-v="{by[c]}">{100 * by[c]:.0f}</td>' if c in by else '<td data-v="-1">\u2013</td>' for c in names
        )
        rows.append(f'<tr><td class="name" data-v="{_esc(method)}">{_esc(method)}</td>{tds}</tr>')
    return Markup("\n".join(rows))


def html(board: Board, plots: dict[str, bytes], title: str, notes: dict[str, str] | None = None) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    notes = notes or {}
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    settings = []
    for key, rows in board.settings.items():
        cats = board.categories.get(key, {})
        methods = board.methods.get(key, [])
        names = sorted({c for v in cats.values() for c in v})
        judges = extra.judges_of(rows)
        tasks = _setting_utility(rows)
        settings.append(
            {
                "key": key,
                "judges": judges,
                "utility": tasks,
                "agreement": board.agreement.get(key, {}),
                # each row is escaped already: a plain join (Markup.join escapes every item again, a copy a row)
                "rows": Markup("\n".join(_row_html(r, judges, tasks) for r in rows)),
                "ref": board.reference_points[key],
                "categories": _category_rows_html(cats, names) if cats else "",
                "category_names": names,
                "plot": base64.b64encode(plots[key]).decode() if key in plots else None,
                "methods": Markup("\n".join(_method_row_html(c) for c in methods)),
                "floor": methods[0].get("utility_floor") if methods else None,
            }
        )
    return env.get_template("board.html.j2").render(
        title=title,
        settings=settings,
        aggregate=board.aggregate if len(settings) > 1 else [],
        ties=TIES,
        floor_share=board.utility_floor,
        notes=[{"slug": note_slug(curve), "curve": curve, "html": _note_html(text)} for curve, text in notes.items()],
    )


def _method_row_html(c: dict) -> Markup:
    def point(p):
        if p is None:
            return '<td class="point" data-v="-1">\u2013</td>'
        rates = f"{100 * p['harmful_rate']:.1f}% harmful, {100 * p['task_metric']:.1f}% task"
        label = _breakable(p["method"])
        return f'<td class="point" data-v="{p["harmful_rate"]}">{label}<br><span class="ci">{rates}</span></td>'

    name = _esc(c["curve"])
    return Markup(
        f'<tr><td data-v="{c["position"]}">{c["position"]}</td>'
        f'<td class="name" data-v="{name}"><a href="#note-{_esc(note_slug(c["curve"]))}">{name}</a></td>'
        f'<td data-v="{c["points"]}">{c["points"]}</td>'
        f'<td data-v="{c["hypervolume"]}">{c["hypervolume"]:.4f}</td>'
        f"{point(c['best_under_floor'])}{point(c['best_overall'])}</tr>"
    )


def _note_html(markdown_text: str) -> Markup:
    """A note's Markdown as HTML: every line escaped first, then headings, table rows and paragraphs
    made from the escaped text (no Markdown library renders raw HTML here: nothing passes unescaped)."""
    out, table = [], []

    def flush():
        if table:
            head, *body = table
            # a row's cells are split where " | " separates them (an escaped pipe is "\\|", never " | "),
            # then the escaped pipes restored: whole-line replaces, not a Python loop over 100,000 cells
            cells = lambda line, tag: (  # noqa: E731
                f"<{tag}>"
                + line.strip("|").strip().replace(" | ", f"</{tag}><{tag}>").replace("\\|", "|")
                + f"</{tag}>"
            )
            out.append(
                "<table><thead><tr>"
                + cells(head, "th")
                + "</tr></thead><tbody>"
                + "".join("<tr>" + cells(r, "td") + "</tr>" for r in body if not r.startswith("|-"))
                + "</tbody></table>"
            )
            table.clear()

    for line in markdown_text.splitlines():
        # the note's Markdown holds its text entity-escaped (a Markdown viewer renders raw HTML): back to
        # plain text, then escaped once, last
        text = _html.escape(_html.unescape(line) if "&" in line else line, quote=False)
        if line.startswith("|"):
            table.append(text)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h4>{text[3:]}</h4>")
        elif line.startswith("# "):
            continue  # the note's title is the section heading
        elif line.strip():
            out.append(f"<p>{text}</p>")
    flush()
    return Markup("\n".join(out))


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-")[:80]


def write(
    board: Board, out: Path, title: str = "realign-bench leaderboard", skipped: Sequence[dict] = ()
) -> dict[str, Path]:
    """Render everything in memory first, then write: a failure leaves no half-written board."""
    return save(render(board, title, skipped), out)


@without_cyclic_gc
def render(board: Board, title: str = "realign-bench leaderboard", skipped: Sequence[dict] = ()) -> dict[str, bytes]:
    """Every file of a board by name, in memory: Markdown, CSV, JSON, HTML, the Pareto plots."""
    rows = flat_rows(board)
    buf = io.StringIO()
    # flat_rows holds exactly these keys: "ignore" skips csv's check of every row's keys against them
    writer = csv.DictWriter(buf, fieldnames=flat_columns(board), extrasaction="ignore")
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
    from bench.leaderboard.notes import notes as method_notes

    notes = method_notes(board)
    for curve, text in notes.items():
        files[f"notes/{note_slug(curve)}.md"] = text.encode()
    methods = flat_methods(board)
    methods_buf = io.StringIO()
    writer = csv.DictWriter(methods_buf, fieldnames=METHOD_COLUMNS)
    writer.writeheader()
    writer.writerows(methods)
    files["board-methods.csv"] = methods_buf.getvalue().encode()
    files["board-methods.json"] = json.dumps(methods).encode()
    files["board.html"] = html(board, svgs, title, notes).encode()
    files["board-details.json"] = json.dumps(
        {
            "settings": board.settings,
            "aggregate": board.aggregate,
            "reference_points": board.reference_points,
            "categories": board.categories,
            "methods": board.methods,
            "utility_floor_share": board.utility_floor,
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
