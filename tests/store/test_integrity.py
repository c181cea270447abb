"""Store integrity at the cost users can afford: a cheap stamp of every shard at load, each expert's bytes hashed
on its first read, whole shards hashed by `inspect --verify` (and written by `prepare`, which reads each expert of
the source once for all precisions)."""
import json
import os
import shutil

import pytest

import dynaexq
import dynaexq.store.prepare as prep
from dynaexq.arch.adapter import Arch
from dynaexq.cli import main
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.store import layout
from dynaexq.store.reader import StoreReader
from models import make_checkpoint


def corrupted_copy(store, tmp_path, layer, e, precision="int4"):
    """A copy of `store` (hard links: the original is untouched) with one byte flipped inside expert e's codes."""
    out = tmp_path / "corrupt"
    shutil.copytree(store, out, copy_function=os.link)
    shard = out / layout.expert_shard(layer, Precision(precision))
    data = bytearray(shard.read_bytes())
    shard.unlink()  # a new file, not a write through the hard link
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[f"{e}.gate_up.data"]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    return out


def test_load_hashes_no_whole_shard_and_an_experts_bytes_are_checked_on_first_read(bundled_store, tmp_path,
                                                                                monkeypatch):
    reader = StoreReader(bundled_store)
    layer = reader.layers[2]
    bad = corrupted_copy(bundled_store, tmp_path, layer, 5)
    hashed = []
    real = layout.sha256_file
    monkeypatch.setattr(layout, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    engine = dynaexq.load(bundled_store, "uniform:int4", progress=False)  # the intact store loads
    assert engine.precision_counts() == {"int4": 192} and hashed == []
    with pytest.raises(UserError, match=rf"expert 5 of layer {layer} .*int4.*prepare"):
        dynaexq.load(bad, "uniform:int4", progress=False)
    assert hashed == []  # found by the expert's own digest, not by hashing shards
    dynaexq.load(bad, "uniform:int2", progress=False)  # the other precisions of that store are fine
    off = dynaexq.load(bad, "uniform:int4", progress=False, verify="off")  # the user's explicit choice
    assert off.precision_counts() == {"int4": 192}


def test_a_truncated_or_replaced_shard_is_refused_at_load_by_its_stamp(bundled_store, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(bundled_store, out, copy_function=os.link)
    shard = out / layout.expert_shard(StoreReader(bundled_store).layers[0], Precision.INT2)
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[:-100])
    with pytest.raises(UserError, match="does not match .*manifest"):
        dynaexq.load(out, "uniform:int2", progress=False)


def test_inspect_verify_hashes_every_shard_and_names_the_corrupted_one(bundled_store, tmp_path, capsys):
    layer = StoreReader(bundled_store).layers[1]
    bad = corrupted_copy(bundled_store, tmp_path, layer, 3)
    assert main(["inspect", str(bundled_store), "--verify"]) == 0
    assert "integrity" in capsys.readouterr().out
    assert main(["inspect", str(bad), "--verify"]) == 2
    assert layout.expert_shard(layer, Precision.INT4) in capsys.readouterr().out
    assert main(["inspect", str(bad)]) == 0  # without --verify: the cheap stamp, which a flipped byte passes
    assert "not verified" in capsys.readouterr().out


def test_prepare_reads_each_expert_of_the_source_once_for_all_precisions(tmp_path, monkeypatch):
    ckpt = make_checkpoint("qwen3_moe", tmp_path / "ck")
    reads, real = [], Arch.read_expert
    monkeypatch.setattr(Arch, "read_expert", lambda self, ck, index, e: reads.append(e) or real(self, ck, index, e))
    prep.prepare(ckpt, tmp_path / "st", precisions=["bf16", "int8", "int4", "int3", "int2"], progress=False)
    assert len(reads) == 2 * 8, len(reads)  # 2 MoE layers x 8 experts, not x 5 precisions
