"""The default policy fits the machine: the checkpoint's own precision when everything fits the memory the machine
gives, the multilevel runtime within it when not, its offload regime when not even every expert at int2 fits;
the choice and the figures behind it are printed."""
import pytest

import dynaexq
from dynaexq.config import RuntimeConfig
from dynaexq.engine import auto

MiB = 1 << 20


@pytest.mark.parametrize("memory, policy, regime", [(1024 * MiB, "uniform:bf16", None),
                                                    (48 * MiB, "multilevel", "resident"),
                                                    (22 * MiB, "multilevel", "offload")])
def test_auto_fits_the_memory_the_machine_gives(bundled_store, monkeypatch, capsys, memory, policy, regime):
    monkeypatch.setattr(auto, "available_memory", lambda device: (memory, "MemAvailable (forced)"))
    engine = dynaexq.load(bundled_store, runtime=RuntimeConfig(kv_reserve="1MiB"), calibration_windows=4)
    try:
        err = capsys.readouterr().err
        assert f"dynaexq: policy auto -> {policy}" in err and "of MemAvailable (forced)" in err, err
        assert engine.policy.startswith(policy)
        if regime is None:
            assert engine.runtime is None and engine.precision_counts() == {"bf16": 6 * 32}
        else:
            assert getattr(engine.runtime, "regime", "resident") == regime
            s = engine.runtime.stats()
            assert s["bytes"]["cap"] <= memory  # the whole plan within what the machine gives
            if regime == "resident":
                assert 1 < len(engine.precision_counts()) and "bf16" not in engine.precision_counts() or \
                    engine.precision_counts()["bf16"] < 6 * 32  # mixed precision
    finally:
        engine.close()


def test_auto_with_an_expert_budget_compares_the_experts_alone(bundled_store, capsys):
    engine = dynaexq.load(bundled_store, expert_budget="bf16", progress=False)
    assert engine.policy == "uniform:bf16" and engine.runtime is None
    engine = dynaexq.load(bundled_store, expert_budget="int3", calibration_windows=4)
    assert "over the expert budget" in capsys.readouterr().err
    assert engine.policy.startswith("multilevel") and engine.expert_bytes() <= engine.runtime.plan.expert_budget
    engine.close()


def test_the_command_line_default_is_auto(bundled_store, capsys):
    from dynaexq.cli import main
    assert main(["generate", "--model", str(bundled_store), "--max-new-tokens", "2", "x"]) == 0
    assert "dynaexq: policy auto -> " in capsys.readouterr().err
