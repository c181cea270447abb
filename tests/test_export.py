"""`dynaexq export`: llama.cpp's --tensor-type-file (parsed here by llama-quantize's own rules, and in the slow test
fed to llama-quantize itself) and SGLang's --init-expert-location file (loaded by SGLang's own logic)."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaexq.cli import main
from dynaexq.demo import BUNDLED
from dynaexq.errors import UserError
from dynaexq.export import llama_cpp_plan
from dynaexq.store.reader import StoreReader
from dynaexq.trace import Trace

# ggml's block sizes (bytes per block of weights), independent of dynaexq/export.py
BLOCK = {"q2_K": (84, 256), "q3_K": (110, 256), "q4_K": (144, 256), "q4_0": (18, 32), "q5_0": (22, 32),
         "q8_0": (34, 32), "bf16": (2, 1)}
BITS = {"q2_K": 2, "q3_K": 3, "q4_0": 4, "q4_K": 4, "q5_0": 5, "q8_0": 8, "bf16": 16}


def _dims(store):
    config = json.loads((Path(store) / "config.json").read_text())
    return config["hidden_size"], config["moe_intermediate_size"], config["num_hidden_layers"]


def _trace(store, hot_layer=None, T=200, seed=0):
    """Routing of the bundled model's shape: uniform, or with every gate weight of `hot_layer` 50x."""
    r = StoreReader(store)
    L, E, k = len(r.layers), r.num_experts, 4
    g = np.random.default_rng(seed)
    experts = np.stack([np.stack([g.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    w = np.full((T, L, k), 1 / k, np.float32)
    if hot_layer is not None:
        w[:, r.layers.index(hot_layer)] *= 50
    return Trace(experts, w, np.zeros(T, np.int32), np.ones(T, np.int8),
                 {"model": "bundled", "num_experts": E, "top_k": k, "layers": r.layers})


def _parse_tensor_type_file(text: str) -> list:
    """llama-quantize's parse_tensor_type_file: whitespace-separated NAME=TYPE, name lower-cased, type a ggml type."""
    out = []
    for arg in text.split():
        name, sep, qtype = arg.partition("=")
        assert sep and name and qtype, arg
        assert qtype in BLOCK, qtype
        out.append((re.compile(name.lower()), qtype))
    return out


def test_llama_cpp_file_covers_each_expert_tensor_once_within_the_bytes_and_follows_hotness(bundled_store, tmp_path):
    H, I, n_layers = _dims(bundled_store)
    path = _trace(bundled_store, hot_layer=3).save(tmp_path / "t.npz")
    out = tmp_path / "types.txt"
    assert main(["export", "llama-cpp", "--model", str(bundled_store), "--trace", str(path), "--size", "int3",
                 "--out", str(out)]) == 0
    rules = _parse_tensor_type_file(out.read_text())
    r = StoreReader(bundled_store)
    E = r.num_experts
    names = [f"blk.{layer}.ffn_{p}_exps.weight" for layer in r.layers for p in ("gate", "up", "down")]
    others = [f"blk.{layer}.{n}.weight" for layer in range(n_layers) for n in ("attn_q", "attn_k", "attn_v",
                                                                              "attn_output", "ffn_gate_inp")]
    got = {}
    for name in names:  # the first matching rule wins; here exactly one matches each expert tensor
        hits = [t for pat, t in rules if pat.search(name)]
        assert len(hits) == 1, (name, hits)
        got[name] = hits[0]
    assert not any(pat.search(n) for pat, _ in rules for n in others + ["output.weight", "token_embd.weight"])

    def nbytes(name, t):  # one tensor of all the layer's experts: rows x cols, cols its input dimension
        rows, cols = (H, I) if "down" in name else (I, H)
        size, block = BLOCK[t]
        assert cols % block == 0, (name, t)  # a type llama-quantize keeps (no fallback left to it)
        return E * rows * cols // block * size

    total = sum(nbytes(n, t) for n, t in got.items())
    budget = sum(nbytes(n, "q3_K" if "down" not in n or I % 256 == 0 else "q4_0") for n in names)  # all at int3
    assert total <= budget
    bits = {layer: BITS[got[f"blk.{layer}.ffn_gate_exps.weight"]] for layer in r.layers}
    assert bits[3] == max(bits.values()) and bits[3] > min(bits.values())  # the hot layer gets the most bits


def test_llama_cpp_plan_is_near_the_exhaustive_optimum_and_refuses_a_size_below_the_smallest(bundled_store):
    """Against every combination of the layers' options (5^6 here): the plan fits, costs no more than any uniform
    type that fits, and is within one layer's largest cost step of the exhaustive optimum (the greedy bound)."""
    import itertools

    from dynaexq.export import layer_options, projection_shapes
    r = StoreReader(bundled_store)
    g = np.random.default_rng(1)
    mass = {layer: g.gamma(0.5, size=r.num_experts) * (1 + i) for i, layer in enumerate(r.layers)}
    options = layer_options(r, mass, projection_shapes(r))
    layers = sorted(options)
    budget = int(0.5 * sum(min(b for b, _, _ in options[layer]) + max(b for b, _, _ in options[layer])
                           for layer in layers))
    plan = llama_cpp_plan(r, mass, budget)
    of = {layer: {p: (b, c) for b, c, p in options[layer]} for layer in layers}
    used, cost = (sum(of[layer][plan[layer]][i] for layer in layers) for i in (0, 1))
    assert used <= budget
    best = min(sum(o[1] for o in combo) for combo in itertools.product(*(options[layer] for layer in layers))
               if sum(o[0] for o in combo) <= budget)
    step = max(max(c for _, c, _ in options[layer]) - min(c for _, c, _ in options[layer]) for layer in layers)
    assert best <= cost <= best + step
    for p in r.precisions:  # every uniform plan that fits costs at least as much
        if all(p in of[layer] for layer in layers) and sum(of[layer][p][0] for layer in layers) <= budget:
            assert cost <= sum(of[layer][p][1] for layer in layers) + 1e-12
    low = sum(min(b for b, _, _ in options[layer]) for layer in layers)
    with pytest.raises(UserError, match="below the smallest plan"):
        llama_cpp_plan(r, mass, low - 1)


def test_sglang_file_loads_as_sglang_reads_it_and_counts_the_routed_slots(bundled_store, tmp_path):
    t = _trace(bundled_store)
    path = t.save(tmp_path / "t.npz")
    out = tmp_path / "loc.json"
    assert main(["export", "sglang", "--model", str(bundled_store), "--trace", str(path), "--out", str(out)]) == 0
    # SGLang's compute_initial_expert_location_metadata: a .json file -> dict -> "logical_count" -> init_by_eplb,
    # which makes it a tensor and adds the leading time-step dimension to a 2-D one
    data = json.loads(out.read_text())
    assert "physical_to_logical_map" not in data and set(data) == {"logical_count"}
    count = torch.tensor(data["logical_count"])
    count = count.unsqueeze(0) if count.dim() == 2 else count
    _, _, n_layers = _dims(bundled_store)
    E = StoreReader(bundled_store).num_experts
    assert count.shape == (1, n_layers, E)
    want = np.zeros((n_layers, E), np.int64)
    for i, layer in enumerate(t.layers):  # every routed slot of every token
        for e in t.experts[:, i].reshape(-1):
            want[layer, e] += 1
    assert np.array_equal(count[0].numpy(), want)


def test_export_refuses_bad_input_with_a_clear_error_and_writes_nothing(bundled_store, tmp_path, capsys):
    path = _trace(bundled_store).save(tmp_path / "t.npz")
    other = Trace(np.zeros((4, 2, 2), np.int16), np.ones((4, 2, 2), np.float32), np.zeros(4, np.int32),
                  np.ones(4, np.int8), {"model": "other", "num_experts": 8}).save(tmp_path / "o.npz")
    model = ["--model", str(bundled_store)]
    for argv, message in (
            (["llama-cpp", *model, "--trace", str(path), "--out", str(tmp_path / "x")], "needs --size"),
            (["sglang", *model, "--out", str(tmp_path / "x")], "one of them"),
            (["sglang", *model, "--trace", str(other), "--out", str(tmp_path / "x")], "another model"),
            (["llama-cpp", *model, "--trace", str(path), "--size", "1KiB", "--out", str(tmp_path / "x")],
             "below the smallest plan")):
        assert main(["export", *argv]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.slow
def test_llama_quantize_accepts_the_file_and_the_gguf_holds_its_types(bundled_store, tmp_path, monkeypatch):
    """llama.cpp's own llama-quantize (bench/peer_llamacpp.py builds it, cached in ~/.cache/dynaexq/llamacpp) on the
    bundled model's bf16 GGUF with the exported file: every expert tensor has the file's type and the bytes the
    export printed."""
    import importlib
    monkeypatch.setenv("DYNAEXQ_CACHE", str(Path.home() / ".cache" / "dynaexq"))  # the build is kept across runs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import peer_llamacpp as peer
    peer = importlib.reload(peer)  # its paths are read from the environment at import

    peer.build()
    base = peer.bf16_gguf(BUNDLED, peer.CACHE / "work")
    path = _trace(bundled_store, hot_layer=5).save(tmp_path / "t.npz")
    types = tmp_path / "types.txt"
    assert main(["export", "llama-cpp", "--model", str(bundled_store), "--trace", str(path), "--size", "int3",
                 "--out", str(types)]) == 0
    out = tmp_path / "out.gguf"
    peer.sh([peer.BIN / "llama-quantize", "--tensor-type-file", types, base, out, "Q4_K_M", "2"])
    sys.path.insert(0, str(peer.SRC / "gguf-py"))
    import gguf
    want = {pat.pattern: t for pat, t in _parse_tensor_type_file(types.read_text())}
    H, I, _ = _dims(bundled_store)
    E = StoreReader(bundled_store).num_experts
    seen = 0
    for t in gguf.GGUFReader(str(out)).tensors:
        if "_exps." in t.name:
            qtype = want["^" + re.escape(t.name) + "$"]
            assert t.tensor_type.name.lower() == qtype.lower(), (t.name, t.tensor_type.name, qtype)
            size, block = BLOCK[qtype]
            assert int(t.n_bytes) == E * H * I // block * size
            seen += 1
    assert seen == 3 * len(StoreReader(bundled_store).layers)
