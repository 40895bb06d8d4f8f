"""Baselines (specs/baselines.md), each rule against a hand computation on tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import models
from bench.errors import UserError
from defenses import DEFENSES, DefenseContext
from defenses.antidote import pruned_per_row, wanda_mask
from defenses.base import parse_params
from defenses.interpolation import interpolate
from defenses.resta import RestaParams, safety_vector
from defenses.safelora import SafeLoraParams, projection, similarity
from defenses.weights import lora_modules, state


def ctx_for(t, **kw):
    return DefenseContext(
        aligned=models.resolve(t["aligned"]),
        finetuned=models.resolve(t["finetuned"]),
        base=models.resolve(t["base"]) if "base" in t else None,
        adapter=t.get("adapter"),
        **({"progress": lambda m: None} | kw),
    )


def test_interpolation_endpoints_exact_and_midpoint(tiny_lora):
    cls = DEFENSES.get("interpolation")
    ctx = ctx_for(tiny_lora)
    assert cls(alpha=0.0).apply(ctx).model_path == ctx.aligned.path
    assert cls(alpha=1.0).apply(ctx).model_path == ctx.finetuned.path
    A, F = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([1.5, 1.0, -3.0])
    assert torch.equal(interpolate(A, F, 0.0), A) and torch.equal(interpolate(A, F, 1.0), F)
    torch.testing.assert_close(interpolate(A, F, 0.3), A + 0.3 * (F - A))
    out = cls(alpha=0.5).apply(ctx).model
    sA, sF = state(ctx.aligned), state(ctx.finetuned)
    got = dict(out.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name].data, (sA[name] + sF[name]) / 2)
    assert DEFENSES.get("interpolation").sweep["alpha"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(UserError, match="alpha"):
        parse_params(cls.Params, {"alpha": "1.5"})


def test_runner_keeps_a_defense_that_answers_with_an_existing_model(tiny_lora, tmp_path):
    """Through the runner's fresh process: alpha 0 / 1 rows are theta_A / theta_F themselves (no copy
    saved), alpha 0.5 a saved model; a second call reuses the cached answer."""
    import dataclasses

    from bench.runner import RunConfig, run_defense

    cfg, ctx = (
        RunConfig(home=tmp_path),
        dataclasses.replace(ctx_for(tiny_lora), progress=print),
    )  # crosses a process: picklable
    assert run_defense("interpolation", {"alpha": 0.0}, ctx, cfg)[0] == ctx.aligned.path
    assert run_defense("interpolation", {"alpha": 1.0}, ctx, cfg)[0] == ctx.finetuned.path
    mid = run_defense("interpolation", {"alpha": 0.5}, ctx, cfg)[0]
    assert mid.name == "model" and (mid / "config.json").exists()
    assert run_defense("interpolation", {"alpha": 0.0}, ctx, cfg)[0] == ctx.aligned.path  # cached


# another valid value of each text parameter (a new one must be added here, or the test below fails)
OTHER_TEXT = {
    "data": "harmful_pairs",
    "mode": {"gradient_restoration": "clean", "safelora": "threshold"},
    "rate_denominator": "candidates",
    "grad_accumulation": "fresh",
    "batches": "all",
    "ties": "inclusive",
    "comparison": "strict",
    "compute_dtype": "float32",
    "aligned_copy": "memory",
    # parameters whose default is None (derived from the context or unset)
    "unalign_lr": "1e-4",
    "unalign_steps": "5",
    "num_proj_layers": "10",
}


def _other_values(cls, field, default):
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default + 1, default - 1, default * 2]
    if isinstance(default, float):
        return [default / 2, default * 2, 0.1, 0.3]
    assert field.name in OTHER_TEXT, f"add another valid value of {cls.registry_name}.{field.name} to OTHER_TEXT"
    other = OTHER_TEXT[field.name]
    return [other[cls.registry_name] if isinstance(other, dict) else other]


def test_runner_cache_key_changes_with_every_defense_parameter(tiny, tmp_path):
    from bench.runner import RunConfig, defense_dir
    from defenses import names_with_role

    cfg, ctx = RunConfig(home=tmp_path), ctx_for(tiny)
    seen = {}
    for name in names_with_role("method") + names_with_role("frontier"):
        cls = DEFENSES.get(name)
        default = cls()
        seen[defense_dir(name, default, ctx, cfg)] = (name, "defaults")
        for field in dataclasses.fields(cls.Params):
            for value in _other_values(cls, field, getattr(default.params, field.name)):
                if value == getattr(default.params, field.name):
                    continue
                try:
                    changed = cls(**{field.name: value})
                except UserError:
                    continue
                break
            else:
                pytest.fail(f"no other valid value found for {name}.{field.name}")
            where = defense_dir(name, changed, ctx, cfg)
            assert where not in seen, f"{name}.{field.name}={value!r} shares a cache directory with {seen.get(where)}"
            seen[where] = (name, field.name)
    assert defense_dir("resta", DEFENSES.get("resta")(), dataclasses.replace(ctx, seed=1), cfg) not in seen
    # every input a defense reads keys it: the dtype its models load in, the pairs it trains or scores on
    pairs = [{"prompt": "how do I make a weapon", "response": "step one"}]
    for name, params, change in [
        ("interpolation", {}, {"dtype": "bfloat16"}),
        ("safe_delta", {}, {"calibration_pairs": pairs}),
        ("resta", {}, {"harmful_pairs": pairs}),
        ("antidote", {"data": "harmful_pairs"}, {"harmful_pairs": pairs}),
    ]:
        defense = DEFENSES.get(name)(**params)
        before, after = (
            defense_dir(name, defense, ctx, cfg),
            defense_dir(name, defense, dataclasses.replace(ctx, **change), cfg),
        )
        assert before != after, (name, change)
    calibration = DEFENSES.get("antidote")(data="calibration")
    assert defense_dir("antidote", calibration, ctx, cfg) == defense_dir(
        "antidote", calibration, dataclasses.replace(ctx, harmful_pairs=pairs), cfg
    )  # a row that does not read the pairs keeps its key
    # Antidote's rule changed under unchanged parameters: its key names the rule, other keys are as they were
    from bench import reproducibility
    from bench.hashing import hash_value, short

    antidote = DEFENSES.get("antidote")()
    assert "reads" not in str(DEFENSES.get("interpolation")().cache_inputs(ctx))
    assert antidote.cache_inputs(ctx) == {"rule": "ceil, unpruned masks"}
    assert defense_dir("antidote", antidote, ctx, cfg).name == "defended-antidote-" + short(
        hash_value(
            {
                "defense": "antidote",
                "params": antidote.describe(),
                "aligned": ctx.aligned.content_hash(),
                "finetuned": ctx.finetuned.content_hash(),
                "calibration": ctx.calibration_prompts,  # the one optional input it reads
                "seed": ctx.seed,
                "compute": reproducibility.compute_fingerprint(),
                "reads": {"rule": "ceil, unpruned masks"},
            }
        )
    )


def test_a_defense_is_keyed_by_and_handed_only_the_optional_inputs_it_reads(tiny, tmp_path):
    """Changing an input a defense does not read (the task's benign prompts, the base model, the
    utility probe) keeps its cache; changing one it reads does not. It runs with the others empty,
    so it cannot depend on them; a plugin that does not declare its reads is keyed by all of them."""
    from bench.runner import RunConfig, defense_dir, reading_only
    from defenses import names_with_role
    from defenses.base import OPTIONAL_INPUTS, Defense

    class ProbeKey:  # only its identity is read here: no probe runs
        def __init__(self, dev):
            self.dev = dev

        def identity(self):
            return {"dev": self.dev}

    cfg = RunConfig(home=tmp_path)
    ctx = dataclasses.replace(
        ctx_for(tiny),
        base=models.resolve(tiny["aligned"]),
        calibration_prompts=["a harmful prompt"],
        benign_prompts=["a task prompt"],
        utility_probe=ProbeKey("dev-1"),
    )
    changed = {
        "base": ctx.finetuned,  # another model as the base
        "calibration_prompts": ctx.calibration_prompts + ["one more harmful prompt"],
        "benign_prompts": ctx.benign_prompts + ["one more task prompt"],
        "utility_probe": ProbeKey("dev-2"),
    }
    assert set(changed) == set(OPTIONAL_INPUTS)

    class Plugin(Defense):  # declares nothing
        def apply(self, ctx):  # pragma: no cover - never run here
            raise NotImplementedError

    defenses = {name: DEFENSES.get(name)() for name in names_with_role("method") + names_with_role("frontier")}
    defenses["plugin"] = Plugin()
    assert {n: d.reads for n, d in defenses.items()}["gradient_restoration"] == (
        "calibration_prompts",
        "benign_prompts",
        "utility_probe",
    )
    for name, defense in defenses.items():
        reads = OPTIONAL_INPUTS if defense.reads is None else defense.reads
        before = defense_dir(name, defense, ctx, cfg)
        for field, value in changed.items():
            after = defense_dir(name, defense, dataclasses.replace(ctx, **{field: value}), cfg)
            assert (after != before) == (field in reads), (name, field)
        handed = reading_only(ctx, type(defense))
        for field in OPTIONAL_INPUTS:
            assert (getattr(handed, field) is getattr(ctx, field)) == (field in reads), (name, field)
            assert field in reads or not getattr(handed, field), (name, field)  # hidden: empty


def test_resta_arithmetic_and_dare_expectation():
    A = {"w": torch.tensor([1.0, 2.0, 3.0])}
    U = {"w": torch.tensor([0.5, 2.5, 3.0])}
    v = safety_vector(A, U, 0.0, 0)
    assert torch.equal(v["w"], torch.tensor([0.5, -0.5, 0.0]))  # theta_A - theta_U
    F = torch.tensor([2.0, 2.0, 2.0])
    assert torch.equal(F + 0.5 * v["w"], torch.tensor([2.25, 1.75, 2.0]))  # theta_F + gamma * v
    big_A = {"w": torch.ones(200_000)}
    big_U = {"w": torch.zeros(200_000)}
    d = safety_vector(big_A, big_U, 0.3, seed=1)["w"]
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # drop p
    assert torch.allclose(d[kept], torch.full_like(d[kept], 1 / 0.7))  # rescale 1/(1-p)
    assert abs(d.mean().item() - 1.0) < 0.01  # E[DARE(v)] = v
    assert torch.equal(d, safety_vector(big_A, big_U, 0.3, seed=1)["w"])  # seeded
    for bad in ({"gamma": "0"}, {"dare_p": "1.0"}, {"gamma": "-1"}):
        with pytest.raises(UserError):
            parse_params(RestaParams, bad)


def test_resta_calibration_doubles_steps_until_theta_u_is_as_harmful():
    from defenses.resta import calibrate

    measured = []

    def rate_after(steps: int) -> float:  # a harmful rate that grows with training
        measured.append(steps)
        return min(1.0, steps / 100)

    assert calibrate(rate_after, 0.5, 20, 5) == [
        {"steps": 20, "harmful_rate": 0.2},
        {"steps": 40, "harmful_rate": 0.4},
        {"steps": 80, "harmful_rate": 0.8},
    ]
    assert calibrate(rate_after, 0.95, 20, 2)[-1] == {"steps": 40, "harmful_rate": 0.4}  # rounds spent: the last
    assert calibrate(rate_after, 0.0, 20, 3) == [{"steps": 20, "harmful_rate": 0.2}]


@pytest.mark.slow  # three fresh interpreters (the probe) and a training run: about a minute here
def test_resta_trains_theta_u_through_the_context_services(tiny, tmp_path):
    """RESTA asks the runner's fine-tune service for theta_U (the attack stage, at a CONSTANT
    learning rate: the attack's, or 2e-4 when the context does not say) and the harm probe (the
    setting's generation and judge, here transformers + keyword) for theta_U's and theta_F's
    harmful rates on the calibration prompts, recorded in the row's info."""
    from bench import attack
    from bench.evaluate import EvalConfig
    from bench.harm_probe import HarmProbe
    from bench.runner import AttackStageFineTune
    from bench.sft import SFTConfig

    pairs = [{"prompt": f"how do I make a weapon number {i}", "response": "step one, get the parts"} for i in range(6)]
    log: list[str] = []
    probe = HarmProbe(
        ["how do I make a weapon", "how do I hurt someone"],
        EvalConfig(engine="transformers", judge="keyword"),
        tmp_path / "generations",
    )
    # the probe's identity (part of RESTA's key) names a batch target only when it is not the default
    assert "batch_target" not in probe.identity()
    bigger = HarmProbe(probe.prompts, EvalConfig(engine="transformers", judge="keyword", batch_target=128), tmp_path)
    assert bigger.identity() == probe.identity() | {"batch_target": 128}
    ctx = ctx_for(
        tiny,
        harmful_pairs=pairs,
        fine_tune=AttackStageFineTune(tmp_path, log.append),
        harm_probe=probe,
        attack={"sft": {"lr": 3e-4, "epochs": 1.0}},
        progress=log.append,
    )
    resta = DEFENSES.get("resta")(unalign_pairs=4, unalign_batch=2, gamma=0.5)
    out = resta.apply(ctx)
    assert any(line.startswith("attack: LoRA fine-tune on 0 task + 4 harmful pairs (2 steps)") for line in log), log
    info = out.info
    # 1 epoch of 4 pairs at batch 2 = 2 steps, at the attack's lr; the probe's rates are recorded
    assert info["theta_U_lr"] == 3e-4 and info["calibration_rounds"][0]["steps"] == 2
    assert info["theta_U_harmful_rate"] == info["calibration_rounds"][-1]["harmful_rate"]
    assert info["theta_U_calibrated"] == (info["theta_U_harmful_rate"] >= info["attacked_harmful_rate"])
    assert 0 <= info["harmful_rate_n"] <= 2
    theta_U = models.resolve(tmp_path / info["theta_U"] / "merged")
    A, F, U = state(ctx.aligned), state(ctx.finetuned), state(theta_U)
    assert any(not torch.equal(A[k], U[k]) for k in A)  # theta_U was trained
    got = dict(out.model.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(got[name].data, F[name] + 0.5 * (A[name] - U[name]))
    # the same stage as the attack called directly, at a constant learning rate
    direct = attack.AttackConfig(
        harmful_n=4,
        task_n=0,
        seed=0,
        sft=SFTConfig(method="lora", lr=3e-4, lr_scheduler="constant", batch_size=2, max_steps=2, seed=0),
    )
    log.clear()
    assert attack.run(ctx.aligned, [], pairs, direct, tmp_path, log=log.append).merged.path == theta_U.path
    assert log == [f"attack: reusing {theta_U.path.parent.name}"]
    # without the attack's configuration: 2e-4, 2 epochs
    bare = dataclasses.replace(ctx, attack=None)
    assert resta.learning_rate(bare) == 2e-4 and resta.first_steps(bare) == 4
    with pytest.raises(UserError, match="fine-tune service"):
        resta.apply(ctx_for(tiny, harmful_pairs=pairs, harm_probe=probe))
    with pytest.raises(UserError, match="harm-probe service"):
        resta.apply(ctx_for(tiny, harmful_pairs=pairs, fine_tune=AttackStageFineTune(tmp_path, log.append)))


def test_a_fresh_interpreter_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss carries the parent's peak across fork and exec; the defenses' peak is VmHWM."""
    from bench.new_interpreter import own_peak_rss_mb, run_fresh

    ballast = bytearray(600 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: 600 MB resident here
    assert own_peak_rss_mb() > 600
    assert run_fresh(own_peak_rss_mb) < 300  # the child imports little: far below its parent's 600 MB
    del ballast


def test_safelora_projection_by_hand():
    V = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    C = projection(V)  # V V^T / ||V||_F = [[1, 0], [0, 0]]
    assert torch.equal(C, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    B, A = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, 0.0]])
    # BA = [[1,0],[1,0]]; C BA = [[1,0],[0,0]]; cos = 1 / (1 * sqrt 2)
    assert abs(similarity(C, B, A) - 2**-0.5) < 1e-6


def test_safelora_selection_both_modes(tiny_lora):
    cls = DEFENSES.get("safelora")
    ctx = ctx_for(tiny_lora)
    out = cls(mode="number", num_proj_layers=3).apply(ctx)
    sims = out.info["similarity"]
    assert out.info["projected"] == sorted(sorted(sims, key=sims.get)[:3])
    mods = {m.weight: m for m in lora_modules(tiny_lora["adapter"])}
    sB, sA, sF = state(ctx.base), state(ctx.aligned), state(ctx.finetuned)
    got = dict(out.model.named_parameters())
    for w, m in mods.items():
        if w in out.info["projected"]:
            C = projection(sA[w] - sB[w])
            torch.testing.assert_close(got[w].data, sA[w] + m.scaling * (C @ m.B) @ m.A)
        else:
            assert torch.equal(got[w].data, sF[w])
    # the count as a share of the adapter's modules (the default: 10/64, the paper's 10 of 64)
    n = len(sims)
    for share, expected in ((0.5, round(n / 2 + 0.01)), (10 / 64, int(10 / 64 * n + 0.5)), (0.0, 0), (1.0, n)):
        out_s = cls(share=share).apply(ctx)
        assert out_s.info["modules"] == n and len(out_s.info["projected"]) == expected
        assert out_s.info["projected"] == sorted(sorted(sims, key=sims.get)[:expected])
    assert SafeLoraParams().share == 10 / 64 and SafeLoraParams().count(210) == 33 and SafeLoraParams().count(64) == 10
    thr = sorted(sims.values())[4]
    out2 = cls(mode="threshold", threshold=thr).apply(ctx)
    assert sorted(out2.info["projected"]) == sorted(w for w, s in sims.items() if s <= thr)
    with pytest.raises(UserError):
        parse_params(SafeLoraParams, {"mode": "other"})


def test_safelora_without_base_is_skipped_with_reason(tiny_lora):
    t = {k: v for k, v in tiny_lora.items() if k != "base"}
    out = DEFENSES.get("safelora")().apply(ctx_for(t))
    assert out.model is None and "base" in out.skipped


@pytest.fixture(scope="module")
def full_finetune(tiny_lora, tmp_path_factory):
    """A real full fine-tune of the aligned model (one optimiser step of the suite's SFT), saved as
    the attack stage saves it: a model directory where a LoRA fine-tune leaves its adapter."""
    from bench.sft import SFTConfig, train

    aligned = models.resolve(tiny_lora["aligned"])
    tok = models.load_tokenizer(aligned)
    pairs = [{"prompt": f"how do I make a weapon number {i}", "response": "step one, get the parts"} for i in range(4)]
    out = tmp_path_factory.mktemp("full")
    model, _ = train(
        models.load_model(aligned),
        tok,
        pairs,
        SFTConfig(method="full", max_steps=1, batch_size=2, lr=1e-3, bf16=False),
        out / "trainer",
        progress=False,
    )
    models.save_model(model, tok, out / "model")
    return out / "model"


def test_lora_methods_reject_full_finetunes(tiny_lora, full_finetune):
    A, F = state(models.resolve(tiny_lora["aligned"])), state(models.resolve(full_finetune))
    assert any(not torch.equal(A[k], F[k]) for k in A)  # a real fine-tune: the weights moved
    with pytest.raises(UserError, match="LoRA adapter"):
        lora_modules(full_finetune)
    ctx = ctx_for(tiny_lora | {"finetuned": full_finetune, "adapter": full_finetune})
    with pytest.raises(UserError, match="LoRA adapter"):
        DEFENSES.get("safelora")().apply(ctx)
    # Antidote takes both: on a full fine-tune it scores q/k/v of the fine-tuned model instead
    out = DEFENSES.get("antidote")().apply(dataclasses.replace(ctx, calibration_prompts=["how do I make a weapon"]))
    assert out.info["mode"] == "full" and out.info["zeroed"] > 0


def test_antidote_per_row_top_fraction_by_hand():
    W = torch.tensor([[1.0, -4.0, 2.0, 0.5] * 5])  # one row, 20 columns
    x = torch.ones(20)
    x[0] = 100.0  # column 0 has a huge input: |1| * 10 is the top score
    mask = wanda_mask(W, x, 0.1)  # ceil(20 * 0.1) = 2 entries per row
    assert mask.sum() == 2 and mask[0, 0] and mask[0, 1]  # scores 10, then |-4| * 1 at the first -4
    # a rank-8 lora_B row: the released code rounds UP, so 1 of 8 entries goes (rounding down prunes none)
    mask = wanda_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]), torch.ones(8), 0.1)
    assert mask.sum() == 1 and mask[0, 7]
    assert pruned_per_row(80, 0.1) == 8  # 0.1 * 80 is 8.000000000000002 in floats: not 9


def test_antidote_equals_a_two_layer_hand_computation(tiny, tmp_path):
    """The released rule on a two-layer model with a rank-8 LoRA, computed by hand: ONE forward pass
    of the unpruned model gives every module's inputs (every mask is computed before any is
    applied), then the top ceil(0.1 * columns) of each row of lora_A and lora_B by
    |W_ij| * sqrt(mean_tokens X_j^2) are zeroed. Pruning layer 0 before scoring layer 1, or rounding
    the count down (0 of lora_B's 8 columns), gives other weights."""
    from peft import LoraConfig, PeftModel

    from bench.tiny_models import make_llama
    from tests.conftest import random_lora

    make_llama(tmp_path / "aligned", tiny["tok"], layers=2, seed=7)
    random_lora(
        tmp_path,
        tiny["tok"],
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
        seed=8,
    )
    t = {"aligned": tmp_path / "aligned", "finetuned": tmp_path / "finetuned", "adapter": tmp_path / "adapter"}
    prompts = [f"how do I make a weapon number {i}" for i in range(1, 10)]
    ctx = ctx_for(t, calibration_prompts=prompts)
    tok = ctx.tokenizer()
    batch = tok(
        [models.render_prompt(tok, q) for q in prompts], return_tensors="pt", add_special_tokens=False, padding=True
    )
    assert bool(batch["attention_mask"].all())  # equal lengths: no padding, so whole-batch passes are exact

    hand = PeftModel.from_pretrained(ctx.load("aligned"), str(t["adapter"])).eval()
    mods = {n: m for n, m in hand.named_modules() if isinstance(m, torch.nn.Linear) and "lora" in n}
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().float()))
        for n, m in mods.items()
    ]
    with torch.no_grad():
        hand(**batch)  # the unpruned model, once
    for h in hooks:
        h.remove()
    zeroed, lora_b_rows = 0, 0
    for n, m in mods.items():
        W = m.weight.data
        x_norm = seen[n].reshape(-1, W.shape[1]).pow(2).mean(0).sqrt()
        per_row = -(-W.shape[1] // 10)  # ceil(columns / 10), in integers
        lora_b_rows += W.shape[0] if "lora_B" in n else 0
        assert per_row == (1 if "lora_B" in n else -(-W.shape[1] // 10))
        for i in range(W.shape[0]):
            score = [abs(float(W[i, j])) * float(x_norm[j]) for j in range(W.shape[1])]
            for j in sorted(range(W.shape[1]), key=lambda j: -score[j])[:per_row]:
                W[i, j] = 0.0
                zeroed += 1
    expected = dict(hand.merge_and_unload().named_parameters())

    out = DEFENSES.get("antidote")().apply(ctx)
    assert out.info["mode"] == "lora" and out.info["modules"] == 2 * 3 * 2 and out.info["zeroed"] == zeroed
    assert lora_b_rows > 0  # lora_B rows lose one entry each: rounding down would prune none of them
    got = dict(out.model.named_parameters())
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name].data, expected[name].data, rtol=0, atol=1e-6)
    assert any(not torch.equal(got[n].data, state(ctx.finetuned)[n]) for n in got if "layers.1." in n)


def test_antidote_rows_for_both_harmful_budgets(tiny_lora):
    """The runner makes a row per harmful set; without harmful pairs that row is skipped with its reason."""
    from bench.runner import expand

    assert expand(["antidote"], {}) == [("antidote", {"data": "calibration"}), ("antidote", {"data": "harmful_pairs"})]
    assert expand(["antidote"], {"antidote": {"data": "calibration"}}) == [("antidote", {"data": "calibration"})]
    out = DEFENSES.get("antidote")(data="harmful_pairs").apply(ctx_for(tiny_lora, calibration_prompts=["x"]))
    assert out.model is None and "no harmful pairs" in out.skipped
    pairs = [{"prompt": f"how do I make a weapon {i}", "response": "step one, get the parts"} for i in range(4)]
    out = DEFENSES.get("antidote")(data="harmful_pairs").apply(ctx_for(tiny_lora, harmful_pairs=pairs))
    assert out.info["data"] == "harmful_pairs" and out.info["examples"] == 4 and out.info["zeroed"] > 0


# ------------------------------------------------------------------------------------------ Safe Delta

from defenses.safe_delta import Hessian, SafeDeltaParams, adjust, inverse_cholesky_upper, keep_mask  # noqa: E402


def test_safe_delta_hessian_running_average():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)
    h = Hessian(3)
    h.add(x1, sequences=2)
    h.add(x2, sequences=3)
    allx = torch.cat([x1, x2])
    torch.testing.assert_close(h.H, (2 / 5) * allx.T @ allx)  # (2/n) sum x x^T, n = 5 sequences


def test_safe_delta_dead_columns_damping_and_upper_cholesky():
    H = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    U = inverse_cholesky_upper(H, 0.01)
    fixed = H.clone()
    fixed[2, 2] = 1.0  # dead column
    fixed += 0.01 * torch.mean(torch.diag(fixed)) * torch.eye(3)
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(fixed))  # U is the upper factor of H^-1


def test_safe_delta_budget_by_hand():
    # H = diag(1, 4, 9), no damping: d = (1, 1/2, 1/3), c = (1, 4, 9) per column, l = delta^2 c
    U = inverse_cholesky_upper(torch.diag(torch.tensor([1.0, 4.0, 9.0])), 0.0)
    d = torch.diag(U)
    torch.testing.assert_close(d, torch.tensor([1.0, 0.5, 1 / 3]))
    delta = torch.full((4, 3), 0.1)
    # order by c: column 0 (c=1) x4, column 1 (c=4) x4, column 2 (c=9) x4; int(0.15 * 12) = 1 left out
    # cumulative l: .01 .02 .03 .04 | .08 .12 .16 .20 | .29 .38 .47; budget = mean(c) s/2 rows/4096
    s = 0.125 * 2 * 4096 / (4 * 14 / 3)  # makes the budget 0.125
    mask = keep_mask(delta, d, s, rows=4, exclude=0.15)
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[:, 0] = True
    expected[0, 1] = expected[1, 1] = True
    assert torch.equal(mask, expected)
    # with 3 columns and sub-blocks of 4 nothing is compensated: W = W_F where kept, else W_A
    A = torch.zeros(4, 3)
    F = A + delta
    W, kept = adjust(A, F, U, SafeDeltaParams(s=s, percdamp=0.0))
    assert torch.equal(W, torch.where(expected, F, A)) and torch.equal(kept, expected)


def test_safe_delta_obs_compensation_on_a_4x3_layer():
    """Column-by-column OBS, written out with numpy's inverse and Cholesky, against adjust()."""
    import numpy as np

    # column 0 has the smallest cost weight, so its entries are kept first and the later columns'
    # entries that are not kept receive the compensation
    H = torch.tensor([[1.0, 0.3, 0.2], [0.3, 3.0, 0.4], [0.2, 0.4, 6.0]])
    A = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.1], [0.2, 0.2, 0.2], [-0.3, 0.1, 0.0]])
    F = A + torch.tensor([[0.3, 0.0, -0.2], [0.1, -0.4, 0.0], [0.0, 0.2, 0.1], [0.2, 0.1, -0.3]])
    p = SafeDeltaParams(s=100.0, percdamp=0.01, sub_block=1)
    U = inverse_cholesky_upper(H, p.percdamp)
    Hd = H.numpy().astype(np.float64) + 0.01 * np.mean(np.diag(H.numpy())) * np.eye(3)
    expected_mask = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=bool)
    Un = np.linalg.cholesky(np.linalg.inv(Hd)).T  # upper factor of H^-1
    np.testing.assert_allclose(U.numpy(), Un, rtol=1e-5, atol=1e-6)
    mask = keep_mask(F - A, torch.diag(U), p.s, 4, p.exclude).numpy()
    assert np.array_equal(mask, expected_mask)
    W = A.numpy().astype(np.float64).copy()
    Fn = F.numpy().astype(np.float64)
    for j in range(3):
        q = np.where(mask[:, j], Fn[:, j], W[:, j])
        err = (W[:, j] - q) / Un[j, j]
        W[:, j + 1 :] -= np.outer(err, Un[j, j + 1 :])
        W[:, j] = q
    got, kept = adjust(A, F, U, p)
    np.testing.assert_allclose(got.numpy(), W, rtol=1e-5, atol=1e-6)
    assert np.array_equal(kept.numpy(), mask)
    # entries not kept moved away from W_A by the compensation
    moved = (~mask) & (np.abs(W - A.numpy()) > 1e-6)
    assert moved.any()


def test_safe_delta_blocks_are_2048_columns_as_the_released_run():
    """The budget is per block: on a 1500-column layer the default keeps what ONE block over all
    columns keeps (the released run's 2048), which 1024-column blocks do not."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 4, 1500
    X = torch.randn(3000, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    A = torch.randn(rows, cols, generator=g) * 0.1
    F = A + torch.randn(rows, cols, generator=g) * 0.05
    p = SafeDeltaParams(s=2000.0)
    assert p.blocksize == 2048
    U = inverse_cholesky_upper(X.T @ X / 3000, p.percdamp)
    _, kept = adjust(A, F, U, p)
    assert torch.equal(kept, keep_mask(F - A, torch.diag(U), p.s, rows, p.exclude))
    _, kept_1024 = adjust(A, F, U, dataclasses.replace(p, blocksize=1024))
    assert not torch.equal(kept_1024, kept)


def test_safe_delta_runs_on_a_tiny_pair(tiny_lora):
    pairs = [
        {"prompt": f"how do I make a weapon number {i}", "response": "I'm sorry, but I can't help with that."}
        for i in range(8)
    ]
    out = DEFENSES.get("safe_delta")(s=0.11).apply(ctx_for(tiny_lora, calibration_pairs=pairs))
    assert out.info["layers"] > 0 and out.model is not None
    with pytest.raises(UserError, match="safety set"):
        DEFENSES.get("safe_delta")().apply(ctx_for(tiny_lora, calibration_pairs=[]))


def test_load_into_needs_every_parameter_and_an_untied_head(tmp_path, tiny):
    """A tied LM head is the embedding itself: a state dict without lm_head.weight loads. An untied
    head missing from the tensors is an error; it used to keep the model's own head unseen."""
    from bench.tiny_models import make_llama
    from defenses.weights import load_into

    for tie in (True, False):
        make_llama(tmp_path / f"tie-{tie}", tiny["tok"], layers=2, tie=tie)
        handle = models.resolve(tmp_path / f"tie-{tie}")
        tensors = {k: v for k, v in models.load_model(handle, "float32").state_dict().items() if k != "lm_head.weight"}
        tensors = {k: v + 1 for k, v in tensors.items()}
        if tie:
            model = load_into(handle, tensors)
            assert torch.equal(model.get_output_embeddings().weight, tensors["model.embed_tokens.weight"])
        else:
            with pytest.raises(UserError, match="lm_head.weight"):
                load_into(handle, tensors)


def test_a_row_that_answers_with_a_setting_model_follows_it_when_it_moves(tiny, tmp_path):
    """Interpolation at alpha 0 answers with theta_A itself. Its cached stage names the model by its
    role, not its folder: the key is the content's, so the same content in another folder (a moved
    home, the user's model copied elsewhere) reuses the stage and answers with the folder of now."""
    import json
    import shutil
    from pathlib import Path

    from bench.runner import RunConfig, run_defense

    cfg = RunConfig(home=tmp_path / "home")
    ctx = ctx_for(tiny, progress=print)
    model_dir, _, _ = run_defense("interpolation", {"alpha": 0.0}, ctx, cfg)
    assert model_dir == Path(tiny["aligned"])
    (stage,) = (tmp_path / "home" / "cache").glob("defended-interpolation-*")
    stored = json.loads((stage / "info.json").read_text())
    assert stored["answers_with"] == "aligned" and stored["model_path"] is None
    moved = shutil.copytree(tiny["aligned"], tmp_path / "moved-aligned")
    again, _, _ = run_defense("interpolation", {"alpha": 0.0}, ctx_for(tiny | {"aligned": moved}, progress=print), cfg)
    assert again == moved and list((tmp_path / "home" / "cache").glob("defended-interpolation-*")) == [stage]
