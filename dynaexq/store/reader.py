"""Read an expert store: its manifest, integrity checks, and one expert version at a time.

Shards are memory-mapped by safetensors; reading an expert copies only its tensors. The reader
knows nothing of budgets or which precision an expert should have.
Integrity (`check(verify)`, called by load): "lazy" (default) checks every shard's stamp (size and sampled hash,
milliseconds) at once and each expert's digest on its first read, so a flipped byte is caught where it is read
at a cost proportional to what is read; "full" hashes every shard (what `inspect --verify` does); "off" trusts
the files.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from dynaexq.errors import UserError
from dynaexq.quant.formats import manifest_entry
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import QuantizedWeight
from dynaexq.store import layout
from dynaexq.store.dense import FORMAT_MATRIX

VERIFY = ("lazy", "full", "off")


class StoreReader:
    def __init__(self, path):
        self.path = Path(path)
        if not layout.is_store(self.path):
            raise UserError(f"{str(self.path)!r} is not a dynaexq store (no {layout.MANIFEST}); create one with "
                            "`dynaexq prepare CHECKPOINT_DIR --out STORE_DIR`")
        self.manifest = json.loads((self.path / layout.MANIFEST).read_text())
        version = self.manifest.get("format_version")
        if version != layout.FORMAT_VERSION:
            raise UserError(f"store {str(self.path)!r} has format version {version}; this dynaexq reads version "
                            f"{layout.FORMAT_VERSION}: prepare the checkpoint again")
        m = self.manifest
        self.arch = m["arch"]
        self.layers: list[int] = m["moe_layers"]
        self.num_experts: int = m["num_experts"]
        self.precisions = [Precision(p) for p in m["precisions"]]
        changed = [p.value for p in self.precisions if m["formats"].get(p.value) != manifest_entry(p)]
        if changed:
            raise UserError(f"store {str(self.path)!r} holds {', '.join(changed)} in another format than this dynaexq "
                            "reads: prepare the checkpoint again")
        self.calibration = m.get("calibration")
        self._handles: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}
        self._verified: set[str] = set()
        self._energy = None  # (layer, expert) -> sqrt(output energy / mean), read on first use
        self.lazy = False  # check each expert's digest on its first read (set by check("lazy"))
        self._read_ok: set = set()  # (layer, expert, precision) whose digest matched

    # --- integrity -------------------------------------------------------------------------------
    def check(self, verify: str = "lazy", progress: bool = False) -> None:
        """verify: "lazy" | "full" | "off" (see the module docstring); raises UserError on a mismatch."""
        if verify not in VERIFY:
            raise UserError(f"verify must be one of {', '.join(VERIFY)}, got {verify!r}")
        if verify == "full":
            self.verify(progress=progress)
        elif verify == "lazy":
            self.check_stamps()
        self.lazy = verify == "lazy"

    def check_stamps(self, names=None) -> None:
        """Each named shard (default: all) exists with the size and sampled hash the manifest records."""
        for name in (list(self.manifest["shards"]) if names is None else names):
            want, p = self.manifest["shards"][name], self.path / name
            if not p.is_file():
                raise UserError(f"store shard {name!r} is missing from {str(self.path)!r}; prepare the store again")
            if layout.stamp(p) != {"size": want["size"], "sampled": want["sampled"]}:
                raise UserError(f"store shard {str(p)!r} does not match its size and sampled hash in the manifest "
                                "(truncated, replaced or modified); delete the store and prepare it again")

    def verify(self, names=None, progress: bool = False) -> None:
        """sha256 of each named shard (default: all) against the manifest; raises UserError on mismatch."""
        names = list(self.manifest["shards"]) if names is None else list(names)
        todo = [n for n in names if n not in self._verified]
        for name in tqdm(todo, desc="verify store", unit="shard", disable=not progress or not todo):
            want = self.manifest["shards"][name]
            p = self.path / name
            if not p.is_file():
                raise UserError(f"store shard {name!r} is missing from {str(self.path)!r}; prepare the store again")
            if p.stat().st_size != want["size"] or layout.sha256_file(p) != want["sha256"]:
                raise UserError(f"store shard {str(p)!r} does not match its sha256 in the manifest (corrupted or "
                                "modified); delete the store and prepare it again")
            self._verified.add(name)

    def matches_source(self, fingerprint: dict) -> bool:
        src = self.manifest["source"]
        return src["config_sha256"] == fingerprint["config_sha256"] and src["files"] == fingerprint["files"]

    # --- sizes and errors from the manifest --------------------------------------------------------
    def _check(self, layer: int, precision: Precision):
        if precision not in self.precisions:
            have = ", ".join(p.value for p in self.precisions)
            raise UserError(f"precision {precision.value} was not prepared in store {str(self.path)!r} "
                            f"(it has {have}); prepare again with --precisions including {precision.value}")
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not a MoE layer of this model (MoE layers: {self.layers})")

    def expert_bytes(self, layer: int, e: int, precision: Precision) -> int:
        self._check(layer, precision)
        return self.manifest["experts"][str(layer)][precision.value]["bytes"][e]

    def expert_error(self, layer: int, e: int, precision: Precision) -> float:
        """The relative error of the expert at `precision` (activation-aware when the store is calibrated)."""
        self._check(layer, precision)
        return self.manifest["experts"][str(layer)][precision.value]["error"][e]

    def output_error(self, layer: int, e: int, precision: Precision) -> float:
        """The size of the expert's output error: relative error x sqrt(its output energy / the mean over all
        experts). What the planners weigh: an expert whose output is large perturbs the model more at the same
        relative error (measured on the bundled model: 22 % lower KL than relative errors at Q4_K_M's bytes)."""
        return self.expert_error(layer, e, precision) * self._energies()[(layer, e)]

    def _energies(self) -> dict:
        """{(layer, expert) or dense item name: sqrt(output energy / the experts' mean)}: one scale for both."""
        if self._energy is None:
            p0 = self.precisions[0].value
            en = {(int(layer), e): v for layer, d in self.manifest["experts"].items()
                  for e, v in enumerate(d[p0]["energy"])}
            mean = sum(en.values()) / max(len(en), 1)
            en.update({name: it["energy"] for name, it in self.dense_items().items()})
            self._energy = {k: (v / mean) ** 0.5 if mean > 0 else 1.0 for k, v in en.items()}
        return self._energy

    # --- the non-expert matrices (store/dense.py) ----------------------------------------------------------
    def dense_items(self) -> dict:
        """{module name: {"role": linear | embedding | tied, "shape", "group", "energy", "precisions"}}."""
        return self.manifest.get("dense", {})

    def dense_bytes(self, name: str, precision: Precision) -> int:
        return self.dense_items()[name]["precisions"][precision.value]["bytes"]

    def dense_error(self, name: str, precision: Precision) -> float:
        """The size of the matrix's output error per token, on the experts' scale (`output_error`)."""
        return self.dense_items()[name]["precisions"][precision.value]["error"] * self._energies()[name]

    def read_dense(self, name: str, precision: Precision) -> QuantizedWeight:
        """Non-expert matrix `name` at `precision`, owning its memory (digest checked on the first read when lazy)."""
        it = self.dense_items()[name]
        if precision not in self.precisions:
            raise UserError(f"precision {precision.value} was not prepared in store {str(self.path)!r}")
        shard = layout.dense_shard(it["group"], precision)
        f = self._open(shard)
        t = {k: f.get_tensor(f"{name}.{k}").clone() for k in ("data", "scale", "zero", "ranges")
             if f"{name}.{k}" in self._keys[shard]}
        if self.lazy and (name, precision) not in self._read_ok:
            if layout.expert_digest(t.values()) != it["precisions"][precision.value]["digest"]:
                raise UserError(f"matrix {name} at {precision.value} in {str(self.path / shard)!r} does not match its "
                                "digest in the manifest (corrupted on disk); delete the store and prepare it again")
            self._read_ok.add((name, precision))
        return QuantizedWeight.from_tensors(precision, FORMAT_MATRIX, it["shape"], t)

    # --- reading ---------------------------------------------------------------------------------
    def read_expert(self, layer: int, e: int, precision: Precision) -> dict:
        """-> {"gate_up": QuantizedWeight, "down": QuantizedWeight, (+ "gate_up_bias", "down_bias")}.

        Tensors are copied out of the memory map: a loaded expert must own its memory, or the bytes we
        report as resident would be file pages faulted in on first use and evictable under pressure."""
        self._check(layer, precision)
        name = layout.expert_shard(layer, precision)
        f = self._open(name)
        return self._assemble(layer, e, precision, self._keys[name], lambda key: f.get_tensor(key).clone())

    def _assemble(self, layer: int, e: int, precision: Precision, keys, get) -> dict:
        """The expert's tensors (`get(key)` for each of its keys in `keys`) -> the read_expert dict, its digest
        checked on the first read when lazy."""
        shapes = self.manifest["shapes"]
        out, in_file_order = {}, []
        for m in layout.MATRICES:
            t = {k: get(f"{e}.{m}.{k}") for k in ("data", "scale", "zero", "ranges") if f"{e}.{m}.{k}" in keys}
            in_file_order += t.values()
            out[m] = QuantizedWeight.from_tensors(precision, m, shapes[m], t)
        for b in layout.BIASES:
            if f"{e}.{b}" in keys:
                out[b] = get(f"{e}.{b}")
                in_file_order.append(out[b])
        if self.lazy and (layer, e, precision) not in self._read_ok:
            want = self.manifest["experts"][str(layer)][precision.value]["digest"][e]
            if layout.expert_digest(in_file_order) != want:
                raise UserError(f"expert {e} of layer {layer} at {precision.value} in "
                                f"{str(self.path / layout.expert_shard(layer, precision))!r} does not match its digest "
                                "in the manifest (corrupted on disk); delete the store and prepare it again")
            self._read_ok.add((layer, e, precision))
        return out

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.path / name), "pt")
            except (SafetensorError, OSError) as err:
                raise UserError(f"store shard {str(self.path / name)!r} cannot be read ({err}); prepare the store "
                                "again") from None
            self._keys[name] = set(self._handles[name].keys())
        return self._handles[name]

    def close(self):
        """Unmap the shards (a later read reopens them)."""
        self._handles.clear()
