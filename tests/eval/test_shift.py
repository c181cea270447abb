"""`dynaexq eval --scenario shift` and the runtime policies end to end on the bundled model (small windows)."""
import json

import pytest
import torch

import dynaexq
from dynaexq.cli import main
from dynaexq.demo import BUNDLED
from dynaexq.eval.harness import Evaluation
from dynaexq.eval.shift import run_shift
from dynaexq.runtime.controller import RuntimeConfig

SMALL = ["--windows", "2", "--window-tokens", "64", "--calibration-windows", "6", "--step-tokens", "16",
         "--update-every", "2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_shift_streams_phases_and_static_kl_matches_the_batch_evaluation(bundled_store):
    data = {n: BUNDLED / "eval" / f"{n}.txt" for n in ("code", "prose")}
    ev = Evaluation(BUNDLED, data, windows=2, window_tokens=64, calibration_windows=6, store=bundled_store,
                    progress=False)
    try:
        dyn = run_shift(ev, "dynaexq:hi=int8,lo=int2,delta=0", "int3", repeats=2, step_tokens=16,
                        config=RuntimeConfig(update_every=2))
        static = run_shift(ev, "uniform:int3", None, repeats=2, step_tokens=16)
        batch = ev.run("uniform:int3")  # whole windows in batches: an independent path to the same numbers
    finally:
        ev.close()
    assert [p["phase"] for p in dyn["phases"]] == ["1:code", "1:prose", "2:code", "2:prose"]
    assert dyn["expert_bytes"] <= dyn["budget"] and dyn["switches"] > 0 and dyn["decisions"] == 4 * 4 // 2
    assert dyn["failures"] == 0 and dyn["forward_wait_s"] >= 0  # its size is bench/switching.py's figure
    assert sum(p["pairs"] for p in dyn["phases"]) <= dyn["switches"]
    assert dyn["mean_kl"] == pytest.approx(sum(p["kl"] for p in dyn["phases"]) / 4)  # equal tokens per phase
    assert static["mean_kl"] == pytest.approx(batch["mean_kl"], rel=1e-3)


def test_eval_scenario_shift_cli_reports_json(bundled_store, capsys):
    code, out, err = run(capsys, "eval", "--store", bundled_store, "--scenario", "shift", "--policy",
                         "frozen:hi=int8,lo=int2", "uniform:int2", *SMALL, "--json")
    assert code == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["scenario"] == "shift" and rep["runtime"]["update_every"] == 2
    frozen, uniform = rep["results"]
    assert frozen["switches"] == 0 and frozen["expert_bytes"] <= frozen["budget"]
    assert len(frozen["phases"]) == 6 and frozen["mean_kl"] < uniform["mean_kl"]  # int8/int2 at int3 > all int2


def test_generate_with_the_runtime_saves_and_reuses_its_hotness_file(bundled_store, tmp_path, capsys):
    hot = tmp_path / "hot.json"
    args = ["generate", "def f(x):", "--store", bundled_store, "--model", BUNDLED, "--policy", "dynaexq",
            "--expert-budget", "int3", "--max-new-tokens", "8", "--update-every", "4", "--hotness-file", hot]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "decisions" in err and hot.is_file()
    saved = json.loads(hot.read_text())
    assert saved["steps"] == 8 and len(saved["hotness"]) == 6
    engine = dynaexq.load(BUNDLED, "dynaexq", "int3", store=bundled_store, progress=False,
                          runtime=RuntimeConfig(hotness_file=str(hot)))  # no calibration: warm from the file
    try:
        S = engine.runtime.hotness.snapshot()
        assert all(torch.allclose(S[int(k)].float(), torch.tensor(v)) for k, v in saved["hotness"].items())
    finally:
        engine.close()


def test_runtime_policy_errors(bundled_store, capsys):
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy", "dynaexq",
                       "--expert-budget", "1MiB")
    assert code == 2 and "minimum expert budget is" in err
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy", "dynaexq")
    assert code == 2 and "needs a memory budget" in err
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy",
                       "dynaexq:hi=int2,lo=int8", "--expert-budget", "int3")
    assert code == 2 and "must be a higher precision" in err
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy",
                       "uniform:int4", "--update-every", "3")
    assert code == 2 and "runtime options are for the runtime policies" in err
