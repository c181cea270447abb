"""prepare: manifest contents, source dtype kept, atomic shards, resume after a kill."""
import json

import pytest
import torch
from safetensors import safe_open

import dynaexq.store.prepare as prep
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import expected_nbytes
from dynaexq.store import layout
from models import make_checkpoint


def test_manifest_records_measured_bytes_errors_and_shard_hashes(tmp_path):
    ckpt = make_checkpoint("qwen3_moe", tmp_path / "ck")
    store = prep.prepare(ckpt, tmp_path / "st", precisions=["bf16", "int8", "int4", "int3", "int2"], progress=False)
    m = json.loads((store / layout.MANIFEST).read_text())
    assert m["moe_layers"] == [0, 1] and m["num_experts"] == 8
    assert m["shapes"] == {"gate_up": [64, 64], "down": [64, 32]}
    mean_err = []
    for p in ["bf16", "int8", "int4", "int3", "int2"]:
        stat = m["experts"]["0"][p]
        want = expected_nbytes(Precision(p), "gate_up", (64, 64)) + expected_nbytes(Precision(p), "down", (64, 32))
        assert stat["bytes"] == [want] * 8
        mean_err.append(sum(stat["error"]) / 8)
    assert mean_err == sorted(mean_err)
    for name, info in m["shards"].items():
        assert layout.sha256_file(store / name) == info["sha256"]
    assert not list(store.rglob("*.tmp"))


def test_nonexpert_weights_keep_the_source_dtype(tmp_path):
    ckpt = make_checkpoint("mixtral", tmp_path / "ck", dtype=torch.bfloat16)
    store = prep.prepare(ckpt, tmp_path / "st", precisions=["int4"], progress=False)
    with safe_open(str(store / layout.NONEXPERT_SHARD), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert not any(".experts." in k for k in f.keys())
    assert dtypes == {"BF16"}
    assert json.loads((store / layout.MANIFEST).read_text())["source_dtype"] == "bfloat16"


def test_killed_prepare_resumes_and_keeps_finished_shards(tmp_path, monkeypatch):
    ckpt = make_checkpoint("olmoe", tmp_path / "ck")
    out = tmp_path / "st"
    real, calls = prep.quantize_many, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 8:  # 2 matrices x 3 precisions per chunk of 8 experts (a layer): dies inside the second
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prep, "quantize_many", dying)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(ckpt, out, precisions=["int8", "int4", "int2"], progress=False)
    assert not layout.is_store(out) and not list(out.rglob("*.tmp"))
    done = sorted(p.name for p in (out / "experts").glob("*.safetensors"))
    assert done == ["L000.int2.safetensors", "L000.int4.safetensors", "L000.int8.safetensors"]  # layer 1: none
    stamps = {n: (out / "experts" / n).stat().st_mtime_ns for n in done}

    monkeypatch.setattr(prep, "quantize_many", real)
    calls["n"] = 0
    prep.prepare(ckpt, out, precisions=["int8", "int4", "int2"], progress=False)
    assert {n: (out / "experts" / n).stat().st_mtime_ns for n in done} == stamps  # reused, not rewritten
    fresh = prep.prepare(ckpt, tmp_path / "fresh", precisions=["int8", "int4", "int2"], progress=False)
    shards = json.loads((out / layout.MANIFEST).read_text())["shards"]
    assert shards.keys() == json.loads((fresh / layout.MANIFEST).read_text())["shards"].keys()
    for name in shards:  # same tensors and metadata as an uninterrupted run (safetensors orders its
        with safe_open(str(out / name), "pt") as a, safe_open(str(fresh / name), "pt") as b:  # header freely)
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_prepared_store_is_reused_and_other_params_refused(tmp_path):
    ckpt = make_checkpoint("qwen3_moe", tmp_path / "ck")
    out = prep.prepare(ckpt, tmp_path / "st", precisions=["int4"], progress=False)
    before = (out / layout.MANIFEST).stat().st_mtime_ns
    prep.prepare(ckpt, out, precisions=["int4"], progress=False)
    assert (out / layout.MANIFEST).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="already holds a store prepared from another checkpoint"):
        prep.prepare(ckpt, out, precisions=["int2"], progress=False)
