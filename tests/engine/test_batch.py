"""Continuous batching against transformers' own generate: every sequence of a batch whose members join, leave
and are cancelled at different steps gets exactly the tokens it gets alone."""
import pytest
import torch

import dynaexq
from dynaexq.engine.batch import BatchDecoder, SamplingParams, Sequence, sample_rows

PROMPTS = ["def fibonacci(n):", "The history of the", "import numpy as np\nclass Matrix:", "apple (noun): a",
           "Hello", "    for i in range(len(items)):\n        if"]


@pytest.fixture(scope="module")
def engine(bundled_store):
    eng = dynaexq.load(bundled_store, policy="uniform:int8", dtype=torch.float32, progress=False)
    yield eng
    eng.close()


def _reference(engine, prompt, n):
    ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = engine.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _run(decoder, seqs, join_every=2, cancel=None):
    for i, s in enumerate(seqs):
        decoder.add(s)
        for _ in range(join_every):
            decoder.step()
        if cancel is not None and i == cancel[1]:
            cancel[0].finish_reason = "cancelled"
    steps = 0
    while not decoder.idle():
        decoder.step()
        steps += 1
        assert steps < 500
    assert decoder.rows == [] and not any(decoder.kv.lens)


def test_continuous_batching_gives_each_sequence_its_own_greedy_tokens(engine):
    lengths = [24, 7, 30, 18, 26, 12]
    refs = [_reference(engine, p, n) for p, n in zip(PROMPTS, lengths)]
    dec = BatchDecoder(engine.model, max_batch=4, prefill_chunk=3)  # prompts span several chunks; some wait
    seqs = [Sequence(engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=n, temperature=0), engine.tokenizer)
            for p, n in zip(PROMPTS, lengths)]
    _run(dec, seqs, cancel=(seqs[2], 5))  # the third is cancelled while it and the others run
    for i, (s, ref) in enumerate(zip(seqs, refs)):
        if i == 2:
            assert s.finish_reason == "cancelled" and 0 < len(s.out) < lengths[2]
            assert s.out == ref[:len(s.out)]
        else:
            assert s.finish_reason == "length" and s.out == ref, (i, s.out, ref)
            assert s.text == engine.tokenizer.decode(ref, skip_special_tokens=True)


def test_a_seeded_sample_does_not_depend_on_what_else_is_in_the_batch(engine):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    alone = Sequence(ids, params, engine.tokenizer)
    _run(BatchDecoder(engine.model, max_batch=1), [alone])
    crowd = [Sequence(engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=20, temperature=1.0, seed=k),
                      engine.tokenizer) for k, p in enumerate(PROMPTS[1:4])]
    again = Sequence(ids, params, engine.tokenizer)
    _run(BatchDecoder(engine.model, max_batch=4), crowd + [again], join_every=1)
    assert again.out == alone.out
    other = Sequence(ids, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=99),
                     engine.tokenizer)
    _run(BatchDecoder(engine.model, max_batch=1), [other])
    assert other.out != alone.out  # the seed matters (20 tokens at T=0.9: equal only by a very rare accident)
    top1 = Sequence(ids, SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=5), engine.tokenizer)
    _run(BatchDecoder(engine.model), [top1])
    assert top1.out == _reference(engine, PROMPTS[0], 12)  # top_k=1 sampling is greedy decoding


def test_batched_sampling_draws_what_each_rows_own_sampler_draws():
    """sample_rows (one call for a decode step's rows) against Sequence.sample (transformers' warpers, row by row)
    with each row's generator in the same state: every mix of greedy, temperature, top-k and top-p rows."""
    g = torch.Generator().manual_seed(0)
    grid = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=5),
            dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, top_k=50, top_p=0.95), dict(temperature=2.0, top_k=1),
            dict(temperature=0.5, top_p=0.3)]
    draws = 0
    for trial in range(40):
        kinds = [grid[int(i)] for i in torch.randint(len(grid), (int(torch.randint(1, 9, ())),), generator=g)]
        logits = torch.randn(len(kinds), 300, generator=g) * float(torch.rand((), generator=g) * 6)
        batched = [Sequence([1], SamplingParams(seed=100 * trial + i, **kw), None) for i, kw in enumerate(kinds)]
        alone = [Sequence([1], SamplingParams(seed=100 * trial + i, **kw), None) for i, kw in enumerate(kinds)]
        for _ in range(3):  # generators advance the same way
            got = sample_rows(batched, logits)
            assert got == [s.sample(row) for s, row in zip(alone, logits)], (trial, kinds)
            draws += len(got)
    assert draws > 300
    assert sample_rows([], torch.zeros(0, 5)) == []


def _nucleus(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling should follow, in float64 from the definitions: softmax(logits / T) over the
    top-k logits, then the smallest set of the likeliest tokens whose probability reaches top_p, renormalized."""
    x = logits.double() / temperature
    if top_k:
        x[x < x.topk(top_k).values[-1]] = -float("inf")
    p = x.softmax(-1)
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]  # mass of the likelier tokens
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order] = before < top_p
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=4), dict(temperature=1.0, top_p=0.8),
                                dict(temperature=0.8, top_k=6, top_p=0.9)])
def test_sampled_tokens_follow_the_warped_distribution(kw):
    """20,000 rows with the same logits, each its own seeded generator: a chi-square test of the counts against
    the distribution computed from the definitions; the same counts against the distribution at 1.5x the
    temperature (on the same tokens) are rejected (the test can fail)."""
    from scipy.stats import chisquare
    logits = torch.tensor([2.1, 1.7, 1.4, 0.9, 0.5, 0.2, -0.3, -0.8, -1.4, -2.2])
    n = 20_000
    seqs = [Sequence([1], SamplingParams(seed=i, **kw), None) for i in range(n)]
    counts = torch.bincount(torch.tensor(sample_rows(seqs, logits.expand(n, -1))), minlength=len(logits)).double()

    def p_value(expected):
        support = expected > 0
        assert counts[~support].sum() == 0, (counts, expected)  # nothing outside the kept tokens
        return chisquare(counts[support].numpy(), (expected[support] * n).numpy()).pvalue

    assert p_value(_nucleus(logits, **kw)) > 1e-3, (counts / n, _nucleus(logits, **kw))
    wrong = {**kw, "temperature": kw["temperature"] * 1.5}
    support = _nucleus(logits, **kw) > 0
    alt = _nucleus(logits, **wrong)
    alt = torch.where(support, alt, 0.0) / torch.where(support, alt, 0.0).sum()  # the same support: only the shape
    assert p_value(alt) < 1e-6


def test_stop_strings_end_the_text_before_them_and_are_never_streamed(engine):
    tok = engine.tokenizer
    ref_text = tok.decode(_reference(engine, PROMPTS[0], 40), skip_special_tokens=True)
    stop = ref_text[12:16]
    assert stop.strip(), ref_text
    expected = ref_text[:ref_text.find(stop)]
    seq = Sequence(tok(PROMPTS[0])["input_ids"], SamplingParams(max_tokens=40, temperature=0, stop=(stop, "\x00")),
                   tok)
    dec, streamed = BatchDecoder(engine.model), []
    dec.add(seq)
    while not dec.idle():
        dec.step()
        streamed.append(seq.delta())
    assert seq.finish_reason == "stop" and seq.text == expected == "".join(streamed)
    assert all(stop not in "".join(streamed[:i + 1]) for i in range(len(streamed)))


def test_end_of_sequence_and_context_limit_finish_a_sequence(engine):
    tok = engine.tokenizer
    ids = tok(PROMPTS[1])["input_ids"]
    first = _reference(engine, PROMPTS[1], 3)
    eos = Sequence(ids, SamplingParams(max_tokens=10, temperature=0), tok, stop_ids=[first[2]])
    dec = BatchDecoder(engine.model)
    dec.add(eos)
    while not dec.idle():
        dec.step()
    assert eos.finish_reason == "stop" and eos.out == first[:2]  # the stop token itself is not output
    ctx = Sequence(ids, SamplingParams(max_tokens=10, temperature=0), tok, context=len(ids) + 4)
    dec.add(ctx)
    while not dec.idle():
        dec.step()
    assert ctx.finish_reason == "length" and len(ctx.out) == 4


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-1),
                                 dict(stop=("",))])
def test_invalid_sampling_parameters_name_the_problem(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        SamplingParams(**bad)


def test_incremental_detokenization_equals_a_full_decode_and_cuts_at_stop_strings(engine):
    import random

    tok, rng = engine.tokenizer, random.Random(0)
    base = tok("héllo wörld — ünïcödé 漢字 def f(x):\n    return x**2  # ☃ 🎉", add_special_tokens=False)["input_ids"]
    for trial in range(40):  # random tokens split multi-byte characters across tokens
        ids = base + [rng.randrange(len(tok)) for _ in range(60)]
        seq = Sequence([0], SamplingParams(max_tokens=len(ids), temperature=0), tok)
        shown = ""
        for t in ids:
            seq.append(t)
            shown += seq.delta()
        assert seq.finish_reason == "length"
        assert seq.text == shown == tok.decode(ids, skip_special_tokens=True), trial
    ids = tok("one two three four five", add_special_tokens=False)["input_ids"]
    seq = Sequence([0], SamplingParams(max_tokens=50, temperature=0, stop=("thr",)), tok)
    for t in ids:
        if not seq.finished:
            seq.append(t)
    assert seq.finish_reason == "stop" and seq.text == "one two "


def test_detokenization_decodes_a_bounded_window_per_token(engine, monkeypatch):
    tok = engine.tokenizer
    seq = Sequence([0], SamplingParams(max_tokens=2000, temperature=0), tok)
    widths, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: widths.append(len(ids)) or decode(ids, **kw))
    ids = tok("the quick brown fox jumps over the lazy dog. " * 300, add_special_tokens=False)["input_ids"][:2000]
    for t in ids:
        seq.append(t)
    assert len(widths) <= 2 * len(ids) + 1 and max(widths[:-1]) <= 8, (len(widths), max(widths))


def test_the_sampler_keeps_every_tensor_on_the_logits_device():
    """On `meta` (no data, but any mix of devices raises): greedy, temperature, top-k and top-p rows together give
    one token per row on the logits' device."""
    from dynaexq.engine.batch import sample_tokens
    kinds = [dict(temperature=0.0), dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.8)]
    seqs = [Sequence([1], SamplingParams(seed=i, **kw), None) for i, kw in enumerate(kinds)]
    tokens = sample_tokens(seqs, torch.empty(3, 50, device="meta"))
    assert tokens.device.type == "meta" and tokens.shape == (3,)


def test_load_refuses_a_device_that_is_not_there(bundled_store):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(dynaexq.UserError, match=r"--device cuda: no CUDA device is available"):
        dynaexq.load(bundled_store, policy="uniform:int8", device="cuda", progress=False)
    with pytest.raises(dynaexq.UserError, match=r"--device 'tpu': valid devices are cpu, cuda, cuda:N"):
        dynaexq.load(bundled_store, policy="uniform:int8", device="tpu", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_argmax_equals_aten(dtype):
    from dynaexq.engine.batch import argmax
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 151936, generator=g).to(dtype)
    x[1, 5000] = x[1, 140000] = 100  # a tie in two chunks: the first wins
    x[2] = -float("inf")  # nothing but -inf: index 0
    x[3, 9000], x[3, 20] = float("nan"), 1000  # a NaN counts as the largest
    x[4, :] = 0
    x[4, 4095] = x[4, 4096] = 1  # a tie across a chunk border
    x[5, -1] = 50  # the very last
    torch.testing.assert_close(argmax(x), x.argmax(-1), rtol=0, atol=0)
    assert argmax(x[:, :7]).tolist() == x[:, :7].argmax(-1).tolist()  # shorter than a chunk
