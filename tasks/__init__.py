"""lm-eval task definitions (YAML + utils.py). Run them through bench.lmeval_bridge."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
