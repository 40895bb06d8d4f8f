"""What decides the bits of a result, and the switches that make it repeat.

Greedy decoding and seeded training are deterministic only when every reduction runs in the same
order on every run. Three things decide that here (BENCHMARKS.md, "Reproducibility", has the
experiment):
- the composition of each generation batch: bf16 and fp32 matrix kernels round a row differently
  at different batch shapes, so a prompt's answer depends on its batch-mates. vLLM's engine core
  in its own process starts stepping while requests are still arriving, so the batches changed
  with timing; the deterministic mode keeps the core in-process (every request is queued before
  the first step) and generates fixed, content-defined batches (bench.generation);
- the machine: the CPU's instruction set (bf16 kernels or not), the thread count, the device and
  the torch / vLLM builds. They are part of every generation and training cache key, so a cache
  made on another machine is never taken for this one's;
- the algorithms: training runs with torch's deterministic algorithms on (the Trainer's
  `full_determinism`), so an op without a deterministic kernel fails loudly instead of varying.

`fast-nondeterministic` keeps vLLM's own scheduling (a little faster, not repeatable); records say
which mode made them and `realign board check` warns when the modes of the two sides differ.
"""

from __future__ import annotations

import functools
import platform

DETERMINISTIC = "deterministic"
FAST = "fast-nondeterministic"
GENERATION_MODES = (DETERMINISTIC, FAST)

# record fields that change from run to run of the same inputs (times, memory, dates)
VOLATILE_KEYS = {
    "created",
    "cost",
    "wall_s",
    "apply_s",
    "seconds",
    "peak_rss_mb",
    "defense_wall_s",
    "defense_peak_rss_mb",
    "train_runtime_s",
    "timings",
    "timing_s",
    "load_s",
    "generate_s",
}


def check_mode(mode: str) -> str:
    from bench.errors import UserError

    if mode not in GENERATION_MODES:
        raise UserError(f"generation mode must be one of {', '.join(GENERATION_MODES)}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=1)
def compute_fingerprint() -> dict:
    """The machine facts that decide the bits of a float computation here (the GPU where there is one)."""
    import torch

    facts = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda  # the kernels a CUDA build ships
    else:
        facts["device"] = "cpu"
    # the CPU's extensions on a GPU machine too: the CPU still computes there (weight arithmetic of the
    # defenses that mix state dicts, tokenisation-side tensors)
    facts["isa"] = _cpu_isa()
    return facts


def _cpu_isa() -> str:
    """The widest vector and bf16 extensions: the kernels torch and vLLM pick depend on them."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return platform.processor() or "unknown"
    picked = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve") if f in flags]
    return "+".join(picked) or "baseline"


def comparable(record: dict) -> dict:
    """A record without what legitimately changes between two runs of the same inputs."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(record)
