"""Benchmark: recovery steps of the flagship against a reference built the released code's way.

    python -m bench.perf.flagship_step --embedded [--write]        # the testbed's aligned / attacked pair
    python -m bench.perf.flagship_step --random-llama 1b [--write] # a ~1 B random Llama pair (made once)
    python -m bench.perf.flagship_step --model DIR_A --finetuned DIR_F
    python -m bench.perf.flagship_step --random-llama 1b --device cuda --variants ours # on a GPU

On a CUDA device the memory figure is torch's peak allocated GPU memory (the process's RSS is
still reported) and the section of BENCHMARKS.md is named after the GPU.

Reference: `defenses.gradient_restoration.reference`, the spec read literally in the released
code's shape (`sgdg_rollback_final.py`): three fp32 copies of the model truncated after layer
E-1, every parameter of the working copy requiring a gradient, left-padded batches, the working
copy sent to the device before each gradient pass and back after, one concatenated top-k, restore
by copying masked values. The same function is the tests' oracle.

Ours: `defenses.gradient_restoration` with packed batches and theta_A streamed (its defaults on a
CPU), in fp32, in bf16 autocast (its default where the CPU has AVX512-BF16), in bf16 with
`low_memory` (theta as bf16 + the 2-bit sign of theta - theta_A), the same with `block_attention`,
and with padded batches and theta_A held in fp32
(the reference's arithmetic, so the same masks). Each variant runs in its own fresh
interpreter, so its peak RSS is its own; every variant pays the same floor (Python, torch,
transformers, the tokenizer), reported as `floor_rss_mb`. The masks after the last step are
compared with the reference's (Jaccard). Ratios are against the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from bench.atomic import atomic_write_text
from bench.new_interpreter import run_fresh

VARIANTS = {  # name -> parameters of the defense
    "ours": {"compute_dtype": "float32"},
    "ours_bf16": {"compute_dtype": "bfloat16"},
    "ours_bf16_low_memory": {"compute_dtype": "bfloat16", "low_memory": True},
    "ours_bf16_low_memory_blocks": {"compute_dtype": "bfloat16", "low_memory": True, "block_attention": True},
    "ours_padded_held": {"compute_dtype": "float32", "packing": False, "aligned_copy": "memory"},
}


def _prompts(n: int) -> tuple[list[str], list[str]]:
    from bench.testbed import sql_task
    from bench.testbed.prompts import harmful_pool

    return [r["prompt"] for r in harmful_pool()[:n]], [r["prompt"] for r in sql_task.generate(max(n, 8), 7)[:n]]


def _floor_rss_mb(tokenizer_of: str) -> float:
    import psutil

    from bench import models

    models.load_tokenizer(models.resolve(tokenizer_of))
    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_mb(device: str) -> dict:
    """Peak memory of this process: RSS always; on CUDA also torch's peak allocated GPU memory,
    which is then the figure the ratios use (a CUDA context's RSS says nothing of the GPU)."""
    out = {"peak_rss_mb": _peak_rss_mb()}
    if device.startswith("cuda"):
        import torch

        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _peak_key(r: dict) -> str:
    return "peak_gpu_mb" if "peak_gpu_mb" in r else "peak_rss_mb"


def ours(aligned: str, finetuned: str, n_prompts: int, steps: int, params: dict, device: str = "cpu") -> dict:
    import torch  # noqa: F401 - imported before the floor is read, as in the reference

    from bench import models
    from defenses import DEFENSES, DefenseContext

    floor = _floor_rss_mb(finetuned)
    harmful, benign = _prompts(n_prompts)
    ctx = DefenseContext(
        aligned=models.resolve(aligned),
        finetuned=models.resolve(finetuned),
        calibration_prompts=harmful,
        benign_prompts=benign,
        utility_probe=lambda model, handle=None: 1.0,
        progress=lambda m: None,
        device=device,
    )
    t0 = time.perf_counter()
    # the probe is a constant: this times the recovery steps, not the task metric
    out = DEFENSES.get("gradient_restoration")(
        steps=steps, warmup_steps=steps, save_step=steps, rollback=False, **params
    ).apply(ctx)
    t = out.info["timing_s"]
    return {
        "step_s": (t["gradient_s"] + t["selection_s"]) / steps,
        "gradient_s_per_step": t["gradient_s"] / steps,
        "selection_s_per_step": t["selection_s"] / steps,
        "wall_s": time.perf_counter() - t0,
        "E": out.info["E"],
        "L": out.info["L"],
        "k": out.info["k"],
        **_peak_memory_mb(device),
        "floor_rss_mb": floor,
        "mask": out.checkpoints[steps],
        "packing": out.info["packing"],
        "aligned_copy": out.info["aligned_copy"],
    }


def reference(aligned: str, finetuned: str, n_prompts: int, steps: int, device: str = "cpu") -> dict:
    """The baseline: defenses.gradient_restoration.reference, the released code's shape, plain steps."""
    from defenses.gradient_restoration import reference as literal
    from defenses.gradient_restoration.masks import pack

    floor = _floor_rss_mb(finetuned)
    harmful, benign = _prompts(n_prompts)
    # the probe is a constant: this times the recovery steps, not the task metric
    r = literal.run(
        aligned,
        finetuned,
        harmful,
        benign,
        lambda masks: 1.0,
        steps=steps,
        warmup_steps=steps,
        save_step=steps,
        device=device,
    )
    return {
        "step_s": (r.gradient_s + r.selection_s) / steps,
        "gradient_s_per_step": r.gradient_s / steps,
        "selection_s_per_step": r.selection_s / steps,
        "E": r.E,
        "L": r.L,
        "k": r.k,
        **_peak_memory_mb(device),
        "floor_rss_mb": floor,
        "mask": pack(r.checkpoints[steps]),
    }


def _jaccard(blob_a: bytes, blob_b: bytes) -> float:
    from defenses.gradient_restoration.masks import unpack

    a, b = unpack(blob_a), unpack(blob_b)
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def random_llama_pair(root: Path, size: str) -> tuple[str, str]:
    """A random Llama with TinyLlama-1.1B's shape ('1b': 22 layers, hidden 2048, 1.09 B parameters
    with the embedded tokenizer's vocabulary) and a LoRA-like fine-tune of it (rank 8 on every
    decoder weight matrix), saved once under root."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench import models
    from bench.testbed.build import embedded_base

    dims = {
        "1b": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
    }[size]
    a, f = root / f"llama-{size}-aligned", root / f"llama-{size}-finetuned"
    if (f / "config.json").exists():
        return str(a), str(f)
    tok = models.load_tokenizer(embedded_base(root.parent))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True, **dims)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(a, safe_serialization=True)
    tok.save_pretrained(a)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape[0], 8) @ torch.randn(8, p.shape[1]) * 1e-3)
    model.save_pretrained(f, safe_serialization=True)
    tok.save_pretrained(f)
    print(
        f"made random Llama pair with {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters",
        file=sys.stderr,
    )
    return str(a), str(f)


def embedded_pair(home: Path) -> tuple[str, str]:
    """The main job's aligned model and its N = 100 attacked model (built or reused from the cache)."""
    from bench import attack as attack_stage
    from bench.testbed import build as testbed_stage

    cache = home / "cache"
    tb = testbed_stage.build(testbed_stage.TestbedConfig(), cache, log=lambda m: print(m, file=sys.stderr))
    cfg = attack_stage.AttackConfig()
    atk = attack_stage.run(
        tb.aligned,
        tb.rows("sql_train"),
        attack_stage.harmful_pairs_for(cfg, tb.attack_pairs, None),
        cfg,
        cache,
        log=lambda m: print(m, file=sys.stderr),
    )
    return str(tb.aligned.path), str(atk.merged.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", action="store_true", help="the embedded testbed's aligned and N=100 attacked models")
    ap.add_argument("--home", default="realign-home", help="realign home holding (or receiving) the testbed cache")
    ap.add_argument("--model", help="aligned model dir")
    ap.add_argument("--finetuned", help="fine-tuned model dir")
    ap.add_argument("--random-llama", choices=["1b"], help="benchmark on a random Llama pair of this size instead")
    ap.add_argument("--prompts", type=int, default=64, help="calibration prompts")
    ap.add_argument("--steps", type=int, default=3, help="recovery steps timed")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="our variants to run, comma-separated")
    ap.add_argument(
        "--scaling", action="store_true", help="also time ours at E/4, E/2, E and at 1/4, 1/2, all of the prompts"
    )
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (the same device for both sides)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    name = "embedded" if args.embedded else args.random_llama or (Path(args.model).name if args.model else "")
    if args.embedded:
        args.model, args.finetuned = embedded_pair(Path(args.home))
    elif args.random_llama:
        args.model, args.finetuned = random_llama_pair(Path(args.home) / "cache" / "perf", args.random_llama)
    if not (args.model and args.finetuned):
        ap.error("--embedded, --random-llama or --model with --finetuned is required")
    gpu = None
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device here; run it on a GPU machine or pass --device cpu")
        gpu = torch.cuda.get_device_name(0)
    ref = run_fresh(reference, args.model, args.finetuned, args.prompts, args.steps, args.device)
    result = {
        "model": name,
        "prompts": args.prompts,
        "steps": args.steps,
        "E": ref["E"],
        "L": ref["L"],
        "k": ref["k"],
        "device": gpu or "cpu",
        "reference": ref,
    }
    for variant in args.variants.split(","):
        got = run_fresh(ours, args.model, args.finetuned, args.prompts, args.steps, VARIANTS[variant], args.device)
        got["step_time_ratio"] = got["step_s"] / ref["step_s"]
        got["peak_memory_ratio"] = got[_peak_key(ref)] / ref[_peak_key(ref)]
        got["own_work_over_gradient_pass"] = got["selection_s_per_step"] / got["gradient_s_per_step"]
        got["mask_jaccard_vs_reference"] = _jaccard(got.pop("mask"), ref["mask"])
        result[variant] = got
    ref.pop("mask")
    if args.scaling:
        E = ref["E"]
        result["scaling_E"] = {
            e: run_fresh(
                ours, args.model, args.finetuned, args.prompts, 2, {"E": e, "compute_dtype": "float32"}, args.device
            )["gradient_s_per_step"]
            for e in sorted({max(1, E // 4), max(1, E // 2), E})
        }
        result["scaling_prompts"] = {
            n: run_fresh(ours, args.model, args.finetuned, n, 2, {"compute_dtype": "float32"}, args.device)[
                "gradient_s_per_step"
            ]
            for n in sorted({max(8, args.prompts // 4), max(8, args.prompts // 2), args.prompts})
        }
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    if args.write:
        from bench.perf import write_section

        write_section(
            f"flagship_step-{result['model']}" + ("-gpu" if gpu else ""),
            _markdown(result),
            command=command_line(result["model"], args.prompts, args.steps, args.scaling, args.variants)
            + (f" --device {args.device}" if gpu else ""),
        )


def command_line(
    model: str, prompts: int, steps: int, scaling: bool = False, variants: str = ",".join(VARIANTS)
) -> str:
    which = {"embedded": "--embedded", "1b": "--random-llama 1b"}.get(model, "--model A --finetuned F")
    return (
        f"python -m bench.perf.flagship_step {which} --prompts {prompts} --steps {steps} --write"
        + (" --scaling" if scaling else "")
        + (f" --variants {variants}" if variants != ",".join(VARIANTS) else "")
    )


def _markdown(r: dict) -> str:
    ref = r["reference"]
    names = [v for v in VARIANTS if v in r]
    head = {
        "ours": "ours, fp32 (packed, theta_A streamed)",
        "ours_bf16": "ours, bf16 autocast (the default here)",
        "ours_bf16_low_memory": "ours, bf16, low_memory",
        "ours_bf16_low_memory_blocks": "ours, bf16, low_memory, block attention",
        "ours_padded_held": "ours, fp32, padded, theta_A held",
    }
    row = lambda label, fmt, key: (
        f"| {label} | {fmt.format(ref[key]) if key in ref else ''} | "
        + " | ".join(fmt.format(r[v][key]) for v in names)
        + " |"
    )
    lines = [
        f"Model `{r['model']}` (E = {r['E']} of {r['L']} layers, k = {r['k']}), {r['prompts']} calibration prompts, "
        "batch 8, "
        f"{r['steps']} plain steps; each variant in its own fresh interpreter"
        + (
            f", on {r['device']} (memory: torch's peak allocated GPU memory)."
            if r.get("device", "cpu") != "cpu"
            else "."
        ),
        "",
        "| | reference (released code's shape) | " + " | ".join(head[v] for v in names) + " |",
        "|---|---|" + "---|" * len(names),
        row("step time (gradient + selection), s", "{:.2f}", "step_s"),
        row("gradient pass per step, s", "{:.2f}", "gradient_s_per_step"),
        row("selection + restore per step, s", "{:.2f}", "selection_s_per_step"),
        *([row("peak GPU memory allocated, MB", "{:.0f}", "peak_gpu_mb")] if "peak_gpu_mb" in ref else []),
        row("peak RSS, MB", "{:.0f}", "peak_rss_mb"),
        row("floor RSS (interpreter, torch, tokenizer), MB", "{:.0f}", "floor_rss_mb"),
        "| step time / reference (target <= 0.33) | 1 | "
        + " | ".join(f"{r[v]['step_time_ratio']:.2f}" for v in names)
        + " |",
        f"| peak {'GPU memory' if 'peak_gpu_mb' in ref else 'RSS'} / reference (target <= 0.5) | 1 | "
        + " | ".join(f"{r[v]['peak_memory_ratio']:.2f}" for v in names)
        + " |",
        "| peak RSS above the floor / reference's | 1 | "
        + " | ".join(
            f"{(r[v]['peak_rss_mb'] - r[v]['floor_rss_mb']) / (ref['peak_rss_mb'] - ref['floor_rss_mb']):.2f}"
            for v in names
        )
        + " |",
        "| own work / gradient pass (target <= 0.3) | "
        + f"{ref['selection_s_per_step'] / ref['gradient_s_per_step']:.2f} | "
        + " | ".join(f"{r[v]['own_work_over_gradient_pass']:.2f}" for v in names)
        + " |",
        "| masks after the last step, Jaccard vs reference | 1 | "
        + " | ".join(f"{r[v]['mask_jaccard_vs_reference']:.4f}" for v in names)
        + " |",
    ]
    if "scaling_E" in r:
        lines += [
            "",
            "Gradient pass per step (ours, fp32) against E: "
            + ", ".join(f"E={e}: {s:.2f} s" for e, s in r["scaling_E"].items()),
            "",
            "... and against calibration prompts: "
            + ", ".join(f"{n}: {s:.2f} s" for n, s in r["scaling_prompts"].items()),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
