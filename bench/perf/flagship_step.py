"""Benchmark: one recovery step of the flagship against a reference built the released code's way.

    python -m bench.perf.flagship_step --model DIR_A --finetuned DIR_F [--prompts 64] [--steps 3]
    python -m bench.perf.flagship_step --random-llama 1b            # makes a ~1.1 B random pair first

Reference (the released code's shape): three full fp32 models in memory (aligned, fine-tuned,
working), the working model moved to the CPU and back each step (a round trip, free on a CPU-only
machine), every candidate |grad| concatenated into one vector for one top-k, restore by copying
from the aligned copy. Ours: defenses.gradient_restoration (one truncated working copy + Delta_F,
radix select, restore in place).

Each variant runs in its own fresh interpreter, so its peak RSS is its own. Prints ratios against
the reference measured in the same run and appends the figures to BENCHMARKS.md when --write.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

from bench.fresh import run_fresh


def _prompts(n: int) -> tuple[list[str], list[str]]:
    from bench.testbed.prompts import benign_prompts, harmful_pool

    harmful = [r["prompt"] for r in harmful_pool()[:n]]
    return harmful, benign_prompts(max(n, 8), 7)[:n]


def ours(aligned: str, finetuned: str, n_prompts: int, steps: int, compute_dtype: str = "float32", E: int = 0) -> dict:
    import torch

    from bench import models
    from defenses import DEFENSES, DefenseContext
    from defenses.gradient_restoration import GradientRestoration

    torch.set_num_threads(torch.get_num_threads())
    harmful, benign = _prompts(n_prompts)
    ctx = DefenseContext(aligned=models.resolve(aligned), finetuned=models.resolve(finetuned), calibration_prompts=harmful,
                         benign_prompts=benign, probe=lambda model, handle=None: 1.0, progress=lambda m: None)
    cls: type[GradientRestoration] = DEFENSES.get("gradient_restoration")
    t0 = time.perf_counter()
    out = cls(steps=steps, warmup_steps=steps, save_step=steps, rollback=False, compute_dtype=compute_dtype, E=E).apply(ctx)
    wall = time.perf_counter() - t0
    t = out.info["timing_s"]
    return {"step_s": (t["gradient_s"] + t["selection_s"]) / steps, "gradient_s_per_step": t["gradient_s"] / steps,
            "selection_s_per_step": t["selection_s"] / steps, "wall_s": wall, "E": out.info["E"], "L": out.info["L"],
            "k": out.info["k"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mask": out.checkpoints[steps]}


def _jaccard(blob_a: bytes, blob_b: bytes) -> float:
    from defenses.gradient_restoration import unpack

    a, b = unpack(blob_a), unpack(blob_b)
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def reference(aligned: str, finetuned: str, n_prompts: int, steps: int) -> dict:
    """The released code's shape: 3 full fp32 copies, device round trip, one concatenated top-k."""
    import torch

    from bench import models
    from defenses.gradient_restoration import TruncatedModel, batches_of, gradient_pass, mean_direction, probe_layers

    harmful, benign = _prompts(n_prompts)
    tok = models.load_tokenizer(models.resolve(finetuned))
    A = models.load_model(models.resolve(aligned))
    F = models.load_model(models.resolve(finetuned))
    theta = models.load_model(models.resolve(finetuned))
    L = models.num_layers(theta)
    E = probe_layers(L)
    norms = models.norm_parameter_names(theta)
    prefix = models.layers_prefix(theta)
    N = sum(p.numel() for n, p in theta.named_parameters() if n.startswith(prefix))
    k = math.ceil(0.002 * N)
    cand = [n for n, _ in theta.named_parameters() if n.startswith(prefix) and models.layer_index(n) < E and n not in norms]
    pA = dict(A.named_parameters())
    for n, p in theta.named_parameters():
        p.requires_grad_(n in cand)
    hb = batches_of(tok, harmful, 8)
    tmA = TruncatedModel(A, E)
    d_h = mean_direction(tmA, hb)
    tm = TruncatedModel(theta, E)
    params = dict(theta.named_parameters())
    t_grad = t_sel = 0.0
    for _ in range(steps):
        theta.to("cpu")  # the released code moves the model between devices every step
        t = time.perf_counter()
        gradient_pass(tm, hb, d_h)
        t_grad += time.perf_counter() - t
        t = time.perf_counter()
        quals, gs = {}, []
        for n in cand:
            g = params[n].grad
            diff = params[n].data - pA[n].data
            quals[n] = ((diff > 0) & (g > 0)) | ((diff < 0) & (g < 0))
            gs.append((g.abs() * quals[n]).flatten())
        allg = torch.cat(gs)  # one concatenated vector of every candidate gradient
        tau = torch.topk(allg, k).values[-1]
        with torch.no_grad():
            for n in cand:
                sel = quals[n] & (params[n].grad.abs() > tau)
                params[n].data[sel] = pA[n].data[sel]
        t_sel += time.perf_counter() - t
        del allg, gs
    return {"step_s": (t_grad + t_sel) / steps, "gradient_s_per_step": t_grad / steps, "selection_s_per_step": t_sel / steps,
            "E": E, "L": L, "k": k, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "F_loaded": F is not None}


def random_llama_pair(root: Path, size: str) -> tuple[str, str]:
    """A random Llama (~1.1 B for '1b') and a LoRA-like fine-tune of it, saved once under root."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.testbed.build import embedded_base

    dims = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=4)}[size]
    a, f = root / f"llama-{size}-aligned", root / f"llama-{size}-finetuned"
    if (f / "config.json").exists():
        return str(a), str(f)
    base = embedded_base(Path("realign-home/cache"))
    from bench import models

    tok = models.load_tokenizer(base)
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
    n = sum(p.numel() for p in model.parameters())
    print(f"made random Llama pair with {n / 1e9:.2f} B parameters", file=sys.stderr)
    return str(a), str(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="aligned model dir (default: the embedded testbed's aligned model)")
    ap.add_argument("--finetuned", help="fine-tuned model dir")
    ap.add_argument("--random-llama", choices=["1b"], help="benchmark on a random Llama pair of this size instead")
    ap.add_argument("--prompts", type=int, default=64, help="calibration prompts")
    ap.add_argument("--steps", type=int, default=3, help="recovery steps timed")
    ap.add_argument("--scaling", action="store_true", help="also time ours at E/4, E/2, E and at 1/4, 1/2, all of the prompts")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args()
    if args.random_llama:
        args.model, args.finetuned = random_llama_pair(Path("realign-home/cache/perf"), args.random_llama)
    if not (args.model and args.finetuned):
        ap.error("--model and --finetuned (or --random-llama) are required")
    ref = run_fresh(reference, args.model, args.finetuned, args.prompts, args.steps)
    new = run_fresh(ours, args.model, args.finetuned, args.prompts, args.steps)
    bf16 = run_fresh(ours, args.model, args.finetuned, args.prompts, args.steps, "bfloat16")
    result = {
        "model": args.random_llama or Path(args.model).name, "prompts": args.prompts, "steps": args.steps, "E": new["E"], "L": new["L"],
        "reference": ref, "ours": new, "ours_bf16": bf16,
        "step_time_ratio": new["step_s"] / ref["step_s"],
        "step_time_ratio_bf16": bf16["step_s"] / ref["step_s"],
        "peak_memory_ratio": new["peak_rss_mb"] / ref["peak_rss_mb"],
        "peak_memory_ratio_bf16": bf16["peak_rss_mb"] / ref["peak_rss_mb"],
        "own_work_over_gradient_pass": new["selection_s_per_step"] / new["gradient_s_per_step"],
        "mask_jaccard_bf16_vs_fp32": _jaccard(new["mask"], bf16["mask"]),
    }
    if args.scaling:
        E = new["E"]
        result["scaling_E"] = {e: run_fresh(ours, args.model, args.finetuned, args.prompts, 2, "float32", e)["gradient_s_per_step"]
                               for e in sorted({max(1, E // 4), max(1, E // 2), E})}
        result["scaling_prompts"] = {n: run_fresh(ours, args.model, args.finetuned, n, 2)["gradient_s_per_step"]
                                     for n in sorted({max(8, args.prompts // 4), max(8, args.prompts // 2), args.prompts})}
    for variant in ("ours", "ours_bf16"):
        result[variant].pop("mask")
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.write:
        from bench.perf import write_section

        write_section(f"flagship_step-{result['model']}", _markdown(result))


def _markdown(r: dict) -> str:
    ref, o, b = r["reference"], r["ours"], r["ours_bf16"]
    lines = [
        f"Model `{r['model']}` (E = {r['E']} of {r['L']} layers), {r['prompts']} calibration prompts, batch 8, {r['steps']} plain steps, "
        "each variant in its own fresh interpreter.",
        "",
        "| | reference (released code's shape) | ours, fp32 | ours, bf16 autocast |",
        "|---|---|---|---|",
        f"| step time (gradient + selection), s | {ref['step_s']:.2f} | {o['step_s']:.2f} | {b['step_s']:.2f} |",
        f"| gradient pass per step, s | {ref['gradient_s_per_step']:.2f} | {o['gradient_s_per_step']:.2f} | {b['gradient_s_per_step']:.2f} |",
        f"| selection + restore per step, s | {ref['selection_s_per_step']:.2f} | {o['selection_s_per_step']:.2f} | {b['selection_s_per_step']:.2f} |",
        f"| peak RSS, MB | {ref['peak_rss_mb']:.0f} | {o['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} |",
        f"| step time / reference (target <= 0.33) | 1 | {r['step_time_ratio']:.2f} | {r['step_time_ratio_bf16']:.2f} |",
        f"| peak RSS / reference (target <= 0.5) | 1 | {r['peak_memory_ratio']:.2f} | {r['peak_memory_ratio_bf16']:.2f} |",
        f"| own work / gradient pass (target <= 0.3) | | {r['own_work_over_gradient_pass']:.2f} | |",
        "",
        f"Masks after {r['steps']} steps, bf16 against fp32: Jaccard {r['mask_jaccard_bf16_vs_fp32']:.3f}.",
    ]
    if "scaling_E" in r:
        lines += ["", "Gradient pass per step (ours, fp32) against E: " + ", ".join(f"E={e}: {s:.2f} s" for e, s in r["scaling_E"].items()),
                  "", "... and against calibration prompts: " + ", ".join(f"{n}: {s:.2f} s" for n, s in r["scaling_prompts"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
