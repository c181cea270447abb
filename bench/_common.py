"""Shared helpers of the bench scripts (not a benchmark itself).

- `synthetic_checkpoint(...)`: a random Qwen3MoeForCausalLM checkpoint with Qwen3-30B-A3B layer shapes,
  written shard by shard as real sharded safetensors + model.safetensors.index.json, with the exact
  key names transformers' save_pretrained writes (taken from a tiny save_pretrained of the same
  layer/expert count), cached in a directory keyed by its parameters.
- `CpuLoad`: how many cores *other* processes used during a timed section (the machine is shared; a
  number well above 0 means the timings of that section are contended).
- `/proc` readers for RSS.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

_CLK = os.sysconf("SC_CLK_TCK")
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# Qwen3-30B-A3B per-layer shapes; vocabulary kept small so the lm_head does not dominate decode time
QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0)


# ------------------------------------------------------------------------------------------ CPU load


def _proc_busy() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all minus idle, iowait


def _own_seconds() -> float:
    """CPU seconds of this process plus its reaped children (subprocesses we waited for)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class CpuLoad:
    """with CpuLoad() as c: ...  ->  c.others = average cores busy with processes other than ours
    (ours = this process and the children it has waited for by the end of the block)."""

    def __init__(self):
        self.others = self.mine = float("nan")

    def __enter__(self):
        self.t0, self.b0, self.m0 = time.perf_counter(), _proc_busy(), _own_seconds()
        return self

    def __exit__(self, *exc):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        busy, mine = (_proc_busy() - self.b0) / _CLK, _own_seconds() - self.m0
        self.mine = mine / dt
        self.others = max(busy - mine, 0.0) / dt
        return False


def busy_others_now(seconds: float = 1.0) -> float:
    with CpuLoad() as c:
        time.sleep(seconds)
    return c.others


def wait_for_quiet(max_wait: float, threshold: float = 0.3, log=None) -> float:
    """Sleep until other processes use < threshold cores over a 2 s window, at most max_wait seconds."""
    import sys
    t0 = time.perf_counter()
    while True:
        others = busy_others_now(2.0)
        if others < threshold or time.perf_counter() - t0 >= max_wait:
            print(f"  (other processes use {others:.2f} cores; waited {time.perf_counter() - t0:.0f}s)", file=sys.stderr)
            return others


# ----------------------------------------------------------------------------------------------- RSS


def proc_status(pid="self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem in bytes (missing -> absent)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


# ------------------------------------------------------------------------------ synthetic checkpoint


def qwen3_config(layers: int, experts: int, vocab: int, **over):
    import transformers as T
    kw = {**QWEN3_30B_A3B, "num_experts": experts, **over}
    rope_theta = kw.pop("rope_theta")
    cfg = T.Qwen3MoeConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None, **kw)
    cfg.rope_parameters = {"rope_theta": rope_theta, "rope_type": "default"}
    return cfg


def checkpoint_layout(cfg) -> dict[str, tuple[int, ...]]:
    """key -> shape, in the order save_pretrained writes them, for the checkpoint of `cfg`.

    Key names come from a real save_pretrained of a tiny model with the same layer and expert count
    (names do not depend on widths); shapes from the full-size model built on the meta device, with
    transformers' fused expert parameters [E, 2I, H] / [E, H, I] split into per-expert [I, H] / [H, I].
    """
    import torch
    import transformers as T
    from safetensors import safe_open

    tiny = T.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
                            intermediate_size=32, num_experts=cfg.num_experts, num_experts_per_tok=2,
                            tie_word_embeddings=cfg.tie_word_embeddings)
    with tempfile.TemporaryDirectory() as d:
        T.AutoModelForCausalLM.from_config(tiny).save_pretrained(d)
        names = []
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                names += list(h.keys())
    with torch.device("meta"):
        big = T.AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    out = {}
    for name in names:
        m = _EXPERT_KEY.match(name)
        if m:
            prefix, role = m[1], m[3]
            if role == "down_proj":
                _, h, i = shapes[f"{prefix}.down_proj"]
                out[name] = (h, i)
            else:
                _, two_i, h = shapes[f"{prefix}.gate_up_proj"]
                out[name] = (two_i // 2, h)
        else:
            if name not in shapes:
                raise RuntimeError(f"save_pretrained key {name!r} has no counterpart in the model's state_dict")
            out[name] = shapes[name]
    for k in shapes:  # every non-expert parameter must be written
        if not k.endswith(("experts.gate_up_proj", "experts.down_proj")) and k not in out:
            raise RuntimeError(f"state_dict key {k!r} missing from save_pretrained's keys")
    return out


def _init_tensor(name, shape, dtype, g):
    import torch
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def synthetic_name(layers: int, experts: int, vocab: int, dtype: str = "bfloat16", seed: int = 0) -> str:
    """The directory name of `synthetic_checkpoint`'s checkpoint (stores prepared from it start with store-NAME)."""
    cfg = qwen3_config(layers, experts, vocab)
    return f"qwen3moe-L{layers}-E{experts}-H{cfg.hidden_size}-I{cfg.moe_intermediate_size}-V{vocab}-{dtype}-s{seed}"


def synthetic_checkpoint(workdir, layers: int = 2, experts: int = 128, vocab: int = 4096, dtype: str = "bfloat16",
                         shard_bytes: int = 1 << 30, seed: int = 0, log=print) -> Path:
    """Build (once) and return the directory of a random Qwen3MoeForCausalLM checkpoint."""
    import torch
    from safetensors.torch import save_file

    cfg = qwen3_config(layers, experts, vocab)
    path = Path(workdir) / synthetic_name(layers, experts, vocab, dtype, seed)
    done = path / "bench-complete.json"
    if done.is_file():
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    tdtype = getattr(torch, dtype)
    cfg.dtype = tdtype
    layout = checkpoint_layout(cfg)
    itemsize = torch.empty(0, dtype=tdtype).element_size()
    groups, size = [[]], 0
    for k, shp in layout.items():
        n = itemsize
        for d in shp:
            n *= d
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    total = 0
    weight_map = {}
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for i, keys in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: _init_tensor(k, layout[k], tdtype, g) for k in keys}  # one shard in memory at a time
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: fname for k in keys})
        del tensors
        log(f"  wrote {fname} ({i}/{len(groups)}, {time.perf_counter() - t0:.0f}s)")
    n_params = sum(int(torch.Size(s).numel()) for s in layout.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(path)
    if vocab >= 8192:  # the bundled model's tokenizer (8192 tokens): prepare can calibrate on real text
        from dynaexq.demo import BUNDLED
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(BUNDLED / f, path / f)
    expert_bytes = sum(int(torch.Size(s).numel()) * itemsize for k, s in layout.items() if _EXPERT_KEY.match(k))
    done.write_text(json.dumps({"total_bytes": total, "expert_bytes": expert_bytes, "params": n_params,
                                "layers": layers, "experts": experts, "vocab": vocab, "dtype": dtype}))
    return path


def checkpoint_info(path) -> dict:
    return json.loads((Path(path) / "bench-complete.json").read_text())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"
