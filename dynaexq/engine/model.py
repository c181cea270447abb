"""The transformers model with ExpertBanks in place of its experts, and the texts a model is calibrated on.

`build_model(store_dir, arch, dtype, device)`: the architecture's transformers class, with its `<Arch>Experts`
class swapped for ExpertBank while `from_pretrained` runs on the store directory (so the fused bf16 expert
tensors are never materialized and every non-expert weight, buffer and tie is transformers' own), then the
native attention, RMSNorm and router top-k installed. `banks_of(model)`: its banks by MoE layer. Used by `load`
(engine/load.py) and by `prepare`'s calibration pass (engine/calibrate.py), which is why it is neither of them.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dynaexq.bank import ExpertBank
from dynaexq.demo import BUNDLED
from dynaexq.engine import attention, norm, router
from dynaexq.engine.engine import read_text, text_windows
from dynaexq.errors import UserError

_PATCH_LOCK = threading.Lock()
DEFAULT_CORPUS = BUNDLED / "calibration"  # generic calibration text for models that ship none (see its model card)


def banks_of(model) -> dict:
    """{MoE layer: its ExpertBank}, each told its layer."""
    banks = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            module.layer = _layer_of(name)
            banks[module.layer] = module
    return banks


def calibration_tokens(tokenizer, files, n: int, length: int) -> torch.Tensor:
    """n windows of `length` tokens, split evenly over the calibration files -> [n', length]."""
    per_file = -(-n // len(files))
    return torch.cat([text_windows(tokenizer, read_text(f), per_file, length, f"calibration text {str(f)!r}")
                      for f in files])


def calibration_files(path, reader, given) -> list[Path]:
    if given:  # FILE or NAME=FILE (the name is informational, as in eval's --data)
        files = [Path(f) if Path(f).is_file() or "=" not in f else Path(f.partition("=")[2]) for f in given]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"calibration text(s) {missing} do not exist; give UTF-8 text files")
        return files
    dirs = [Path(path)] + ([Path(reader.manifest["source"]["path"]), reader.path] if reader is not None else [])
    for d in dirs:
        files = sorted((d / "calibration").glob("*.txt"))
        if files:
            return files
    return sorted(DEFAULT_CORPUS.glob("*.txt"))  # the model ships none: dynaexq's own (code, prose, dictionary)


def build_model(store_dir: Path, arch, dtype, device):
    module = arch.modeling_module()
    bank_cls = type(arch.experts_class, (ExpertBank,), {
        "__init__": lambda self, config, *a, **k: ExpertBank.__init__(self, config, arch.num_experts(config), arch.glu)})
    with _PATCH_LOCK:
        original = getattr(module, arch.experts_class)
        setattr(module, arch.experts_class, bank_cls)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(store_dir), dtype=dtype,
                                                         device_map=None if device.type == "cpu" else device)
        finally:
            setattr(module, arch.experts_class, original)
    attention.install(model)  # decode steps over the SlotCache read keys and values in place
    norm.install(model)  # RMSNorms as one native call
    router.install(model)  # softmax routers' top-k as one native call
    return model.eval()


def _layer_of(module_name: str) -> int:
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1])


def load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
