"""The main job, top to bottom: testbed -> attack -> defenses -> evaluation -> records -> board.

Every stage is cached by the content hash of its inputs and every record is written atomically,
so an interrupted run resumes where it stopped and a second run redoes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bench import attack as attack_stage
from bench import models, records, reproducibility
from bench.evaluate import EvalConfig, EvalSets, evaluate
from bench.new_interpreter import run_fresh
from bench.progress import log
from bench.hashing import hash_file, hash_value, short
from bench.testbed import build as testbed_stage


@dataclass
class RunConfig:
    home: Path
    name: str = "embedded-default"
    harmful_ns: list[int] = field(default_factory=lambda: [100])
    defenses: list[str] = field(default_factory=lambda: ["aligned", "none", "gradient_restoration"])
    defense_params: dict[str, dict] = field(default_factory=dict)
    testbed: testbed_stage.TestbedConfig = field(default_factory=testbed_stage.TestbedConfig)
    attack: attack_stage.AttackConfig = field(default_factory=attack_stage.AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data_dir: Path | None = None
    publish: Path | None = None  # also write records (without raw answers) and the board here

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


def eval_sets(tb: testbed_stage.Testbed) -> EvalSets:
    return EvalSets(harmful=tb.data("harmful_evaluation"), over_refusal=tb.data("overrefusal_evaluation"), task=tb.data("sql_test"))


@dataclass
class AttackStageFineTune:
    """The context's fine-tune service (defenses.base.FineTune): the attack stage itself, on the
    given pairs only, cached by content like any attack. A dataclass of plain fields, so that it
    travels to a defense's fresh process."""

    cache: Path
    log: Callable[[str], None]

    def __call__(self, model: models.ModelHandle, pairs: list[dict], spec) -> models.ModelHandle:
        from bench.sft import SFTConfig

        cfg = attack_stage.AttackConfig(harmful_n=len(pairs), task_n=0, seed=spec.seed,
                                        sft=SFTConfig(method=spec.method, lr=spec.lr, batch_size=spec.batch_size, max_steps=spec.max_steps, seed=spec.seed))
        return attack_stage.run(model, [], pairs, cfg, self.cache, log=self.log).merged


def build_context(tb, atk, cfg: RunConfig, clock: Clock):
    from bench.probe import TaskProbe
    from defenses import DefenseContext

    from bench.testbed.prompts import refusal_for

    calibration = tb.rows("harmful_calibration")
    return DefenseContext(
        aligned=tb.aligned,
        finetuned=atk.merged,
        base=tb.base,
        adapter=atk.adapter,
        calibration_prompts=[r["prompt"] for r in calibration],
        # the safety set of methods that need harmful prompts WITH safe answers (Safe Delta)
        calibration_pairs=[{"prompt": r["prompt"], "response": refusal_for(r["prompt"], cfg.testbed.seed)} for r in calibration],
        harmful_pairs=attack_stage.harmful_pairs_for(dataclasses.replace(cfg.attack, harmful_n=max(cfg.attack.harmful_n, 100)), tb.attack_pairs, cfg.data_dir),
        benign_prompts=[r["prompt"] for r in tb.rows("sql_train")],
        utility_probe=TaskProbe(tb.data("sql_dev")),
        fine_tune=AttackStageFineTune(cfg.cache, clock.say),
        seed=cfg.attack.seed,
        cache_dir=cfg.cache,
        progress=clock.say,
    )


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
    from bench.atomic import atomic_write_json, building_dir, verified_manifest

    stored = verified_manifest(root, defended_content, ctx.progress, name="info.json")
    if stored is not None:
        ctx.progress(f"defense {name}: reusing {root.name}")
        return _answer_dir(root, stored.get("model_path")), stored["info"], stored.get("skipped")

    t0 = time.perf_counter()
    with building_dir(root) as tmp:
        # a fresh interpreter per defense: its peak RSS is the defense's own (not the run's so far),
        # and a defense's memory is returned to the system when it ends
        info, skipped, model_path = run_fresh(apply_and_save, name, params, dataclasses.replace(ctx, _loaded={}), str(tmp))
        info = dict(info) | {"wall_s": round(time.perf_counter() - t0, 2)}
        atomic_write_json(tmp / "info.json", {"info": info, "skipped": skipped, "params": defense.describe(), "model_path": model_path,
                                              "content_hash": hash_value(defended_content(tmp))})
    return _answer_dir(root, model_path), info, skipped


def defended_content(root: Path) -> dict:
    """What a defense stage holds, by content hash: its model (if it saved one) and checkpoints."""
    from bench.hashing import hash_model_dir

    return {"model": hash_model_dir(root / "model") if (root / "model").exists() else None,
            "checkpoints": {p.name: hash_file(p) for p in sorted((root / "checkpoints").glob("*.bin"))}}


def defense_dir(name: str, defense, ctx, cfg: RunConfig) -> Path:
    """The cache directory of one defense row: keyed by every parameter (defaults included) and
    every input the defense can read."""
    key = hash_value({
        "defense": name, "params": defense.describe(), "aligned": ctx.aligned.content_hash(),
        "finetuned": ctx.finetuned.content_hash(), "base": ctx.base.content_hash() if ctx.base else None,
        # "probe" (not "utility_probe"): the key's spelling is kept so that existing defense caches stay valid
        "calibration": ctx.calibration_prompts, "benign": ctx.benign_prompts, "probe": ctx.utility_probe.identity() if ctx.utility_probe else None,
        "seed": ctx.seed, "compute": reproducibility.compute_fingerprint(),
    })
    return cfg.cache / f"defended-{name}-{short(key)}"


def _answer_dir(root: Path, model_path: str | None) -> Path | None:
    """The defended model: saved under root/model, or an existing directory the defense named
    (interpolation at alpha 0 or 1 answers with theta_A or theta_F itself)."""
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
    info = dict(result.info) | {"apply_s": round(time.perf_counter() - t0, 2),
                                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if result.model is not None:
        models.save_model(result.model, ctx.tokenizer(), Path(out) / "model")
    for step, blob in (result.checkpoints or {}).items():
        atomic_write_bytes(Path(out) / "checkpoints" / f"{step}.bin", blob)
    return info, result.skipped, str(result.model_path) if result.model_path and result.model is None else None


def record_for(method: str, params: dict, info: dict, model_dir: Path, tb, atk, cfg: RunConfig, clock: Clock) -> dict:
    from defenses import DEFENSES

    sets = eval_sets(tb)
    model = models.resolve(model_dir)
    setting = {"model": tb.manifest["base_name"], "task": sets.task_yaml, "harmful_n": atk.manifest["config"]["harmful_n"],
               "judge": cfg.eval.judge, "seed": cfg.attack.seed, "attack": atk.manifest["config"]}
    inputs = {
        "base": tb.manifest["base_hash"], "aligned": tb.manifest["aligned_hash"], "finetuned": atk.manifest["finetuned_hash"],
        "evaluated": model.content_hash(), "harmful_split": tb.manifest["harmful_split_hash"],
        "harmful_set": hash_file(sets.harmful), "over_refusal_set": hash_file(sets.over_refusal), "task_set": hash_file(sets.task),
    }
    label = method if not params else f"{method}(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    record_id = hash_value({"setting": setting, "inputs": inputs, "method": label, "eval": cfg.eval.to_dict()})[:24]
    path = cfg.run_dir / "records" / f"{record_id}.json"
    if path.exists():
        clock.say(f"evaluate {label} (N={setting['harmful_n']}): reusing record {record_id}")
        return records.load(path)
    with clock.stage(f"evaluate {label} (N={setting['harmful_n']})"):
        result = run_fresh(evaluate, str(model.path), sets, cfg.eval, str(cfg.cache / "generations"))
    record = {
        "schema_version": records.SCHEMA_VERSION,
        "record_id": record_id,
        "created": records.now(),
        "setting": setting,
        "method": {"name": method, "label": label, "role": DEFENSES.get(method).role, "params": params, "info": info},
        "inputs": inputs,
        "metrics": result["metrics"],
        "samples_file": f"{record_id}.samples.jsonl",
        # evaluation cost, plus the defense's own wall time and peak RSS (its fresh process)
        "cost": result["cost"] | {"defense_wall_s": info.get("wall_s", 0.0)} | ({"defense_peak_rss_mb": info["peak_rss_mb"]} if "peak_rss_mb" in info else {}),
        "versions": records.versions(),
        "reproducibility": {"generation_mode": cfg.eval.generation_mode, "compute": reproducibility.compute_fingerprint()},
        "code": records.code_version(),
        "notes": tb.manifest.get("notes", []),
    }
    records.write(record, result["samples"], cfg.run_dir / "records")
    return record


def parse_row(text: str) -> tuple[str, dict]:
    """'name' or 'name:key=value:key=value' (one board row with its own parameters), checked
    against the defense's parameters before any work starts."""
    from defenses import DEFENSES
    from defenses.base import key_values, parse_params

    name, *items = text.split(":")
    params = key_values(items, "name:key=value:key=value")
    parse_params(DEFENSES.get(name.strip()).Params, params)
    return name.strip(), params


def expand(defenses: list[str], given: dict[str, dict]) -> list[tuple[str, dict]]:
    """(name, params) per board row. An entry is a defense name, or 'name:key=value:...' for a row
    with its own parameters (the same defense may appear twice: both flagship modes on one board);
    a defense with a `sweep` gives one row per value, unless the user fixed that parameter."""
    from defenses import DEFENSES

    rows = []
    for entry in defenses:
        name, inline = parse_row(entry)
        params = dict(given.get(name, {})) | inline
        sweep = getattr(DEFENSES.get(name), "sweep", {})
        free = {k: v for k, v in sweep.items() if k not in params}
        if free:
            (key, values), = free.items()
            rows += [(name, params | {key: v}) for v in values]
        else:
            rows.append((name, params))
    return rows


def main_job(cfg: RunConfig, clock: Clock | None = None) -> list[dict]:
    from bench.atomic import atomic_write_json
    from bench.leaderboard.build import build
    from bench.leaderboard.render import render, save

    clock = clock or Clock()
    with clock.stage("testbed"):
        tb = testbed_stage.build(cfg.testbed, cfg.cache, engine=cfg.eval.engine, log=clock.say, mode=cfg.eval.generation_mode)
    all_records: list[dict] = []
    skipped: list[dict] = []
    for n in cfg.harmful_ns:
        atk_cfg = dataclasses.replace(cfg.attack, harmful_n=n)
        with clock.stage(f"attack N={n}"):
            task_rows = tb.rows("sql_train")
            pairs = attack_stage.harmful_pairs_for(atk_cfg, tb.attack_pairs, cfg.data_dir)
            atk = attack_stage.run(tb.aligned, task_rows, pairs, atk_cfg, cfg.cache, log=clock.say)
        ctx = build_context(tb, atk, cfg, clock)
        for name, params in expand(cfg.defenses, cfg.defense_params):
            label = name + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
            with clock.stage(f"defense {label} (N={n})"):
                model_dir, info, reason = run_defense(name, params, ctx, cfg)
            if reason:
                clock.say(f"defense {label}: skipped: {reason}")
                skipped.append({"method": label, "harmful_n": n, "reason": reason})
                continue
            all_records.append(record_for(name, params, info, model_dir, tb, atk, cfg, clock))
    loaded = [(r, cfg.run_dir / "records" / f"{r['record_id']}.json") for r in all_records]
    files = render(build(loaded, multi_setting=True), title=f"realign-bench: {cfg.name}", skipped=skipped)
    save(files, cfg.run_dir)
    clock.say(f"board written to {cfg.run_dir} (board.md, .csv, .json, .html, pareto.png/.svg)")
    atomic_write_json(cfg.run_dir / "timings.json", {"stages_s": clock.stages, "total_s": round(time.perf_counter() - clock.t0, 1)})
    if cfg.publish:
        publish(all_records, files, Path(cfg.publish))
        clock.say(f"published to {cfg.publish}")
    print(files["board.md"].decode())
    return all_records


def publish(all_records: list[dict], files: dict[str, bytes], out: Path) -> None:
    """A published board folder: records/ (the per-sample outcomes ride in each record; the raw
    answers, which include the attacked model's harmful completions, stay in the run folder) and
    every rendered file of the board."""
    import shutil

    from bench.atomic import atomic_write_json
    from bench.leaderboard.render import save

    if (out / "records").exists():
        shutil.rmtree(out / "records")
    for r in all_records:
        atomic_write_json(out / "records" / f"{r['record_id']}.json", r)
    save(files, out)
