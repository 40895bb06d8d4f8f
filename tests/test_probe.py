"""The utility probe (bench.probe): the vLLM probe answers a model held in memory as a fresh engine
answers the same model from its folder, starts one engine for all its calls, and keys the defenses
that call it (and only those) by its engine."""

from __future__ import annotations

import pickle

import pytest

from bench.new_interpreter import run_fresh
from bench.probe import TaskProbe
from bench.tiny_models import lora_like_finetune, make_llama
from tests.conftest import write_jsonl

PROMPTS = [f"select the rows of table {i}" for i in range(12)] + ["count the users", "list every order"]


def dev_file(path, answers=None):
    return write_jsonl(path, [{"prompt": p, "response": (answers or {}).get(p, "SELECT 1")} for p in PROMPTS])


def test_the_probe_engine_keys_only_the_defenses_that_call_the_probe(tmp_path):
    from defenses import DEFENSES, DefenseContext

    dev = dev_file(tmp_path / "dev.jsonl")
    on_vllm, on_transformers = TaskProbe(dev, engine="vllm"), TaskProbe(dev)
    # what the probe measures is one identity on either engine: every defense's key names it
    assert on_vllm.identity() == on_transformers.identity()
    assert on_transformers.engine_identity() == {}  # a transformers probe keys as before engines existed
    assert on_vllm.engine_identity() == {"engine": "vllm", "dtype": "bfloat16"}
    assert TaskProbe(dev, engine="vllm", dtype="float32").engine_identity()["dtype"] == "float32"
    with pytest.raises(ValueError, match="probe engine 'sglang'"):
        TaskProbe(dev, engine="sglang")

    def inputs(name: str, probe) -> dict:
        ctx = DefenseContext(aligned=None, finetuned=None, utility_probe=probe)
        return DEFENSES.get(name)().cache_inputs(ctx)

    assert inputs("gradient_restoration", on_vllm) == {"probe_engine": on_vllm.engine_identity()}
    assert inputs("gradient_restoration", on_transformers) == {}
    for name in ("interpolation", "safelora", "antidote"):  # they never call the probe
        assert inputs(name, on_vllm) == inputs(name, on_transformers)


def test_a_pickled_probe_carries_no_engine(tmp_path):
    probe = TaskProbe(dev_file(tmp_path / "dev.jsonl"), engine="vllm")
    probe._vllm = object()  # a live engine stands here once the probe has run; it stays in its process
    again = pickle.loads(pickle.dumps(probe))
    assert again._vllm is None and again.engine_identity() == probe.engine_identity()


@pytest.mark.vllm
@pytest.mark.slow
def test_the_vllm_probe_answers_a_model_in_memory_as_a_fresh_engine_answers_its_folder(tmp_path, tiny):
    pytest.importorskip("vllm")
    from tests.helpers import vllm_generate, vllm_probe_answers

    make_llama(tmp_path / "a", tiny["tok"], layers=2, hidden=128, heads=2, kv_heads=1)
    lora_like_finetune(tmp_path / "a", tmp_path / "b", scale=0.5)
    fresh_a = dict(zip(PROMPTS, run_fresh(vllm_generate, str(tmp_path / "a"), PROMPTS, 8)))
    fresh_b = dict(zip(PROMPTS, run_fresh(vllm_generate, str(tmp_path / "b"), PROMPTS, 8)))
    # the dev answers are B's own first lines (where it wrote one): B scores 1, and A (other weights) less
    asked = [p for p in PROMPTS if fresh_b[p].split("\n", 1)[0].strip()]
    assert len(asked) >= 6
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": p, "response": fresh_b[p].split("\n", 1)[0]} for p in asked])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # the engine starts from A's folder, then holds B, A and B again, each loaded from memory
    out = run_fresh(vllm_probe_answers, str(dev), a, [b, a, b])
    assert out["engines"] == 1
    assert out["answers"][0] == [fresh_b[p] for p in asked] and out["answers"][1] == [fresh_a[p] for p in asked]
    assert out["answers"][2] == out["answers"][0]  # under the caller's bf16 autocast too: vLLM runs its own dtype
    assert out["scores"][0] == out["scores"][2] == 1.0
    # the swap mattered: A answers otherwise (else this test could not fail)
    assert sum(fresh_a[p] != fresh_b[p] for p in asked) > len(asked) // 2
    assert out["scores"][1] < 1.0


def test_the_setting_picks_the_probe_engine_and_only_the_flagship_keys_on_it(tmp_path, tiny_lora):
    from bench.runner import Clock, RunConfig, build_context, defense_dir
    from bench.settings import load_setting
    from bench.settings.resolve import resolve
    from defenses import DEFENSES
    from tests.test_settings import data_files, write_setting

    models_section = {"aligned": str(tiny_lora["aligned"]), "finetuned": str(tiny_lora["finetuned"])}
    file = write_setting(tmp_path / "tiny.yaml", models=models_section, data=data_files(tmp_path / "data"))
    dirs, described = {}, {}
    for engine in ("transformers", "vllm"):
        setting = load_setting(file, [f"generation.probe_engine={engine}"])
        cfg = RunConfig(home=tmp_path / "home", setting=setting)
        resolved = resolve(setting, cfg.cache, check=True)
        (variant,) = resolved.variants(cfg.cache, print)
        ctx = build_context(resolved, variant, cfg, Clock())
        assert ctx.utility_probe.engine == engine
        described[engine] = resolved.description()["generation"]
        dirs[engine] = {name: defense_dir(name, DEFENSES.get(name)(), ctx, cfg) for name in DEFENSES.names()}
    # at its default the option stays out of the setting's key (records keep their ids), else it is named
    assert "probe_engine" not in described["transformers"] and described["vllm"]["probe_engine"] == "vllm"
    for name, folder in dirs["vllm"].items():
        probes = "utility_probe" in (DEFENSES.get(name).reads or ())
        assert (folder != dirs["transformers"][name]) == probes, name
    assert "gradient_restoration" in [n for n in DEFENSES.names() if "utility_probe" in (DEFENSES.get(n).reads or ())]


def test_a_vllm_probe_without_vllm_is_refused_before_any_stage(tmp_path, tiny_lora, monkeypatch):
    import bench.generation
    from bench.errors import UserError
    from bench.settings import load_setting
    from bench.settings.resolve import check_names
    from tests.test_settings import data_files, write_setting

    models_section = {"aligned": str(tiny_lora["aligned"]), "finetuned": str(tiny_lora["finetuned"])}
    file = write_setting(tmp_path / "tiny.yaml", models=models_section, data=data_files(tmp_path / "data"))
    check_names(load_setting(file, ["generation.probe_engine=vllm"]))  # installed here: fine
    monkeypatch.setattr(bench.generation, "vllm_available", lambda: False)
    check_names(load_setting(file))  # the default probe needs no vLLM
    with pytest.raises(
        UserError, match=r"^generation.probe_engine is vllm, and vLLM is not installed: .*transformers$"
    ):
        check_names(load_setting(file, ["generation.probe_engine=vllm"]))
