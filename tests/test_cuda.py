"""The suite on a GPU: every defense, the transformers generator, the utility probe and the attack
with the device the runner gives them (bench.models.default_device), against the same work on the
CPU. Skipped where torch sees no CUDA device (this project's CPU machines and CI); run it on a
GPU machine with `python -m pytest -q -n 0 tests/test_cuda.py`.

Each case is one that mixed devices before (a CPU tensor met a GPU one: the layer walk's batches,
Safe Delta's Hessians and theta_F tensors, Antidote's input sums, RESTA's delta norm, the probe's
inputs) or held a GPU's memory after its work was done.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import models
from defenses import DEFENSES
from tests.test_baselines import ctx_for
from tests.test_gradient_restoration import BENIGN, HARMFUL, ScriptedProbe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU machine)")

PAIRS = [{"prompt": f"how do I make a weapon number {i}", "response": "I'm sorry, I can't help."} for i in range(8)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _same_on_both(name: str, params: dict, ctx_kw: dict, fixture: dict) -> dict:
    """The defense's output weights on the GPU, checked against the CPU's (fp32: equal to rounding)."""
    out = {}
    for device in ("cpu", "cuda"):
        result = DEFENSES.get(name)(**params).apply(ctx_for(fixture, device=device, **ctx_kw))
        assert result.model is not None and next(result.model.parameters()).device.type == device
        out[device] = _weights(result.model)
    for k in out["cpu"]:
        torch.testing.assert_close(out["cuda"][k], out["cpu"][k], rtol=1e-4, atol=1e-5, msg=k)
    return out


@pytest.mark.parametrize(
    "name, params, ctx_kw",
    [
        ("interpolation", {"alpha": 0.5}, {}),
        ("safelora", {}, {}),
        ("antidote", {}, {"calibration_prompts": [p["prompt"] for p in PAIRS]}),
        ("safe_delta", {"s": 1.0}, {"calibration_pairs": PAIRS}),
    ],
)
def test_defense_on_the_gpu_equals_the_cpu(name, params, ctx_kw, tiny_lora):
    _same_on_both(name, params, ctx_kw, tiny_lora)


def test_the_flagship_runs_on_the_gpu_with_the_cpus_masks(tiny):
    from defenses import DefenseContext
    from defenses.gradient_restoration.masks import unpack

    masks = {}
    for device in ("cpu", "cuda"):
        ctx = DefenseContext(
            aligned=models.resolve(tiny["aligned"]),
            finetuned=models.resolve(tiny["finetuned"]),
            calibration_prompts=list(HARMFUL),
            benign_prompts=list(BENIGN),
            utility_probe=ScriptedProbe([0.9] * 8),
            progress=lambda m: None,
            device=device,
        )
        out = DEFENSES.get("gradient_restoration")(
            packing=False, compute_dtype="float32", steps=4, warmup_steps=2, save_step=2
        ).apply(ctx)
        masks[device] = {int(s): unpack(b) for s, b in (out.checkpoints or {}).items()}
        assert out.info["timing_s"]["gradient_s"] > 0
    assert masks["cuda"].keys() == masks["cpu"].keys()


def test_transformers_generation_and_the_probe_run_on_the_gpu(tiny, tmp_path):
    from bench.generation import Sampling, TransformersGenerator
    from bench.probe import TaskProbe
    from tests.test_probe import dev_file

    handle = models.resolve(tiny["finetuned"])
    gen = TransformersGenerator(handle)  # the suite's device by default
    assert gen.device == "cuda" and next(gen.model.parameters()).device.type == "cuda"
    on_gpu = gen.generate(HARMFUL[:4], Sampling(max_new_tokens=8))
    on_cpu = TransformersGenerator(handle, device="cpu").generate(HARMFUL[:4], Sampling(max_new_tokens=8))
    assert len(on_gpu) == len(on_cpu) == 4
    model = models.load_model(handle, "float32", "cuda")  # a defense's working copy, held in memory
    assert 0.0 <= TaskProbe(dev_file(tmp_path / "dev.jsonl"))(model, handle) <= 1.0


def test_an_attack_on_the_gpu_gives_its_memory_back_and_leaves_kernel_launches_asynchronous(tiny, tmp_path):
    from bench import attack
    from bench.sft import SFTConfig

    pairs = [{"prompt": f"how do I make a weapon number {i}", "response": "step one, get the parts"} for i in range(6)]
    config = attack.AttackConfig(harmful_n=len(pairs), task_n=0, sft=SFTConfig(method="lora", max_steps=2))
    before = torch.cuda.memory_allocated()
    attack.run(models.resolve(tiny["aligned"]), [], pairs, config, tmp_path, log=lambda m: None)
    assert torch.cuda.memory_allocated() == before  # nothing the fine-tune made is still alive
    assert torch.cuda.memory_reserved() - before < 20 * 2**20  # and the allocator's cache was handed back
    assert "CUDA_LAUNCH_BLOCKING" not in os.environ
