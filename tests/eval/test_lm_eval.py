"""lm-eval on our loaded model, fully offline, on two local JSONL tasks (rolling log-likelihood and multiple
choice); lm-eval's numbers are checked against our own float64 scoring of the same model."""
import json
import math
import os

import pytest
import torch

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported: fully offline, as the machine is
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")

import dynaexq  # noqa: E402
from dynaexq.demo import BUNDLED  # noqa: E402
from dynaexq.eval import lm_eval_adapter  # noqa: E402

PPL_TASK = """task: dxq_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
MC_TASK = """task: dxq_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    code = (BUNDLED / "eval" / "code.txt").read_text().split("\n\n")
    dic = (BUNDLED / "eval" / "dict.txt").read_text().split("\n\n")
    paras = [p.strip() for p in code + dic if 40 < len(p.strip()) < 400][:6]
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    lines = [ln for ln in (BUNDLED / "eval" / "code.txt").read_text().splitlines() if 20 < len(ln.strip()) < 60]
    words = [p.split("\\")[0].strip() for p in dic if p.strip() and 3 < len(p.split("\\")[0].strip()) < 20]
    mc = []
    for i in range(8):
        ctx, nxt = lines[2 * i].rstrip(), lines[2 * i + 1]
        choices = [words[3 * i], nxt.strip(), words[3 * i + 1]]
        mc.append({"context": ctx, "choices": choices, "answer": 1})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "dxq_ppl.yaml").write_text(PPL_TASK.format(data=root / "ppl.jsonl"))
    (root / "dxq_mc.yaml").write_text(MC_TASK.format(data=root / "mc.jsonl"))
    return root, paras, mc


@torch.no_grad()
def _logprob(model, context_ids, cont_ids) -> float:
    x = torch.tensor([context_ids + cont_ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
    return sum(logp[len(context_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids))


def test_lm_eval_offline_on_local_tasks_matches_our_own_scoring(tasks, tmp_path, monkeypatch, bundled_store):
    root, paras, mc = tasks
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    engine = dynaexq.load(BUNDLED, "uniform:int4", store=bundled_store, dtype=torch.float32, progress=False)
    out = lm_eval_adapter.run(engine, ["dxq_ppl", "dxq_mc"], include_path=[root], batch_size=4)
    res = out["results"]
    tok, model = engine.tokenizer, engine.model

    ll = sum(_logprob(model, [tok.eos_token_id], tok(p, add_special_tokens=False)["input_ids"]) for p in paras)
    words = sum(len(p.split()) for p in paras)
    want_wppl = math.exp(-ll / words)
    assert res["dxq_ppl"]["word_perplexity,none"] == pytest.approx(want_wppl, rel=1e-3)

    hits = 0
    for d in mc:
        ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
        scores = [_logprob(model, ctx, tok(d["context"] + " " + c, add_special_tokens=False)["input_ids"][len(ctx):])
                  for c in d["choices"]]
        hits += int(max(range(3), key=scores.__getitem__) == d["answer"])
    assert res["dxq_mc"]["acc,none"] == pytest.approx(hits / len(mc))


def test_unknown_task_is_a_clear_error(tasks, bundled_store):
    from dynaexq.errors import UserError
    engine = dynaexq.load(BUNDLED, "uniform:int2", store=bundled_store, progress=False)
    with pytest.raises(UserError, match="unknown"):
        lm_eval_adapter.run(engine, ["no_such_task_here"], include_path=[tasks[0]])


def test_lm_eval_steps_the_runtime_controller_and_saves_its_hotness(tasks, tmp_path, monkeypatch, bundled_store,
                                                                    capsys):
    """A runtime policy under lm-eval: the controller sees every forward (decisions are taken) and the engine is
    closed at the end, so --hotness-file is written."""
    from dynaexq.cli import main
    root, _, _ = tasks
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    steps = []
    real = dynaexq.engine.engine.Engine.after_step

    def after_step(self):
        steps.append(self.runtime.controller.steps if self.runtime else None)
        return real(self)
    monkeypatch.setattr(dynaexq.engine.engine.Engine, "after_step", after_step)
    hot = tmp_path / "hot.pt"
    code = main(["lm-eval", "dxq_ppl", "--include-path", str(root), "--model", str(bundled_store), "--policy",
                 "multilevel", "--expert-budget", "int3", "--hotness-file", str(hot), "--update-every-tokens", "64",
                 "--batch-size", "2", "--json"])
    assert code == 0, capsys.readouterr().err
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] >= 2  # every forward was a controller step
    assert hot.is_file()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["runtime"]["decisions"] >= 1, out
