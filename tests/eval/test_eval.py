"""The bundled model and `dynaexq eval`: loads everywhere, the JSON report is self-consistent and agrees with
an independent float64 computation of the metrics from freshly loaded engines, budgets hold, bad input fails."""
import json
import math

import numpy as np
import pytest
import torch
import transformers as T

import dynaexq
from dynaexq.cli import main
from dynaexq.demo import BUNDLED
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.version import make_version
from dynaexq.store.reader import StoreReader

WIN = ["--windows", "3", "--window-tokens", "64", "--calibration-windows", "6"]


@pytest.fixture
def store(bundled_store):
    return bundled_store


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bundled_checkpoint_is_a_plain_transformers_model(store):
    files = [f for f in BUNDLED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 60e6
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {f.name for f in files}
    assert {f.name for f in (BUNDLED / "eval").iterdir()} == {f.name for f in (BUNDLED / "calibration").iterdir()}
    model = T.AutoModelForCausalLM.from_pretrained(BUNDLED, experts_implementation="eager").eval()
    tok = T.AutoTokenizer.from_pretrained(BUNDLED)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.dtype == torch.bfloat16
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                add_generation_prompt=True)
    x = tok("def main(argv):\n    return", return_tensors="pt")["input_ids"]
    engine = dynaexq.load(BUNDLED, "uniform:bf16", store=store, progress=False)
    with torch.no_grad():
        ref, got = model(x).logits.float(), engine.model(x).logits.float()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def _independent(store, policy, windows, budget=None):
    """log-probs of a freshly loaded engine (no re-publishing), in float64."""
    engine = dynaexq.load(BUNDLED, policy, budget, store=store, progress=False, dtype=torch.float32)  # as eval
    with torch.no_grad():
        return torch.log_softmax(engine.model(input_ids=windows).logits[:, :-1].double(), -1).numpy()


def test_eval_json_is_consistent_and_matches_an_independent_computation(store, capsys):
    pols = ["uniform:bf16", "uniform:int8", "uniform:int4", "uniform:int3", "uniform:int2", "calibrated",
            "calibrated-multilevel", "oracle"]
    code, out, _ = run(capsys, "eval", "--store", store, "--json", *WIN, "--policy", *pols, "--expert-budget", "int3")
    assert code == 0
    rep = json.loads(out.strip().splitlines()[-1])
    domains = set(rep["reference"])
    assert domains == {"code", "prose", "dict"}
    res = {r["policy"].split(":")[0] if not r["policy"].startswith("uniform") else r["policy"]: r
           for r in rep["results"]}
    ref = res["uniform:bf16"]
    for d in domains:  # the reference against itself
        assert ref["domains"][d]["kl"] == 0 and ref["domains"][d]["top1"] == 1
        assert ref["domains"][d]["ppl"] == rep["reference"][d]["ppl"]
        kls = [res[f"uniform:{p}"]["domains"][d]["kl"] for p in ("int8", "int4", "int3", "int2")]
        assert kls == sorted(kls) and kls[0] > 0, (d, kls)
    reader = StoreReader(store)
    int3 = sum(reader.expert_bytes(layer, e, dynaexq.quant.precision.Precision.INT3)
               for layer in reader.layers for e in range(reader.num_experts))
    assert res["uniform:int3"]["expert_bytes"] == int3  # measured resident bytes == manifest bytes
    # a budget named int3 is what every expert at int3 occupies resident: the same bytes, each tensor 64-B aligned
    v = make_version(reader.read_expert(reader.layers[0], 0, Precision.INT3), "cpu", torch.float32)
    aligned = len(reader.layers) * reader.num_experts * sum(-(-t.numel() * t.element_size() // 64) * 64 for t in (
        v.gate_up.blob, v.down.blob))
    assert int3 <= aligned < 1.01 * int3
    for name in ("calibrated", "calibrated-multilevel", "oracle"):
        r = res[name]
        assert r["budget"] == aligned and r["expert_bytes"] <= aligned
        assert r["expert_bytes"] > 0.97 * aligned  # the budget is filled
        assert math.isclose(r["mean_kl"], sum(v["kl"] for v in r["domains"].values()) / 3)
    assert set(res["calibrated"]["precisions"]) == {"int8", "int2"}

    # independent: fresh engines, float64 metrics, the same windows (spread evenly over each eval text)
    tok = T.AutoTokenizer.from_pretrained(BUNDLED)
    for d in ("code", "dict"):
        ids = tok((BUNDLED / "eval" / f"{d}.txt").read_text(), add_special_tokens=False)["input_ids"]
        starts = np.linspace(0, len(ids) - 64, 3).astype(int)
        w = torch.tensor([ids[s:s + 64] for s in starts])
        p = _independent(store, "uniform:bf16", w)
        q = _independent(store, "uniform:int4", w)
        kl = (np.exp(p) * (p - q)).sum(-1).mean()
        top1 = (p.argmax(-1) == q.argmax(-1)).mean()
        nll = -np.take_along_axis(q, w[:, 1:, None].numpy(), -1).mean()
        got = res["uniform:int4"]["domains"][d]
        assert got["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert got["top1"] == pytest.approx(top1, abs=1e-9)
        assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_a_text_file_given_with_data_is_used(store, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text("import os\nimport sys\n\ndef main():\n    print(os.getcwd(), sys.argv)\n" * 40)
    code, out, err = run(capsys, "eval", "--store", store, "--json", "--data", f"mine={text}", "--windows", "100",
                         "--window-tokens", "64", "--policy", "uniform:int4")
    rep = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and set(rep["reference"]) == {"mine"}
    n = len(T.AutoTokenizer.from_pretrained(BUNDLED)(text.read_text(), add_special_tokens=False)["input_ids"])
    assert rep["windows"]["mine"] == [n // 64, 64] and "using fewer" in err
    # it really was this text: plain transformers on the same windows gives the same perplexity
    ids = T.AutoTokenizer.from_pretrained(BUNDLED)(text.read_text(), add_special_tokens=False)["input_ids"]
    starts = np.linspace(0, len(ids) - 64, n // 64).astype(int)
    w = torch.tensor([ids[s:s + 64] for s in starts])
    model = T.AutoModelForCausalLM.from_pretrained(BUNDLED, experts_implementation="eager",
                                                   dtype=torch.float32).eval()
    with torch.no_grad():
        nll = model(input_ids=w, labels=w).loss.item()
    assert rep["reference"]["mine"]["ppl"] == pytest.approx(math.exp(nll), rel=0.02)


@pytest.mark.parametrize("args, message", [
    (["--data", "nope.txt"], "is not a file"),
    (["--data", "=x.txt"], "NAME=FILE"),
    (["--policy", "fancy"], "valid policies are"),
    (["--policy", "calibrated:hi=int9"], "unknown precision|valid"),
    (["--policy", "calibrated"], "needs --expert-budget"),
    (["--policy", "calibrated", "--expert-budget", "lots"], "cannot parse size"),
    (["--policy", "calibrated", "--expert-budget", "1KiB"], "minimum budget"),
    (["--policy", "uniform:int4", "--window-tokens", "1"], "--window-tokens"),
    (["--policy", "uniform:int4", "--calibration-windows", "0"], "--calibration-windows"),
    (["--policy", "uniform:int4", "--window-tokens", "100000"], "fewer than one window"),
])
def test_bad_eval_input_fails_clearly(store, capsys, args, message):
    import re
    code, _, err = run(capsys, "eval", "--store", store, *args)
    assert code == 2 and re.search(message, err) and err.startswith("dynaexq: error:")


def test_load_with_a_calibrated_policy_ranks_as_eval_does(store):
    from dynaexq.eval.harness import Evaluation
    from dynaexq.runtime.planners import parse_policy, resolve_budget

    engine = dynaexq.load(BUNDLED, "calibrated-multilevel", "int3", store=store, calibration_windows=6,
                          window_tokens=64, progress=False, dtype=torch.float32)  # eval computes in float32
    ev = Evaluation(BUNDLED, {"code": BUNDLED / "eval" / "code.txt"}, windows=1, window_tokens=64,
                    calibration_windows=6, store=store, progress=False)
    pl = parse_policy("calibrated-multilevel")
    budget = resolve_budget("int3", ev.reader)
    want = pl.plan(ev.reader, budget, ev.calibration_hotness(pl.floor(ev.reader)))
    ev.close()
    assert engine.plan == want and len(set(want.values())) >= 3
    assert engine.expert_bytes() == sum(ev.reader.expert_bytes(layer, e, p) for (layer, e), p in want.items())
    assert engine.expert_bytes() <= budget
    with pytest.raises(UserError, match="needs an expert budget"):
        dynaexq.load(BUNDLED, "calibrated", store=store, progress=False)
    with pytest.raises(UserError, match="only in `dynaexq eval`"):
        dynaexq.load(BUNDLED, "oracle", "int3", store=store, progress=False)


def test_sweep_writes_plot_table_and_json(store, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, err = run(capsys, "eval", "--store", store, "--sweep", "--out", out, "--windows", "2",
                       "--window-tokens", "32", "--calibration-windows", "4", "--expert-budget", "int3", "int4")
    assert code == 0
    rep = json.loads((out / "sweep.json").read_text())
    assert {r["policy"].split(":")[0] for r in rep["results"]} >= {"uniform", "calibrated", "calibrated-multilevel",
                                                                    "oracle"}
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| policy |" in (out / "sweep.md").read_text()


def test_eval_on_the_bundled_model_prints_no_warning(store):
    """What a new user sees: no tokenizer length false alarm, no library warning, nothing that reads like a bug."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "dynaexq"
    proc = subprocess.run([str(exe), "eval", "--store", str(store), "--policy", "uniform:int4", "uniform:int2",
                           "--windows", "2", "--window-tokens", "64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    noisy = [line for line in (proc.stderr + proc.stdout).splitlines()
             if "warn" in line.lower() or "token indices" in line.lower() or "deprecat" in line.lower()]
    assert noisy == [], noisy
    assert "uniform:int2" in proc.stdout


RUNTIME = ["dynaexq", "multilevel", "frozen", "lru-offload:int4", "lru-offload+prefetch:int4"]
STATIC = ["uniform:int4", "calibrated", "calibrated-multilevel", "oracle"]


def test_every_policy_family_runs_in_eval_at_a_resident_budget(store, tmp_path, capsys):
    plan = tmp_path / "map.json"
    plan.write_text(json.dumps({"default": "int3", "layers": {"0": "int4"}}))
    code, out, err = run(capsys, "eval", "--model", store, *WIN, "--expert-budget", "int3", "--json",
                         "--policy", *STATIC, f"map:{plan}", *RUNTIME)
    assert code == 0, err
    res = {r["policy"].split(":")[0] if not r["policy"].startswith("lru") else r["policy"]: r
           for r in json.loads(out.strip().splitlines()[-1])["results"]}
    for name, r in res.items():
        assert math.isfinite(r["mean_kl"]) and 0 <= r["mean_kl"] < 0.5, (name, r["mean_kl"])
        if r["budget"] is not None:
            assert r["expert_bytes"] <= r["budget"], (name, r["expert_bytes"], r["budget"])
    for name in ("dynaexq", "multilevel", "frozen"):
        assert res[name]["runtime"]["step_tokens"] == 32 and res[name]["runtime"]["offload"] is None
    assert res["lru-offload:int4"]["runtime"]["offload"]["misses"] > 0  # an offload-only baseline


def test_runtime_policies_run_in_eval_at_an_offload_budget_and_the_others_are_refused(store, capsys):
    code, out, err = run(capsys, "eval", "--model", store, *WIN, "--expert-budget", "2MiB", "--json",
                         "--policy", "dynaexq", "multilevel", "lru-offload:int4")
    assert code == 0, err
    for r in json.loads(out.strip().splitlines()[-1])["results"]:
        off = r["runtime"]["offload"]
        assert off is not None and off["misses"] > 0 and r["expert_bytes"] <= r["budget"], r
        assert math.isfinite(r["mean_kl"]), r
    code, _, err = run(capsys, "eval", "--model", store, *WIN, "--expert-budget", "2MiB", "--policy", "frozen")
    assert code == 2 and "dynaexq and multilevel run below it" in err, err
    code, _, err = run(capsys, "eval", "--model", store, *WIN, "--expert-budget", "2MiB", "--policy", "calibrated")
    assert code == 2 and "the minimum budget for this policy is 6.41 MiB; below it the runtime policies dynaexq " \
        "and multilevel" in err, err
    code, out, err = run(capsys, "eval", "--model", store, "--windows", "2", "--window-tokens", "64",
                         "--calibration-windows", "6", "--scenario", "steady", "--repeats", "1", "--expert-budget",
                         "2235904", "--policy", "lru-offload:int4", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["results"][0]["budget"] == 2235904
