"""The bundled default model: a small Mixture-of-Experts language model trained for dynaexq.

It ships inside the package (dynaexq/bundled/dxq-moe-mini: a plain Qwen3-MoE Hugging Face checkpoint with its
tokenizer, model card, and held-out eval and calibration texts per domain) and is the default `--model` of every
command. scripts/train_bundled.py made it; its README.md is the model card.
"""
from __future__ import annotations

from pathlib import Path

from dynaexq.errors import UserError

BUNDLED_NAME = "dxq-moe-mini"
BUNDLED = Path(__file__).parent / "bundled" / BUNDLED_NAME


def default_model() -> Path:
    if not (BUNDLED / "config.json").is_file():
        raise UserError(f"the bundled model is missing from {BUNDLED} (a partial install?); reinstall dynaexq or "
                        "give --model PATH")
    return BUNDLED
