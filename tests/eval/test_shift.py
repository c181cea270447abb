"""`dynaexq eval --scenario ...` (shift, mismatch, cold, steady; the per-phase oracle) and the runtime policies end to end on the bundled model (small windows)."""
import json

import numpy as np
import pytest
import torch

import dynaexq
from dynaexq.cli import main
from dynaexq.config import RuntimeConfig
from dynaexq.demo import BUNDLED
from dynaexq.eval.harness import Evaluation
from dynaexq.eval.shift import run_shift

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
                       "--expert-budget", "100KiB")  # below every expert at int2: the offload regime's minimum
    assert code == 2 and "is below the offload minimum" in err and "slots (top-k)" in err
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy", "dynaexq")
    assert code == 2 and "needs a memory budget" in err
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy",
                       "dynaexq:hi=int2,lo=int8", "--expert-budget", "int3")
    assert code == 2 and "must be a higher precision" in err
    code, _, err = run(capsys, "generate", "x", "--store", bundled_store, "--model", BUNDLED, "--policy",
                       "uniform:int4", "--update-every", "3")
    assert code == 2 and "runtime options are for the runtime policies" in err


def _router_mass(engine, windows) -> dict:
    """Routed mass per layer from the model's own router logits (softmax, top-k, renormalized, as Qwen3-MoE
    routes): an independent path to the routing the banks count."""
    k, mass = engine.model.config.num_experts_per_tok, {}
    with torch.inference_mode():
        logits = engine.model(input_ids=windows, output_router_logits=True).router_logits
    for layer, rl in zip(sorted(engine.banks), logits):
        w, i = rl.float().softmax(-1).topk(k, -1)
        m = torch.zeros(rl.shape[-1], dtype=torch.float64)
        mass[layer] = m.scatter_add_(0, i.flatten(), (w / w.sum(-1, keepdim=True)).flatten().double())
    return mass


def test_phase_oracle_is_the_oracle_map_of_each_phases_own_routing(bundled_store):
    from dynaexq.runtime.planners import parse_policy, resolve_budget

    data = {n: BUNDLED / "eval" / f"{n}.txt" for n in ("code", "dict")}
    ev = Evaluation(BUNDLED, data, windows=2, window_tokens=64, calibration_windows=6, store=bundled_store,
                    progress=False)
    try:
        got = run_shift(ev, "phase-oracle", "int3", repeats=2, step_tokens=16)
        budget, oracle = resolve_budget("int3", ev.sized), parse_policy("oracle")  # resident bytes
        ref_map = {(layer, e): ev.ref for layer in ev.reader.layers for e in range(ev.reader.num_experts)}
        for row, (name, i) in zip(got["phases"], [("code", 0), ("dict", 0), ("code", 1), ("dict", 1)]):
            w = ev.windows[name][i:i + 1]
            ev.engine.apply(ref_map)
            plan = oracle.plan(ev.sized, budget, _router_mass(ev.engine, w))  # brute force: route, plan, run
            ev.engine.apply(plan)
            with torch.inference_mode():
                logp = torch.log_softmax(ev.engine.model(input_ids=w).logits[0, :-1].double(), -1)
            ref = torch.from_numpy(np.array(ev.ref_logp[name][0][i])).double()
            # the harness streams the window in steps of 16 tokens through the KV cache, this forward takes it
            # whole: the same logits up to bf16 rounding order (0.18 % of this small KL on an AVX2 build, whose
            # kernels' tiles differ from AVX-512's)
            assert row["kl"] == pytest.approx((ref.exp() * (ref - logp)).sum(-1).mean().item(), rel=5e-3)
            assert row["expert_bytes"] <= budget
        assert got["policy"].startswith("phase-oracle") and got["expert_bytes"] <= budget
    finally:
        ev.close()


def test_mismatch_scenario_streams_one_domain_with_a_wrong_warm_start_and_plots(bundled_store, capsys, tmp_path):
    code, out, err = run(capsys, "eval", "--store", bundled_store, "--scenario", "mismatch", "--data",
                         f"code={BUNDLED / 'eval' / 'code.txt'}", *SMALL, "--repeats", "2", "--plot", "--out",
                         tmp_path, "--json")
    assert code == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert [p["phase"] for p in rep["phases"]] == ["1:code", "2:code"] and rep["repeats"] == 2
    names = [r["policy"].split(":")[0].split("@")[0] + ("@" + r["policy"].split("@")[1] if "@" in r["policy"] else "")
             for r in rep["results"]]
    assert names == ["calibrated-multilevel", "calibrated-multilevel@dict", "multilevel@dict", "phase-oracle"]
    mixed, wrong, runtime, oracle = rep["results"]
    assert all(r["expert_bytes"] <= r["budget"] for r in rep["results"]) and runtime["decisions"] > 0
    assert wrong["precisions"] != mixed["precisions"] or wrong["mean_kl"] != mixed["mean_kl"]  # another warm start
    assert oracle["mean_kl"] < wrong["mean_kl"]
    assert [p["tokens"] for p in oracle["phases"]] == [64, 128]
    assert (tmp_path / "mismatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x oracle" in (tmp_path / "mismatch.md").read_text()
    assert json.loads((tmp_path / "mismatch.json").read_text())["scenario"] == "mismatch"


def test_cold_scenario_starts_the_runtime_without_a_warm_start(bundled_store, capsys):
    code, out, err = run(capsys, "eval", "--store", bundled_store, "--scenario", "cold", "--policy", "multilevel@none",
                         "multilevel", *SMALL, "--repeats", "2", "--json")
    assert code == 0, err
    cold, warm = json.loads(out.strip().splitlines()[-1])["results"]
    assert cold["policy"].endswith("@none") and cold["decisions"] > 0 and cold["expert_bytes"] <= cold["budget"]
    assert cold["mean_kl"] != warm["mean_kl"]


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "steady", "--policy", "uniform:int3@dict"], "has none"),
    (["--scenario", "steady", "--policy", "multilevel@nosuch"], "no calibration text named 'nosuch'"),
    (["--scenario", "steady", "--policy", "calibrated-multilevel@none"], "needs a calibration"),
    (["--plot"], "apply to the streamed --scenario runs only"),
    (["--scenario", "cold", "--repeats", "0"], "--repeats must be >= 1"),
    (["--scenario", "steady"], "domain 'code' has 2 windows, fewer than --repeats 4"),
])
def test_scenario_errors_name_what_is_valid(bundled_store, capsys, argv, message):
    code, _, err = run(capsys, "eval", "--store", bundled_store, "--windows", "2", "--window-tokens", "64",
                       "--calibration-windows", "6", *argv)
    assert code == 2 and message in err, err
