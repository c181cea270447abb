"""Budgets count the bytes a version occupies where it runs, not the bytes it takes in the store: on aten's int4
fallback (no native low-bit kernel) the 2/3-bit precisions are held as int4 codes with bf16 tables, larger than
int4 itself, so they are refused there, and a budget that holds every expert at int4 in the store does not hold
them resident."""
import pytest

import dynaexq
from dynaexq.quant import lowbit_cpu
from dynaexq.quant.precision import Precision
from dynaexq.store.reader import StoreReader


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(lowbit_cpu, "_lib", None)
    monkeypatch.setattr(lowbit_cpu, "_loaded", True)


def _store_bytes(store, p):
    r = StoreReader(store)
    return sum(r.expert_bytes(layer, e, p) for layer in r.layers for e in range(r.num_experts))


def test_on_the_fallback_low_bits_that_are_not_smaller_are_refused(checkpoints, fallback):
    _, store = checkpoints("qwen3_moe")
    for spec in ("uniform:int2", "uniform:int3", "dynaexq:hi=int8,lo=int2", "multilevel:ladder=int4/int3"):
        with pytest.raises(dynaexq.UserError, match=r"int[23] takes .* resident on the CPU \(aten's int4 kernel: the "
                                                    r"native low-bit kernel is not built\) \([\d.]+ bits per weight\), "
                                                    r"no less than int4's"):
            dynaexq.load(store, spec, expert_budget="int4", progress=False)


def test_on_the_fallback_multilevel_leaves_the_larger_low_bits_out_of_its_ladder(bundled_store, fallback, capsys):
    engine = dynaexq.load(bundled_store, "multilevel", expert_budget="int4", calibration_windows=4, progress=False)
    assert "int3, int2 take no fewer bytes than int4 resident on the CPU (aten's" in capsys.readouterr().err
    assert set(engine.precision_counts()) <= {"bf16", "int8", "int4"}
    assert engine.expert_bytes() <= engine.runtime.plan.expert_budget
    engine.close()


def test_on_the_fallback_a_budget_holds_what_is_resident_not_what_is_stored(checkpoints, fallback):
    _, store = checkpoints("qwen3_moe")
    stored = _store_bytes(store, Precision.INT4)
    with pytest.raises(dynaexq.UserError, match=r"uniform:int4 needs \d+ bytes .* resident on the CPU \(aten's"):
        dynaexq.load(store, "uniform:int4", expert_budget=stored, progress=False)
    engine = dynaexq.load(store, "uniform:int4", expert_budget="int4", progress=False)  # its resident bytes
    assert stored < engine.expert_bytes() <= engine.sizes.sizes[Precision.INT4] * 16


def test_with_the_native_kernel_resident_bytes_are_the_stored_ones_up_to_alignment(checkpoints):
    if lowbit_cpu.extension() is None:
        pytest.skip("no native low-bit kernel on this machine")
    _, store = checkpoints("qwen3_moe")
    for p in (Precision.INT2, Precision.INT3, Precision.INT4):
        engine = dynaexq.load(store, f"uniform:{p.value}", expert_budget=p.value, progress=False)
        assert _store_bytes(store, p) <= engine.expert_bytes() <= 1.05 * _store_bytes(store, p)  # 64-B aligned


def test_on_the_fallback_an_embedding_below_int8_is_refused_at_load(bundled_store, fallback, tmp_path):
    import json
    from dynaexq.errors import UserError
    (tmp_path / "map.json").write_text(json.dumps({"default": "int4", "dense": {"model.embed_tokens": "int4"}}))
    with pytest.raises(UserError, match="embed_tokens at int4.*native low-bit kernel"):
        dynaexq.load(bundled_store, f"map:{tmp_path / 'map.json'}", progress=False)
    (tmp_path / "map.json").write_text(json.dumps({"default": "int4", "dense": {"model.embed_tokens": "int8"}}))
    eng = dynaexq.load(bundled_store, f"map:{tmp_path / 'map.json'}", progress=False)  # int8 rows: fine
    assert eng.generate("def f(x):", max_new_tokens=3)
