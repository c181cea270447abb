"""Routing traces (dynaexq/trace.py) and their replay through the policies (runtime/replay.py): the format, the
importers of the public formats (files written here in those formats), a replay against an independent LRU, and a
recording from generate against transformers' own router outputs."""
import json

import numpy as np
import pytest
import torch

import dynaexq
from dynaexq.cli import main
from dynaexq.config import RuntimeConfig
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.replay import replay, sizes_from_shapes
from dynaexq.trace import Trace, import_flame, import_route_csv, import_trace

SIZES = sizes_from_shapes((256, 512), (512, 128))


def _trace(T=300, L=3, E=16, k=2, seed=0):
    """Skewed routing: a few hot experts per layer, drifting halfway."""
    g = np.random.default_rng(seed)
    experts = np.empty((T, L, k), np.int16)
    for t in range(T):
        for layer in range(L):
            p = np.exp(-0.4 * ((np.arange(E) + (E // 2 if t > T // 2 else 0) + layer) % E))
            experts[t, layer] = g.choice(E, size=k, replace=False, p=p / p.sum())
    w = g.random((T, L, k)).astype(np.float32)
    return Trace(experts, w / w.sum(-1, keepdims=True), np.repeat(np.arange(3), T // 3).astype(np.int32),
                 np.ones(T, np.int8), {"model": "synthetic", "num_experts": E})


def test_a_trace_round_trips_and_bad_files_are_refused(tmp_path):
    t = _trace()
    path = t.save(tmp_path / "t.npz")
    back = Trace.load(path)
    for name in ("experts", "weights", "sequence", "phase"):
        assert np.array_equal(getattr(back, name), getattr(t, name))
    assert back.meta == t.meta and back.layers == [0, 1, 2] and back.meta["top_k"] == 2
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a dynaexq routing trace"):
        Trace.load(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="written as .npz"):
        t.save(tmp_path / "t.json")
    with pytest.raises(UserError, match="expert ids must lie"):
        Trace(t.experts + 100, t.weights, t.sequence, t.phase, {"num_experts": 16})


def test_the_route_csv_format_imports_by_position(tmp_path):
    lines = ["# route_trace v1", "# model=/x/Some-MoE.gguf arch=qwen3moe n_layer=2 n_expert=8 n_expert_used=2",
             "# layer=0 expert_bytes=100 dense_bytes=7", "# layer=1 expert_bytes=100 dense_bytes=7",
             "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes"]
    want = np.full((3, 2, 2), -1, np.int16)
    wts = np.full((3, 2, 2), np.nan, np.float32)
    g = np.random.default_rng(1)
    for step in (5, 6, 7):
        for layer in range(2):
            if step == 5 and layer == 1:
                continue  # the engine skipped the last layer for a prefill token: absent
            es = g.choice(8, 2, replace=False)
            for slot, e in enumerate(es):
                want[step - 5, layer, slot], wts[step - 5, layer, slot] = e, 0.25 + 0.5 * slot
                lines.append(f"0,{int(step > 5)},{step},{layer},{slot},{e},{0.25 + 0.5 * slot},1,100")
    (tmp_path / "m.route.csv").write_text("\n".join(lines) + "\n")
    t = import_route_csv(tmp_path / "m.route.csv")
    assert np.array_equal(t.experts, want) and np.allclose(t.weights, wts, equal_nan=True)
    assert t.phase.tolist() == [0, 1, 1] and t.num_experts == 8 and t.meta["model"] == "Some-MoE.gguf"
    assert t.meta["file_expert_bytes"] == {0: 100, 1: 100} or t.meta["file_expert_bytes"] == {"0": 100, "1": 100}


def test_the_flame_format_imports_in_rank_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    want_ids, want_w = [], []
    for layer in (2, 3):
        ids = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(10)])
        probs = torch.rand(10, 6, generator=g)
        torch.save((torch.arange(10), probs, ids), tmp_path / f"layer{layer}.pt")
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices
        want_ids.append(ids.gather(1, order))
        want_w.append(probs.gather(1, order))
    t = import_flame(tmp_path)
    assert np.array_equal(t.experts, torch.stack(want_ids, 1).numpy())
    assert np.allclose(t.weights, torch.stack(want_w, 1).numpy()) and t.layers == [2, 3] and t.num_experts == 64
    assert import_trace(tmp_path).experts.shape == (10, 2, 6)


def _lru_hits(trace, per_layer: int, score_from: int) -> int:
    """An independent per-layer LRU of `per_layer` slots: evicts the expert whose last use is oldest (the experts
    of one token's layer share a use, the lower id going first, as the cache's ticks do); the experts a token
    routes to in a layer are in use (never evicted while it needs them)."""
    hits = 0
    last = {layer: {} for layer in trace.layers}  # expert -> the token it was last used at
    for t in range(len(trace)):
        for i, layer in enumerate(trace.layers):
            c, now = last[layer], [int(e) for e in trace.experts[t, i] if e >= 0]
            for e in now:
                if e in c:
                    hits += t >= score_from
                elif len(c) >= per_layer:
                    del c[min((c[x], x) for x in c if x not in now)[1]]
                c[e] = t
    return hits


def test_lru_replay_equals_an_independent_lru_and_the_profile_covers_at_least_its_experts():
    t = _trace()
    k, L = t.experts.shape[2], len(t.layers)
    for per_layer in (2, 5, 9):
        budget = per_layer * L * SIZES[Precision.INT2]
        r = replay(t, "lru-offload:int2", budget, SIZES, score_from=100)
        assert r["counts"]["hits"] == _lru_hits(t, per_layer, 100), per_layer
        assert r["read_bytes_per_token"] == r["counts"]["misses"] * SIZES[Precision.INT2] / (len(t) - 100)
        s = replay(t, "static-offload:int2", budget, SIZES, score_from=len(t) // 2)
        first, second = t.experts[:len(t) // 2], t.experts[len(t) // 2:]
        cover = 0
        for i in range(L):
            counts = np.bincount(first[:, i].reshape(-1), minlength=t.num_experts)
            top = set(np.argsort(-counts, kind="stable")[:max(0, per_layer - k)].tolist())
            cover += sum(int(e) in top for e in second[:, i].reshape(-1))
        assert s["counts"]["hits"] >= cover
    with pytest.raises(UserError, match="offload minimum"):
        replay(t, "lru-offload:int2", (k * L - 1) * SIZES[Precision.INT2], SIZES)


def test_dynaexq_replays_in_both_regimes():
    t = _trace()
    E, L = t.num_experts, len(t.layers)
    full = replay(t, "dynaexq:hi=int4,lo=int2", E * L * SIZES[Precision.INT4], SIZES)
    assert full["regime"] == "resident" and full["mass_served"] == {"int4": pytest.approx(1.0)}
    assert full["read_bytes_per_token"] == 0 and full["hit_rate"] == 1.0
    low = replay(t, "dynaexq:hi=int4,lo=int2", E * L * SIZES[Precision.INT2], SIZES)
    assert low["mass_served"] == {"int2": pytest.approx(1.0)}
    quick = RuntimeConfig(update_every_tokens=16, half_life_tokens=32)  # decisions often enough for 300 tokens
    mid = replay(t, "dynaexq:hi=int4,lo=int2", E * L * (SIZES[Precision.INT2] + SIZES[Precision.INT4]) // 2, SIZES,
                 quick, score_from=50)
    # hot experts get the int4 slots: more than their share of the slots carries of the routed mass
    share = mid["slots"]["int4"] / (E * L)
    assert mid["mass_served"]["int4"] > share > 0 and mid["counts"]["fetches"] > 0  # the hot set moved halfway
    off = replay(t, "dynaexq:hi=int4,lo=int2", E * L * SIZES[Precision.INT2] // 2, SIZES)
    assert off["regime"] == "offload" and 0 < off["hit_rate"] < 1


def test_generate_records_the_routing_transformers_computed(bundled_store, tmp_path):
    eng = dynaexq.load(bundled_store, "uniform:int4", progress=False)
    seen = []  # the routers' own outputs, per forward and layer
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
             for layer in eng.model.model.layers]
    eng.record_routing(tmp_path / "r.npz")
    eng.generate("The quick brown fox", max_new_tokens=6)
    for h in hooks:
        h.remove()
    eng.close()
    t = Trace.load(tmp_path / "r.npz")
    L = len(t.layers)
    want = [torch.cat(seen[i::L]) for i in range(L)]  # per layer: every token row in order
    assert t.experts.shape[:2] == (want[0].shape[0], L)
    for i in range(L):
        assert np.array_equal(t.experts[:, i], want[i].numpy())
    prompt = len(eng.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"])
    assert t.phase.tolist() == [0] * prompt + [1] * (len(t) - prompt) and set(t.sequence.tolist()) == {0}
    assert np.allclose(np.nansum(t.weights, -1), 1.0, atol=1e-2)  # normalized top-k weights


def test_eval_records_the_reference_routing_one_sequence_per_window(bundled_store, tmp_path, monkeypatch, capsys):
    """`eval --record-routing`: the reference pass's routing, as transformers' routers computed it (a hook on each
    router, independent of the banks that record), one sequence per window, every token of every window."""
    from dynaexq.engine.engine import Engine

    seen, real_post = [], Engine.__post_init__

    def hooked(self):  # the routers' own outputs while the reference pass runs
        real_post(self)
        for layer in self.model.model.layers:
            layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()) if self.recorder
                                                 else None)
    monkeypatch.setattr(Engine, "__post_init__", hooked)
    path = tmp_path / "eval.npz"
    assert main(["eval", "--model", str(bundled_store), "--policy", "uniform:int4", "--windows", "3",
                 "--window-tokens", "32", "--record-routing", str(path), "--json"]) == 0
    windows = sum(n for n, _ in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["windows"].values())
    t = Trace.load(path)
    L = len(t.layers)
    want = [torch.cat(seen[i::L]) for i in range(L)]
    assert len(t) == want[0].shape[0] and len(t) % 32 == 0 and set(t.phase.tolist()) == {0}
    for i in range(L):
        assert np.array_equal(t.experts[:, i], want[i].reshape(-1, want[i].shape[-1]).numpy())
    assert len(t) == 32 * windows and sorted(set(t.sequence.tolist())) == list(range(windows))
    assert all(np.all(t.sequence[k * 32:(k + 1) * 32] == k) for k in range(windows))  # each window's rows together


def test_the_replay_command(tmp_path, capsys):
    path = _trace().save(tmp_path / "t.npz")
    assert main(["trace", "replay", str(path), "--budget", "50%int2", "int4", "--policy", "dynaexq:hi=int4,lo=int2",
                 "lru-offload:int2", "--expert-shape", "512,128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["budget"], r["regime"]) for r in out["rows"]] == [("50%int2", "offload"), ("50%int2", "offload"),
                                                                  ("int4", "resident"), ("int4", "offload")]
    assert main(["trace", "replay", str(path), "--budget", "1%int2"]) == 2
    assert "offload minimum" in capsys.readouterr().err
