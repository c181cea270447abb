"""The preallocated SlotCache under the batch decoder: at a 4k context, two sequences of different lengths decode
exactly what a full forward of each (transformers' sdpa, no cache) predicts, and the cache buffers are the same
tensors from the first decode step to the last (nothing is reallocated or concatenated per step)."""
import pytest
import torch
import transformers as T

import dynaexq
from dynaexq.engine.batch import BatchDecoder, SamplingParams, Sequence
from dynaexq.store.prepare import prepare
from models import COMMON


@pytest.fixture(scope="module")
def long_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    cfg = T.Qwen3MoeConfig(**{**COMMON, "max_position_embeddings": 8192}, moe_intermediate_size=32, num_experts=8,
                           num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(root / "ck")
    prepare(root / "ck", root / "store", precisions=("fp32",), progress=False)
    engine = dynaexq.load(root / "store", "uniform:fp32", progress=False)
    yield engine
    engine.close()


def test_decoding_at_a_4k_context_equals_a_full_forward_and_keeps_its_buffers(long_engine):
    model = long_engine.model
    assert model.config._attn_implementation == "dynaexq"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (4000, 2900)]
    dec = BatchDecoder(model, max_batch=2, prefill_chunk=1024)
    dec.kv.reserve(4096 + 16)  # room for the whole run up front: any reallocation below is a failure
    seqs = [Sequence(p, SamplingParams(max_tokens=12, temperature=0), None) for p in prompts]
    for s in seqs:
        dec.add(s)
    seen = []  # (the decode step's rows, their logits)
    real_decode = dec._decode

    def decode():
        rows = list(dec.rows)
        hook = model.lm_head.register_forward_hook(lambda m, a, out: seen.append((rows, out[:, -1].clone())))
        try:
            real_decode()
        finally:
            hook.remove()
    dec._decode = decode
    buffers, steps = None, 0
    while not dec.idle():
        dec.step()
        if len(dec.rows) == 2 and buffers is None:
            buffers = [(t.data_ptr(), t.shape) for t in dec.kv.buffers()]
        if buffers is not None and dec.rows:
            steps += 1
            assert [(t.data_ptr(), t.shape) for t in dec.kv.buffers()] == buffers  # the same storage every step
    assert steps >= 10 and buffers
    with torch.inference_mode():
        for s in seqs:
            assert s.finish_reason == "length" and len(s.out) == 12
            logits = model(input_ids=torch.tensor([s.prompt + s.out])).logits[0]  # one forward, no cache
            greedy = logits[len(s.prompt) - 1:-1].argmax(-1).tolist()
            assert s.out == greedy, (s.out, greedy)
            mine = [out[rows.index(s)] for rows, out in seen if s in rows]  # its rows of every decode step
            assert len(mine) == 11  # the first token comes from the prefill
            torch.testing.assert_close(torch.stack(mine), logits[len(s.prompt):-1], atol=2e-5, rtol=1e-4)
