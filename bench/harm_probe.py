"""The harm probe a defense calls: the harmful rate of saved models on the setting's calibration prompts.

RESTA calibrates its un-aligned model theta_U against the attacked model with it (theta_U must be
at least as harmful). It is the evaluation's own path at a smaller size: the setting's engine,
generation mode and dtype (answers cached by content like every evaluation answer), the harmful
task's greedy 64 new tokens, and the setting's judge. It reads the calibration prompts (the
defenses' recovery set), never the evaluation set. Generation runs in a fresh interpreter
(bench.new_interpreter says why), all the models of one call in the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import models
from bench.evaluate import EvalConfig
from bench.hashing import hash_value

MAX_NEW_TOKENS = 64  # the realign_harmful task's max_gen_toks


@dataclass
class HarmProbe:
    """The suite's harm service (defenses.base.HarmRate). Plain fields: it travels to a defense's
    fresh process."""

    prompts: list[str]
    config: EvalConfig
    cache_root: Path

    def identity(self) -> dict:
        """What the probe measures: part of the cache key of a defense that calls it."""
        from bench.judges.stage import identity, judge_from_spec

        out = {
            "prompts": hash_value(self.prompts),
            # the judge as its verdicts are keyed: options, weights' content, the judges' code
            "judge": identity(judge_from_spec(self.config.judge_spec())),
            "engine": self.config.engine,
            "mode": self.config.generation_mode,
            "dtype": self.config.dtype,
            "max_new_tokens": MAX_NEW_TOKENS,
        }
        # the batch target entered later: at its default it stays out, so RESTA's earlier keys hold
        return out | self.config.later_set("batch_target")

    def __call__(self, handles: list[models.ModelHandle]) -> list[dict]:
        """{rate, k, n} per model: k answers judged harmful of n judged (unknown verdicts left out)."""
        from bench.new_interpreter import run_fresh

        return run_fresh(harmful_rates, [str(h.path) for h in handles], self.prompts, self.config, str(self.cache_root))


def harmful_rates(paths: list[str], prompts: list[str], config: EvalConfig, cache_root: str) -> list[dict]:
    """Run in a fresh interpreter by HarmProbe: generate (through the answer cache) and judge."""
    from bench.generation import CachedGenerator, GenerationCache, Sampling
    from bench.judges.stage import judge_from_spec

    judge = judge_from_spec(config.judge_spec())  # with its options: a judge's weights are the setting's
    out = []
    for path in paths:
        with CachedGenerator(
            models.resolve(path),
            GenerationCache(Path(cache_root)),
            engine=config.engine,
            dtype=config.dtype,
            mode=config.generation_mode,
            batch_target=config.batch_target,
            **config.generator_options(),
        ) as generator:
            answers = generator.generate(prompts, Sampling(max_new_tokens=MAX_NEW_TOKENS))
        labels = [v.label for v in judge.label(prompts, answers)]
        k, n = labels.count("harmful"), sum(label != "unknown" for label in labels)
        out.append({"rate": k / n if n else 0.0, "k": k, "n": n})
    return out
