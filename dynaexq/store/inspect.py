"""`dynaexq inspect`: what a store or checkpoint holds, in numbers, plus a store's integrity check."""
from __future__ import annotations

from transformers import AutoConfig

from dynaexq.arch import get_arch
from dynaexq.errors import UserError
from dynaexq.quant.formats import FORMATS
from dynaexq.quant.precision import DEFAULT_PRECISIONS
from dynaexq.quant.quantize import expected_nbytes
from dynaexq.sizes import format_size
from dynaexq.store import layout
from dynaexq.store.checkpoint import Checkpoint
from dynaexq.store.reader import StoreReader


def inspect(path, verify: bool = False) -> dict:
    """What a store or checkpoint holds; for a store, its integrity: every shard hashed (`verify`) or its stamps."""
    if layout.is_store(path):
        return _inspect_store(path, verify)
    return _inspect_checkpoint(path)


def _inspect_store(path, verify: bool) -> dict:
    r = StoreReader(path)
    per = {}
    for p in r.precisions:
        sizes = [r.expert_bytes(layer, e, p) for layer in r.layers for e in range(r.num_experts)]
        errors = [r.expert_error(layer, e, p) for layer in r.layers for e in range(r.num_experts)]
        per[p.value] = {"bytes": sum(sizes), "mean_error": sum(errors) / len(errors), "max_error": max(errors)}
    try:
        if verify:
            r.verify(progress=True)
            integrity = "ok"
        else:
            r.check_stamps()
            integrity = "stamps ok (sizes and sampled hashes; contents not verified: inspect --verify hashes them)"
    except UserError as err:
        integrity = str(err)
    return {"kind": "store", "path": str(path), "arch": r.arch, "moe_layers": r.layers, "num_experts": r.num_experts,
            "formats": {p.value: _format_text(p) for p in r.precisions}, "calibration": r.calibration,
            "expert_shapes": r.manifest["shapes"], "source": r.manifest["source"]["path"],
            "precisions": per, "shards": len(r.manifest["shards"]), "integrity": integrity,
            "verified": verify}


def _format_text(p) -> str:
    f = FORMATS[p]
    return f"gate_up {f.gate_up.describe()}, down {f.down.describe()}"


def _inspect_checkpoint(path) -> dict:
    ckpt = Checkpoint(path)
    arch = get_arch(ckpt.config)
    index = arch.index(ckpt.keys())
    if not index:
        raise UserError(f"{str(path)!r} is a {arch.model_type} checkpoint without routed expert weights")
    n_exp = arch.num_experts(AutoConfig.from_pretrained(path))
    first = arch.read_expert(ckpt, index[next(iter(index))], 0)
    shapes = {m: tuple(first[m].shape) for m in layout.MATRICES}
    n_moe = len(index) * n_exp
    per = {p.value: {"bytes": n_moe * sum(expected_nbytes(p, m, s) for m, s in shapes.items()),
                     "estimated": True} for p in DEFAULT_PRECISIONS}
    expert_keys = [k for k in ckpt.keys() if arch.is_expert_key(k)]
    return {"kind": "checkpoint", "path": str(path), "arch": arch.model_type, "moe_layers": list(index),
            "num_experts": n_exp, "expert_shapes": {m: list(s) for m, s in shapes.items()},
            "source_dtype": str(ckpt.dtype()).removeprefix("torch."), "quantization": ckpt.quantization(),
            "expert_bytes_on_disk": sum(ckpt.nbytes(k) for k in expert_keys),
            "nonexpert_bytes_on_disk": sum(ckpt.nbytes(k) for k in ckpt.keys() if not arch.is_expert_key(k)),
            "precisions": per}


def format_report(r: dict) -> str:
    lines = [f"{r['kind']}: {r['path']}", f"architecture: {r['arch']}",
             f"MoE layers x experts: {len(r['moe_layers'])} x {r['num_experts']} (layers {r['moe_layers']})",
             f"expert shapes: gate_up {r['expert_shapes']['gate_up']}, down {r['expert_shapes']['down']}"]
    if r["kind"] == "checkpoint":
        lines += [f"source dtype: {r['source_dtype']}; on disk: experts {format_size(r['expert_bytes_on_disk'])}, "
                  f"other weights {format_size(r['nonexpert_bytes_on_disk'])}"]
        if r["quantization"]:
            lines.append(f"stored quantized: {r['quantization']}")
        lines += [
                  "all experts at each precision (estimated from shapes; `prepare` measures them):"]
        lines += [f"  {p:>5}  {format_size(v['bytes']):>12}" for p, v in r["precisions"].items()]
    else:
        cal = r["calibration"]
        how = (f"calibrated on {cal['tokens']} tokens of {', '.join(f['name'] for f in cal['files'])}" if cal
               else "not calibrated (weight error)")
        lines += [f"prepared from: {r['source']}; {how}",
                  "all experts at each precision (format, measured packed bytes, relative error"
                  + (" of the experts' outputs on the calibration tokens):" if cal else "):")]
        lines += [f"  {p:>5}  {r['formats'][p]:<28} {format_size(v['bytes']):>12}  error mean {v['mean_error']:.4f} "
                  f"max {v['max_error']:.4f}" for p, v in r["precisions"].items()]
        how = "sha256 of every shard" if r["verified"] else "stamps"
        lines.append(f"integrity ({r['shards']} shards, {how}): {r['integrity']}")
    return "\n".join(lines)
