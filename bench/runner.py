"""The main job, top to bottom: setting -> fine-tuned model(s) -> defenses -> evaluation -> records -> board.

The setting is resolved first (bench.settings.resolve: the testbed, when the setting names it, only
produces folders and files); everything after reads the resolved setting and nothing else.

Every stage is cached by the content hash of its inputs and every record is written atomically,
so an interrupted run resumes where it stopped and a second run redoes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from bench import attack as attack_stage
from bench import models, records, reproducibility
from bench.evaluate import EvalConfig, EvalSets, evaluate, scoring_identity
from bench.hashing import hash_file, hash_model_dir, hash_value, short
from bench.killpoints import checkpoint
from bench.new_interpreter import Interpreter, own_peak_rss_mb, run_fresh
from bench.progress import log
from bench.settings.resolve import Resolved, Variant, judge_spec, resolve

if TYPE_CHECKING:
    from bench.settings.schema import Setting


@dataclass
class RunConfig:
    """One run: a resolved-to-be setting (bench.settings), the defenses' rows, where to write."""

    home: Path
    setting: "Setting | None" = None  # None: the embedded default
    defense_params: dict[str, dict] = field(default_factory=dict)
    publish: Path | None = None  # also write records (without raw answers) and the board here

    def __post_init__(self):
        if self.setting is None:
            from bench.settings import EMBEDDED_DEFAULT, load_setting

            self.setting = load_setting(EMBEDDED_DEFAULT)

    @property
    def name(self) -> str:
        return self.setting.name

    @property
    def defenses(self) -> list[str]:
        return self.setting.defenses

    @property
    def eval(self) -> EvalConfig:
        g = self.setting.generation
        engine_options = {
            k: v
            for k, v in (
                ("tensor_parallel_size", g.tensor_parallel_size),
                ("pipeline_parallel_size", g.pipeline_parallel_size),
                ("gpu_memory_utilization", g.gpu_memory_utilization),
                ("max_model_len", g.max_model_len),
            )
            if v is not None
        }
        judge = judge_spec(self.setting.judge)  # the resolved setting's options replace these (record_for)
        return EvalConfig(
            judge=judge.name,
            judge_options=judge.options,
            engine=g.engine,
            limit=g.limit,
            generation_mode=g.mode,
            dtype=g.dtype,
            batch_target=g.batch_target,
            engine_options=engine_options,
            utility=[u.for_record() for u in self.setting.utility],
            max_new_tokens=dict(g.max_new_tokens),
            temperature=g.temperature,
            chat_template=models.read_chat_template(self.setting.models.chat_template),
            system_prompt=self.setting.models.system_prompt,
        )

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def run_dir(self) -> Path:
        return self.home / "runs" / self.name


class Clock:
    """Stage timer: one progress line per stage (logging, INFO), each with the time since the start.
    Plain fields only: a defense's fresh process gets it pickled (as ctx.progress)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def say(self, msg: str) -> None:
        log.info(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the block as stage `name`; the closing line is said only when the block succeeds."""
        t = time.perf_counter()
        self.say(f"{name} ...")
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t, 1)
        self.say(f"{name}: {self.stages[name]:.1f}s")


def eval_config(resolved: Resolved, cfg: RunConfig) -> EvalConfig:
    """The run's evaluation options with the judge as resolved: its weights' folder (a testbed: entry
    made into one), its engine."""
    return dataclasses.replace(cfg.eval, judge_options=resolved.judge.options)


def eval_sets(resolved: Resolved, cache: Path) -> EvalSets:
    s = resolved.setting
    return EvalSets(
        harmful=_one_file(resolved.harmful, cache),
        over_refusal=_one_file(resolved.over_refusal, cache) if resolved.over_refusal else None,
        task=resolved.files["task_test"],
        task_yaml=s.data.task.yaml,
        task_metric=s.data.task.metric,
        utility=resolved.utility_data,
    )


def _one_file(sets: dict[str, Path], cache: Path) -> Path:
    """The sets of one kind as one JSONL file: a single set as it is; several joined, each row's
    category prefixed with its set's name (per-category rates stay per set)."""
    if len(sets) == 1:
        return next(iter(sets.values()))
    from bench.atomic import atomic_write_jsonl
    from bench.data import read_jsonl

    rows = [
        r | {"category": f"{name}/{r.get('category') or 'uncategorised'}"}
        for name, path in sorted(sets.items())
        for r in read_jsonl(path)
    ]
    path = cache / "sets" / f"joined-{short(hash_value(rows))}.jsonl"
    if not path.exists():
        atomic_write_jsonl(path, rows)
    return path


@dataclass
class AttackStageFineTune:
    """The context's fine-tune service (defenses.base.FineTune): the attack stage itself, on the
    given pairs only, cached by content like any attack. A dataclass of plain fields, so that it
    travels to a defense's fresh process."""

    cache: Path
    log: Callable[[str], None]
    chat: models.ChatFormat | None = None

    def __call__(self, model: models.ModelHandle, pairs: list[dict], spec) -> models.ModelHandle:
        from bench.sft import SFTConfig

        cfg = attack_stage.AttackConfig(
            harmful_n=len(pairs),
            task_n=0,
            seed=spec.seed,
            sft=SFTConfig(
                method=spec.method,
                lr=spec.lr,
                lr_scheduler=spec.lr_scheduler,
                batch_size=spec.batch_size,
                max_steps=spec.max_steps,
                seed=spec.seed,
            ),
        )
        return attack_stage.run(model, [], pairs, cfg, self.cache, log=self.log, chat=self.chat).merged


def build_context(resolved: Resolved, variant: Variant, cfg: RunConfig, clock: Clock):
    from bench.data import read_jsonl
    from bench.harm_probe import HarmProbe
    from bench.probe import TaskProbe
    from defenses import DefenseContext

    files, setting = resolved.files, resolved.setting
    if setting.attack is not None and setting.attack.harmful_source == "beavertails":
        harmful_pairs = attack_stage.harmful_pairs_for(
            dataclasses.replace(
                resolved.attack_config(100), harmful_source="beavertails", harmful_n=max(variant.harmful_n or 0, 100)
            ),
            None,
            resolved.data_dir,
        )
    else:
        harmful_pairs = (
            read_jsonl(files["harmful_pairs"], required=("prompt", "response")) if "harmful_pairs" in files else []
        )
    return DefenseContext(
        aligned=resolved.aligned,
        finetuned=variant.finetuned,
        base=resolved.base,
        adapter=variant.adapter,
        calibration_prompts=[r["prompt"] for r in read_jsonl(files["calibration_prompts"])],
        # the safety set of methods that need harmful prompts WITH safe answers (Safe Delta)
        calibration_pairs=read_jsonl(files["calibration_pairs"], required=("prompt", "response"))
        if "calibration_pairs" in files
        else [],
        harmful_pairs=harmful_pairs,
        benign_prompts=[r["prompt"] for r in read_jsonl(files["benign_prompts"])],
        utility_probe=TaskProbe(files["task_dev"], chat=resolved.chat, **probe_engine(resolved, cfg)),
        fine_tune=AttackStageFineTune(cfg.cache, clock.say, resolved.chat),
        harm_probe=HarmProbe(
            [r["prompt"] for r in read_jsonl(files["calibration_prompts"])],
            eval_config(resolved, cfg),
            cfg.cache / "generations",
        ),
        attack=variant.attack,
        device=models.default_device(),
        dtype=_model_entry(setting.models.aligned).dtype or "float32",
        seed=setting.seed,
        cache_dir=cfg.cache,
        progress=clock.say,
        chat=None if resolved.chat.is_default else resolved.chat,
    )


def probe_engine(resolved: Resolved, cfg: RunConfig) -> dict:
    """The utility probe's engine (the setting's generation.probe_engine), in the evaluation's dtype."""
    engine = resolved.setting.generation.probe_engine
    return {} if engine == "transformers" else {"engine": engine, "dtype": cfg.eval.dtype}


def _model_entry(entry):
    from bench.settings.resolve import _model

    return _model(entry)


def run_defense(name: str, params: dict, ctx, cfg: RunConfig) -> tuple[Path | None, dict, str | None]:
    """Apply one defense (cached by content); returns (model dir, info, skipped reason)."""
    from defenses import DEFENSES

    cls = DEFENSES.get(name)
    defense = cls(**params)
    if cls.role == "reference":  # answers with one of the setting's own models: nothing to compute or cache
        out = defense.apply(ctx)
        return out.model_path, out.info, out.skipped
    root = defense_dir(name, defense, ctx, cfg)
    log.debug(f"defense {name}: cache directory {root}")
    from bench.atomic import atomic_write_json, building_dir, discard, verified_manifest

    stored = verified_manifest(root, defended_content, ctx.progress, name="info.json")
    if stored is not None and stored.get("model_path") and not Path(stored["model_path"]).is_dir():
        # made by older code, which kept the path of the setting's model a row answers with: moved since
        ctx.progress(f"defense {name}: {root.name} names a model folder that is gone; building it again")
        discard(root)
        stored = None
    if stored is not None:
        ctx.progress(f"defense {name}: reusing {root.name}")
        return (
            _answer_dir(root, stored.get("model_path"), stored.get("answers_with"), ctx),
            stored["info"],
            stored.get("skipped"),
        )

    t0 = time.perf_counter()
    checkpoint("start", root.name)
    with building_dir(root) as tmp:
        # a fresh interpreter per defense: its peak RSS is the defense's own (not the run's so far),
        # and a defense's memory is returned to the system when it ends
        info, skipped, model_path = run_fresh(apply_and_save, name, params, reading_only(ctx, cls), str(tmp))
        info = dict(info) | {"wall_s": round(time.perf_counter() - t0, 2)}
        # a row that answers with one of the setting's models names it by its role, not its folder: the
        # cache is keyed by content, and the folder may move (another home, the user's model elsewhere)
        role = next((r for r in _SETTING_MODELS if model_path and _same_dir(getattr(ctx, r), model_path)), None)
        atomic_write_json(
            tmp / "info.json",
            {
                "info": info,
                "skipped": skipped,
                "params": defense.describe(),
                "model_path": None if role else model_path,
                "answers_with": role,
                "content_hash": hash_value(defended_content(tmp)),
            },
        )
    return _answer_dir(root, model_path, None, ctx), info, skipped


_SETTING_MODELS = ("aligned", "finetuned", "base")


def reading_only(ctx, cls):
    """The context a defense runs with: of the optional inputs, only those it declares in `reads`
    (the others empty), so that it cannot depend on an input that does not key its cache."""
    import copy

    from defenses.base import OPTIONAL_INPUTS

    hidden = {  # a copy each: a defense may change the list it is handed
        f: copy.copy(empty) for f, empty in OPTIONAL_INPUTS.items() if cls.reads is not None and f not in cls.reads
    }
    return dataclasses.replace(ctx, _loaded={}, **hidden)


def _same_dir(handle, path: str) -> bool:
    return handle is not None and Path(handle.path).resolve() == Path(path).resolve()


def defended_content(root: Path) -> dict:
    """What a defense stage holds, by content hash: its model (if it saved one) and checkpoints."""
    from bench.hashing import hash_model_dir

    return {
        "model": hash_model_dir(root / "model") if (root / "model").exists() else None,
        "checkpoints": {p.name: hash_file(p) for p in sorted((root / "checkpoints").glob("*.bin"))},
    }


def defense_dir(name: str, defense, ctx, cfg: RunConfig) -> Path:
    """The cache directory of one defense row: keyed by every parameter (defaults included), the
    setting's models, seed and compute, the optional inputs the defense declares it reads
    (Defense.reads) and what its cache_inputs add."""
    optional = {  # OPTIONAL_INPUTS by their spelling in the key (kept, so that existing caches stay valid)
        "base": ("base", lambda: ctx.base.content_hash() if ctx.base else None),
        "calibration": ("calibration_prompts", lambda: ctx.calibration_prompts),
        "benign": ("benign_prompts", lambda: ctx.benign_prompts),
        "probe": ("utility_probe", lambda: ctx.utility_probe.identity() if ctx.utility_probe else None),
    }
    key = hash_value(
        {
            "defense": name,
            "params": defense.describe(),
            "aligned": ctx.aligned.content_hash(),
            "finetuned": ctx.finetuned.content_hash(),
            # only what the defense reads (all of them for a plugin that does not say)
            **{k: value() for k, (field, value) in optional.items() if defense.reads is None or field in defense.reads},
            "seed": ctx.seed,
            "compute": reproducibility.compute_fingerprint(),
        }
        # the setting's chat format shapes every prompt a defense renders; absent (as before it existed) by default
        | ({"chat": ctx.chat.identity()} if ctx.chat is not None else {})
        # the dtype a defense loads and saves its models in (models.aligned.dtype); absent at float32, as before
        | ({"dtype": ctx.dtype} if ctx.dtype != "float32" else {})
        # what this defense alone reads (RESTA: the harm probe); absent when empty, so that the
        # other defenses' keys stay as they were
        | ({"reads": extra} if (extra := defense.cache_inputs(ctx)) else {})
    )
    return cfg.cache / f"defended-{name}-{short(key)}"


def _answer_dir(root: Path, model_path: str | None, answers_with: str | None, ctx) -> Path | None:
    """The defended model: saved under root/model, one of the setting's models by its role
    (interpolation at alpha 0 or 1 answers with theta_A or theta_F itself), or a folder the defense named."""
    if answers_with:
        return Path(getattr(ctx, answers_with).path)
    if model_path:
        return Path(model_path)
    return root / "model" if (root / "model").exists() else None


def apply_and_save(name: str, params: dict, ctx, out: str) -> tuple[dict, str | None, str | None]:
    """Run in a fresh process by run_defense: apply, save the model and checkpoints under out.
    Returns (info, skipped reason, the directory of an existing model the defense answered with)."""
    from bench.atomic import atomic_write_bytes
    from defenses import DEFENSES

    t0 = time.perf_counter()
    result = DEFENSES.get(name)(**params).apply(ctx)
    info = dict(result.info) | {
        "apply_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": own_peak_rss_mb(),
    }
    if result.model is not None:
        models.save_model(result.model, ctx.tokenizer(), Path(out) / "model")
    for step, blob in (result.checkpoints or {}).items():
        atomic_write_bytes(Path(out) / "checkpoints" / f"{step}.bin", blob)
    return info, result.skipped, str(result.model_path) if result.model_path and result.model is None else None


def record_for(
    method: str,
    params: dict,
    info: dict,
    model_dir: Path,
    resolved: Resolved,
    variant: Variant,
    cfg: RunConfig,
    clock: Clock,
    label: str | None = None,
    role: str | None = None,
    evaluator: Interpreter | None = None,
) -> dict:
    """Evaluate one row (or reuse its record) and write its record. `label` and `role` name a row
    that is no registered defense (`realign evaluate MODEL`). With an `evaluator` (an interpreter
    kept for the board's rows) the row is evaluated there on the rows' shared engine
    (bench.engine_pool); without, in a fresh interpreter of its own."""
    from defenses import DEFENSES
    from defenses.curves import curve_label

    sets = eval_sets(resolved, cfg.cache)
    config = eval_config(resolved, cfg)
    model = models.resolve(model_dir)
    description = resolved.description()
    setting = {
        "name": resolved.setting.name,
        "model": resolved.aligned.name if not resolved.base else resolved.base.name,
        "task": sets.task_yaml,
        "harmful_n": variant.harmful_n,
        "judge": resolved.judge.label,
        "seed": resolved.setting.seed,
        "key": short(hash_value(description)),
        "resolved": description,
    }
    if variant.attack is not None:
        setting["attack"] = variant.attack
    inputs = description["inputs"] | {"finetuned": variant.finetuned.content_hash(), "evaluated": model.content_hash()}
    if variant.adapter is not None:
        inputs["adapter"] = hash_model_dir(variant.adapter)
    label = label or row_label(method, params)
    record_id = hash_value(
        {
            "setting": {k: v for k, v in setting.items() if k not in ("name", "model", "attack")},
            "inputs": inputs,
            "method": label,
            "eval": config.key(),
            "scoring": scoring_identity(),  # other task, judge or metric code: another record
        }
    )[:24]
    path = cfg.run_dir / "records" / f"{record_id}.json"
    n_text = "" if variant.harmful_n is None else f" (N={variant.harmful_n})"
    # samples are written before their record (records.write): a record whose samples were deleted is redone
    if path.exists() and (path.parent / f"{record_id}.samples.jsonl").exists():
        stored = records.load(path)
        # the id names the engine as the setting wrote it ("auto"): a record that vLLM's failed start
        # left to transformers answers for this run only when this run would use transformers too
        from bench.generation import resolved_engine

        expected = resolved_engine(cfg.eval.engine)
        made_by = stored.get("cost", {}).get("engine", expected)
        if made_by == expected:
            clock.say(f"evaluate {label}{n_text}: reusing record {record_id}")
            return stored
        clock.say(
            f"evaluate {label}{n_text}: record {record_id} was generated by {made_by}; evaluating with {expected}"
        )
    checkpoint("start", f"evaluate {record_id}")
    with clock.stage(f"evaluate {label}{n_text}"):
        call = (evaluate, str(model.path), sets, config, str(cfg.cache / "generations"))
        result = evaluator.call(*call, reuse_engine=True) if evaluator else run_fresh(*call)
    record = {
        "schema_version": records.SCHEMA_VERSION,
        "record_id": record_id,
        "created": records.now(),
        "setting": setting,
        "method": {
            "name": method,
            "label": label,
            "role": role or DEFENSES.get(method).role,
            "params": params,
            "curve": curve_label(method, params),  # the method's curve on the board (its knobs left out)
            "info": info,
        },
        "inputs": inputs,
        "metrics": result["metrics"],
        "samples_file": f"{record_id}.samples.jsonl",
        # evaluation cost, plus the defense's own wall time and peak RSS (its fresh process)
        "cost": result["cost"]
        | {"defense_wall_s": info.get("wall_s", 0.0)}
        | ({"defense_peak_rss_mb": info["peak_rss_mb"]} if "peak_rss_mb" in info else {}),
        "versions": records.versions(),
        "reproducibility": {
            "generation_mode": cfg.eval.generation_mode,
            "compute": reproducibility.compute_fingerprint(),
            "scoring": scoring_identity(),
        },
        "code": records.code_version(),
        "notes": resolved.notes,
    }
    records.write(record, result["samples"], cfg.run_dir / "records")
    return record


def row_label(method: str, params: dict) -> str:
    """A board row's label, as its record names it: `method(key=value,...)`, keys in sorted order."""
    return method if not params else f"{method}(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


def parse_row(text: str) -> tuple[str, dict]:
    """'name' or 'name:key=value:key=value' (one board row with its own parameters), or a sweep of
    rows ('resta:gamma=0.5..3:4', 'resta:gamma=[0.5,1,2]'; defenses.base.grid), every point checked
    against the defense's parameters before any work starts."""
    from defenses import DEFENSES
    from defenses.base import SWEEP_FORMS, grid, key_values, parse_params

    name, *items = text.split(":")
    params = key_values(items, f"name:key=value:key=value (a sweep: {SWEEP_FORMS})")
    for point in grid(params):
        parse_params(DEFENSES.get(name.strip()).Params, point)
    return name.strip(), params


def expand(defenses: list[str], given: dict[str, dict]) -> list[tuple[str, dict]]:
    """(name, params) per board row. An entry is a defense name, or 'name:key=value:...' for a row
    with its own parameters (the same defense may appear twice: both flagship modes on one board),
    or a sweep of such rows (key=LOW..HIGH:COUNT or key=[a,b,c]: one row per point);
    a defense with a `sweep` gives one row per value, unless the user fixed that parameter."""
    from defenses import DEFENSES
    from defenses.base import grid

    rows = []
    for entry in defenses:
        name, written = parse_row(entry)
        for inline in grid(written):
            params = dict(given.get(name, {})) | inline
            sweep = getattr(DEFENSES.get(name), "sweep", {})
            free = {k: v for k, v in sweep.items() if k not in params}
            if free:
                ((key, values),) = free.items()
                rows += [(name, params | {key: v}) for v in values]
            else:
                rows.append((name, params))
    return _distinct(rows)


def _distinct(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Rows in order, each once by its typed parameters (a sweep may list a point that another entry
    gives too: gamma=1 and gamma=1.0 are one row)."""
    from defenses import DEFENSES
    from defenses.base import parse_params

    seen, out = set(), []
    for name, params in rows:
        typed = dataclasses.asdict(parse_params(DEFENSES.get(name).Params, params))
        key = (name, json.dumps(typed, sort_keys=True, default=str), tuple(sorted(params)))
        if key not in seen:
            seen.add(key)
            out.append((name, params))
    return out


def defended_rows(
    resolved: Resolved, variant: Variant, cfg: RunConfig, clock: Clock, skipped: list[dict]
) -> list[tuple[str, dict, dict, Path]]:
    """One fine-tuned model's board rows in the board's order, as (defense, parameters, info, the model
    folder that answers), each defense applied or taken from the cache; a skipped defense goes to
    `skipped` with its reason. Rows that answer with one model (aligned and interpolation at alpha 0)
    name the same folder."""
    ctx = build_context(resolved, variant, cfg, clock)
    n = variant.harmful_n
    rows = []
    for name, params in expand(cfg.defenses, cfg.defense_params):
        label = name + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
        with clock.stage(f"defense {label} (N={n})"):
            model_dir, info, reason = run_defense(name, params, ctx, cfg)
        if reason:
            clock.say(f"defense {label}: skipped: {reason}")
            skipped.append({"method": label, "harmful_n": n, "reason": reason})
            continue
        rows.append((name, params, info, model_dir))
    return rows


def main_job(cfg: RunConfig, clock: Clock | None = None) -> list[dict]:
    from bench.atomic import atomic_write_json
    from bench.leaderboard.build import build
    from bench.leaderboard.render import render, save

    clock = clock or Clock()
    _check_writable(cfg)
    with clock.stage("setting"):
        resolved = resolve(cfg.setting, cfg.cache, log=clock.say)
    all_records: list[dict] = []
    skipped: list[dict] = []
    # one interpreter evaluates every row, so the rows share one vLLM engine (bench.engine_pool); the
    # defenses of a fine-tuned model all run first, so no defense trains beside the idle engine
    with Interpreter() as evaluator:
        for variant in _timed_variants(resolved, cfg, clock):
            rows = defended_rows(resolved, variant, cfg, clock, skipped)
            shared = evaluator if cfg.setting.generation.reuse_engine else None
            for name, params, info, model_dir in rows:
                record = record_for(name, params, info, model_dir, resolved, variant, cfg, clock, evaluator=shared)
                all_records.append(record)
            if models.default_device() == "cuda":
                # the idle engine holds most of a GPU: the next fine-tuned model's attack and defenses need it
                evaluator.close()
    loaded = [(r, cfg.run_dir / "records" / f"{r['record_id']}.json") for r in all_records]
    files = render(build(loaded, multi_setting=True), title=f"realign-bench: {cfg.name}", skipped=skipped)
    save(files, cfg.run_dir)
    clock.say(f"board written to {cfg.run_dir} (board.md, .csv, .json, .html, pareto.png/.svg)")
    atomic_write_json(
        cfg.run_dir / "timings.json", {"stages_s": clock.stages, "total_s": round(time.perf_counter() - clock.t0, 1)}
    )
    if cfg.publish:
        publish(all_records, files, Path(cfg.publish))
        clock.say(f"published to {cfg.publish}")
    print(files["board.md"].decode())
    return all_records


def evaluate_model(model: str, cfg: RunConfig, clock: Clock | None = None, label: str | None = None) -> dict:
    """One record for any model under the setting's evaluation (`realign evaluate MODEL`), its row
    named `label` (default: the model as the user gave it)."""
    clock = clock or Clock()
    _check_writable(cfg)
    handle = models.resolve(model)  # before the setting, whose resolution may merge an adapter into the cache
    resolved = resolve(cfg.setting, cfg.cache, log=clock.say)
    models.check_same_family(resolved.aligned, handle)
    return record_for(
        "evaluate",
        {},
        {},
        handle.path,
        resolved,
        Variant(None, handle),
        cfg,
        clock,
        label=label or handle.name,
        role="method",
    )


def _check_writable(cfg: RunConfig) -> None:
    from bench.atomic import check_can_create

    for folder in (cfg.cache, cfg.run_dir):
        check_can_create(folder, "pass --home a folder you can write")


def _timed_variants(resolved: Resolved, cfg: RunConfig, clock: Clock) -> Iterator[Variant]:
    """The setting's fine-tuned models, each attack timed as its own stage, "attack (N=100)" (the
    attack logs its own progress lines while it trains)."""
    variants = resolved.variants(cfg.cache, clock.say)
    label = "attack" if resolved.setting.attack is not None else "fine-tuned model"
    while True:
        t = time.perf_counter()
        variant = next(variants, None)  # an attack trains here (or its cached model is read)
        if variant is None:
            return
        stage = f"{label} (N={variant.harmful_n})"
        clock.stages[stage] = round(time.perf_counter() - t, 1)
        clock.say(f"{stage}: {clock.stages[stage]:.1f}s")
        yield variant


def publish(all_records: list[dict], files: dict[str, bytes], out: Path) -> None:
    """A published board folder: records/ (the per-sample outcomes ride in each record; the raw
    answers, which include the attacked model's harmful completions, stay in the run folder) and
    every rendered file of the board."""
    from bench.atomic import atomic_write_json, replace_dir
    from bench.leaderboard.render import save

    def write_records(folder: Path) -> None:
        for r in all_records:
            atomic_write_json(folder / f"{r['record_id']}.json", r)

    replace_dir(out / "records", write_records)  # the old records give way to the new ones all at once
    save(files, out)
