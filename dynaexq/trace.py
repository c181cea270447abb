"""Routing traces: which experts each token was routed to, per MoE layer, and with what gate weights.

The format (a numpy `.npz`, readable without torch or dynaexq):
  experts   int16   [T, L, K]  expert ids of token row t in MoE layer l, router rank order; -1: not recorded
  weights   float32 [T, L, K]  the routing weights the experts' outputs were combined with (NaN where -1)
  sequence  int32   [T]        which sequence (request, window) the row belongs to; rows of a sequence in order
  phase     int8    [T]        0: prefill, 1: decode
  meta      str                JSON: {"model", "num_experts", "top_k", "layers": [MoE layer indices], "source"}
T token rows (in the order they were computed), L MoE layers, K the experts each token uses.
`Trace.save` writes it atomically; `Trace.load` reads it back and checks it; `import_route_csv` and
`import_flame` read the public traces described in ../shared/traces/README.md (never shipped with dynaexq).
`RoutingRecorder` records one from a running engine (the banks hand it each forward's routing).
"""
from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynaexq.errors import UserError
from dynaexq.store.layout import atomic_write


@dataclass
class Trace:
    experts: np.ndarray
    weights: np.ndarray
    sequence: np.ndarray
    phase: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        t, L, k = self.experts.shape
        if self.weights.shape != (t, L, k) or self.sequence.shape != (t,) or self.phase.shape != (t,):
            raise UserError(f"a routing trace needs experts/weights [T, L, K] and sequence/phase [T]; got "
                            f"{self.experts.shape}, {self.weights.shape}, {self.sequence.shape}, {self.phase.shape}")
        E = int(self.meta.get("num_experts", 0))
        if E <= 0 or int(self.experts.max(initial=-1)) >= E or int(self.experts.min(initial=0)) < -1:
            raise UserError(f"a routing trace's expert ids must lie in [0, num_experts) or be -1; num_experts "
                            f"{E}, ids in [{int(self.experts.min(initial=0))}, {int(self.experts.max(initial=0))}]")
        self.meta.setdefault("layers", list(range(L)))
        self.meta.setdefault("top_k", k)
        if len(self.meta["layers"]) != L:
            raise UserError(f"a routing trace's meta names {len(self.meta['layers'])} MoE layers, its arrays {L}")

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def layers(self) -> list:
        return list(self.meta["layers"])

    def __len__(self) -> int:
        return self.experts.shape[0]

    def save(self, path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise UserError(f"a routing trace is written as .npz; got {str(path)!r}")

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, experts=self.experts.astype(np.int16), weights=self.weights.astype(np.float32),
                                    sequence=self.sequence.astype(np.int32), phase=self.phase.astype(np.int8),
                                    meta=np.array(json.dumps(self.meta)))
        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path) -> "Trace":
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                return cls(z["experts"], z["weights"], z["sequence"], z["phase"], json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise UserError(f"{str(path)!r} is not a dynaexq routing trace ({err}); write one with --record-routing "
                            "or `dynaexq trace import`") from None


def import_route_csv(path) -> Trace:
    """`*.route.csv` (`#` header lines, then turn,phase,step,layer,slot,expert,weight,...): one sequence per turn,
    rows by context position."""
    path = Path(path)
    meta, header, expert_bytes, rows = {"source": path.name}, {}, {}, []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                rows.append(line)
                continue
            pairs = dict(tok.split("=", 1) for tok in line[1:].split() if "=" in tok)
            if "layer" in pairs and "expert_bytes" in pairs:  # that engine's bytes of one expert, per layer
                expert_bytes[int(pairs["layer"])] = int(pairs["expert_bytes"])
            else:
                header.update(pairs)
    table = list(csv.DictReader(rows))
    need = {"turn", "phase", "step", "layer", "slot", "expert", "weight"}
    if not table or not need <= set(table[0]):
        raise UserError(f"{str(path)!r}: a route CSV needs columns {sorted(need)} after its # header lines")
    cells = np.array([[int(r["turn"]), int(r["phase"]), int(r["step"]), int(r["layer"]), int(r["slot"]),
                       int(r["expert"])] for r in table], dtype=np.int64)
    w = np.array([float(r["weight"]) for r in table], dtype=np.float32)
    positions = sorted({(turn, step) for turn, step in cells[:, [0, 2]].tolist()})
    row_of = {p: i for i, p in enumerate(positions)}
    L, k = int(cells[:, 3].max()) + 1, int(cells[:, 4].max()) + 1
    E = int(header.get("n_expert", 0)) or int(cells[:, 5].max()) + 1
    experts = np.full((len(positions), L, k), -1, np.int16)
    weights = np.full((len(positions), L, k), np.nan, np.float32)
    phase = np.zeros(len(positions), np.int8)
    for (turn, ph, step, layer, slot, e), wt in zip(cells.tolist(), w.tolist()):
        t = row_of[(turn, step)]
        experts[t, layer, slot], weights[t, layer, slot], phase[t] = e, wt, ph
    sequence = np.array([turn for turn, _ in positions], np.int32)
    meta.update(model=Path(header.get("model", path.stem)).name, num_experts=E, top_k=k, layers=list(range(L)),
                arch=header.get("arch"), file_expert_bytes=expert_bytes)
    return Trace(experts, weights, sequence, phase, meta)


def import_flame(folder) -> Trace:
    """FLAME-MoE's `layer{L}.pt` files (torch.save zips: token ids, router probabilities [T, K], ids [T, K]),
    read without torch; one sequence, every row decode-like (consecutive tokens)."""
    folder = Path(folder)
    files = sorted(folder.glob("layer*.pt"), key=lambda p: int(p.stem.removeprefix("layer")))
    if not files:
        raise UserError(f"{str(folder)!r} holds no layer*.pt files of a FLAME-MoE trace")
    ids, ws = [], []
    for f in files:
        z = zipfile.ZipFile(f)
        root = z.namelist()[0].split("/")[0]
        probs = np.frombuffer(z.read(f"{root}/data/1"), np.float32)
        ix = np.frombuffer(z.read(f"{root}/data/2"), np.int64)
        k = probs.size // np.frombuffer(z.read(f"{root}/data/0"), np.int64).size
        probs, ix = probs.reshape(-1, k), ix.reshape(-1, k)
        order = np.argsort(-probs, 1, kind="stable")
        ids.append(np.take_along_axis(ix, order, 1))
        ws.append(np.take_along_axis(probs, order, 1))
    experts = np.stack(ids, 1).astype(np.int16)
    weights = np.stack(ws, 1).astype(np.float32)
    meta = {"model": "FLAME-MoE-290M", "num_experts": 1 << int(np.ceil(np.log2(int(experts.max()) + 1))),
            "top_k": experts.shape[2], "layers": [int(f.stem.removeprefix("layer")) for f in files],
            "source": folder.name}
    t = experts.shape[0]
    return Trace(experts, weights, np.zeros(t, np.int32), np.ones(t, np.int8), meta)


def import_trace(path) -> Trace:
    """A dynaexq .npz, a *.route.csv or a FLAME-MoE folder."""
    path = Path(path)
    if path.is_dir():
        return import_flame(path)
    if path.suffix == ".csv":
        return import_route_csv(path)
    if path.suffix == ".npz":
        return Trace.load(path)
    raise UserError(f"{str(path)!r}: a routing trace is a dynaexq .npz, a *.route.csv or a FLAME-MoE folder of "
                    "layer*.pt files")


class RoutingRecorder:
    """Records the routing of a running engine: every bank hands `add(layer, idx [N, K], w [N, K])` the routing of
    its forward; `step(sequence ids [N], phase)` closes one forward pass (its N token rows, in order)."""

    def __init__(self, layers, num_experts: int, top_k: int, model: str = "", path=None):
        self.path = path  # where Engine.save_routing writes it
        self.layers, self.meta = list(layers), {"model": model, "num_experts": num_experts, "top_k": top_k,
                                                "layers": list(layers), "source": "dynaexq --record-routing"}
        self._pending: dict = {}
        self._ids: dict = {}  # id(sequence object) -> (number, the object: kept so its id is not reused)
        self._rows: list = []  # (experts [N, L, K], weights, sequence [N], phase)

    def add(self, layer: int, idx, w) -> None:
        self._pending[layer] = (idx.detach().to("cpu").numpy().astype(np.int16),
                                w.detach().float().to("cpu").numpy())

    def step(self, sequences, phase: int) -> None:
        """Close one forward: its token rows belong to `sequences` (one object per row, e.g. the decoder's
        Sequence), numbered in the order they are first seen."""
        if not self._pending:
            return
        sequence = [self._ids.setdefault(id(s), (len(self._ids), s))[0] for s in sequences]
        n = len(sequence)
        k = self.meta["top_k"]
        experts = np.full((n, len(self.layers), k), -1, np.int16)
        weights = np.full((n, len(self.layers), k), np.nan, np.float32)
        for i, layer in enumerate(self.layers):
            if layer in self._pending:
                idx, w = self._pending[layer]
                experts[:, i, :idx.shape[1]], weights[:, i, :idx.shape[1]] = idx[:n], w[:n]
        self._pending = {}
        self._rows.append((experts, weights, np.asarray(sequence, np.int32), np.full(n, phase, np.int8)))

    def trace(self) -> Trace:
        L, k = len(self.layers), self.meta["top_k"]
        if not self._rows:
            return Trace(np.zeros((0, L, k), np.int16), np.zeros((0, L, k), np.float32), np.zeros(0, np.int32),
                         np.zeros(0, np.int8), dict(self.meta))
        return Trace(*(np.concatenate([r[i] for r in self._rows]) for i in range(4)), dict(self.meta))
