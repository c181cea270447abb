"""The default model until a trained one is bundled: a small random Qwen3-MoE checkpoint made locally.

Its weights are random, so its text is noise; it exists so that every command works out of the box
on a fresh machine with no model hub. The byte-level BPE tokenizer is trained (in about a second) on
Python standard-library source found on this machine.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch

DEMO_NAME = "tiny-random-qwen3-moe"


def default_model(cache: Path) -> Path:
    """Path of the default model, made on first use."""
    path = cache / "models" / DEMO_NAME
    if not (path / "config.json").is_file():
        print(f"dynaexq: no bundled model yet; making a small random Qwen3-MoE checkpoint at {path} "
              "(its output is noise)", file=sys.stderr)
        make_tiny_model(path)
    return path


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build in a temporary directory, then rename: a killed run leaves no half-written model."""
    import shutil
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(str(p) for p in stdlib.glob("*.py"))[:40]
        tok.train(files, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        fast.save_pretrained(tmp)
        torch.manual_seed(seed)
        config = Qwen3MoeConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                num_experts=16, num_experts_per_tok=2, max_position_embeddings=1024,
                                eos_token_id=0, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        model.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
