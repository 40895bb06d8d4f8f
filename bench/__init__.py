"""realign-bench: evaluate and compare defenses that restore an LLM's safety alignment after fine-tuning.

Pipeline (ARCHITECTURE.md): testbed -> attack -> defense -> evaluate -> record -> board.
Each stage is one module of this package, in that order.
"""

__version__ = "0.1.0"
