"""`--weight-budget FILE.gguf` / `--read-budget FILE.gguf` (dynaexq/gguf_file.py) on real GGUF files written here with
llama.cpp's own writer: a file's bytes and a token's reads against sums of the arrays written, the plan they give
equal to the plan at those byte counts, and clear errors."""
import gguf
import numpy as np
import pytest
import torch

import dynaexq
from dynaexq import gguf_file
from dynaexq.engine.load import resident_sizes
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.planners import weights
from dynaexq.store.reader import StoreReader


def _write(path, tensors: dict, experts=(8, 2)):
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    if experts:
        w.add_expert_count(experts[0])
        w.add_expert_used_count(experts[1])
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_files_bytes_and_what_a_token_reads_of_it(tmp_path):
    t = {"token_embd.weight": np.ones((64, 32), np.float32), "output.weight": np.ones((64, 32), np.float16),
         "blk.0.attn_q.weight": np.ones((32, 32), np.float32), "blk.0.ffn_up_exps.weight": np.ones((8, 16, 32),
                                                                                                 np.float16)}
    untied = _write(tmp_path / "untied.gguf", t)
    assert gguf_file.file_bytes(untied) == sum(a.nbytes for a in t.values())
    # the embedding is not read whole (a row of it), the experts at 2 of 8
    want = t["output.weight"].nbytes + t["blk.0.attn_q.weight"].nbytes + t["blk.0.ffn_up_exps.weight"].nbytes // 4
    assert gguf_file.step_bytes(untied) == want
    del t["output.weight"]
    tied = _write(tmp_path / "tied.gguf", t)  # the embedding is the head: read whole
    assert gguf_file.step_bytes(tied) == t["token_embd.weight"].nbytes + t["blk.0.attn_q.weight"].nbytes + \
        t["blk.0.ffn_up_exps.weight"].nbytes // 4
    assert gguf_file.weight_budget("1MiB") == 2 ** 20 and gguf_file.read_budget(12345) == 12345


def test_files_it_cannot_use_are_refused_naming_the_problem(tmp_path):
    with pytest.raises(UserError, match="no GGUF file"):
        gguf_file.weight_budget(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf_file.weight_budget(str(tmp_path / "text.gguf"))
    bare = _write(tmp_path / "bare.gguf", {"blk.0.ffn_up_exps.weight": np.ones((4, 16, 32), np.float32)}, None)
    with pytest.raises(UserError, match="expert_used_count"):
        gguf_file.read_budget(bare)


def test_a_gguf_as_budgets_plans_as_its_byte_counts(checkpoints, tmp_path):
    """dynaexq.load with a GGUF file as its weight budget publishes the plan of the same byte counts given as
    numbers (computed here from the arrays written): the file's bytes held and, unless --read-budget says
    otherwise, its reads as the cap; with --read-budget none, the uncapped plan at the file's bytes."""
    _, store = checkpoints("qwen3_moe")
    sized = resident_sizes(StoreReader(store), "cpu", torch.float32, torch.device("cpu"))
    fixed = weights.fixed_bytes(sized, torch.float32)
    experts = sum(sized.expert_bytes(layer, e, Precision.INT4) for layer in sized.layers
                  for e in range(sized.num_experts))
    budget = fixed + experts + sum(weights.dense_bytes(sized, n, Precision.INT8, torch.float32)
                                   for n in sized.dense_items())
    _, _, shares = weights.plan_dense(sized, budget, torch.float32, expert_plan={
        (layer, e): Precision.INT4 for layer in sized.layers for e in range(sized.num_experts)})
    cap = fixed + (shares["read"] - fixed) * 3 // 4
    cap -= (budget - cap) % 3
    # a file of `budget` bytes reading `cap` a token: A bytes every token reads, X of experts read at 2 / 8
    x = 4 * (budget - cap) // 3
    f = _write(tmp_path / "like.gguf", {"blk.0.attn_q.weight": np.ones(budget - x, np.int8),
                                        "blk.0.ffn_up_exps.weight": np.ones(x, np.int8)})
    assert gguf_file.budgets(f, None) == (budget, cap) == gguf_file.budgets(f, f)  # a file's reads by default
    assert gguf_file.budgets(f, "none") == (budget, None) and gguf_file.budgets(budget, None) == (budget, None)

    def load(wb, rb):
        return dynaexq.load(store, "uniform:int4", weight_budget=wb, read_budget=rb, dtype=torch.float32,
                            progress=False)
    by_file, by_bytes, uncapped = load(f, None), load(budget, cap), load(f, "none")
    try:
        assert by_file.dense_plan == by_bytes.dense_plan and by_file.weight_bytes() == by_bytes.weight_bytes()
        assert len(set(by_file.dense_plan.values())) > 1  # the cap bites: not every matrix at one precision
        assert uncapped.dense_plan == weights.plan_dense(sized, budget, torch.float32, expert_plan={
            (layer, e): Precision.INT4 for layer in sized.layers for e in range(sized.num_experts)})[0]
        assert uncapped.dense_plan != by_file.dense_plan
    finally:
        for engine in (by_file, by_bytes, uncapped):
            engine.close()
