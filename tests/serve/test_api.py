"""The server through real HTTP on 127.0.0.1: the official openai client, bad requests, auth, disconnects, 429,
metrics. Greedy completions are checked against transformers' own generate on the same prompt."""
import json
import threading
import time

import openai
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

import dynaexq
from dynaexq.config import ServeConfig
from dynaexq.serve.app import create_app
from live import LiveServer

KEY = "sk-test-key"
MODEL = "dxq-moe-mini"


@pytest.fixture(scope="module")
def engine(bundled_store):
    eng = dynaexq.load(bundled_store, policy="uniform:int8", dtype=torch.float32, progress=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(create_app(engine, ServeConfig(api_key=KEY, max_model_len=128, max_body_bytes=64 << 10)))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _greedy(engine, ids, n):
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                eos_token_id=None)
    return engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _metrics(server) -> dict:
    out = {}
    for fam in text_string_to_metric_families(requests.get(server.url + "/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_openai_client_chat_streamed_chat_completion_and_models(engine, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    ids = engine.tokenizer(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]
    reference = _greedy(engine, ids, 16)
    assert chat.choices[0].message.content == reference and chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (len(ids), 16,
                                                                                                 len(ids) + 16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices

    text = client.completions.create(model=MODEL, prompt="The history of the", max_tokens=12, temperature=0)
    prompt_ids = engine.tokenizer("The history of the", add_special_tokens=False)["input_ids"]
    assert text.choices[0].text == _greedy(engine, prompt_ids, 12) and text.usage.prompt_tokens == len(prompt_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=12, temperature=0, stream=True))
    assert streamed == text.choices[0].text  # token-id prompts are the same prompt


def test_sampling_parameters_are_honoured(client):
    def run(top_k=None, **kw):  # top_k is not an OpenAI parameter: the client sends it as an extra field
        extra = {"top_k": top_k} if top_k is not None else None
        return client.completions.create(model=MODEL, prompt="import os\n", max_tokens=24, extra_body=extra,
                                         **kw).choices[0]

    a, b = run(temperature=1.0, top_p=0.9, top_k=40, seed=7), run(temperature=1.0, top_p=0.9, top_k=40, seed=7)
    assert a.text == b.text  # the same seed, the same text
    greedy = run(temperature=0)
    assert run(temperature=1.0, top_k=1, seed=3).text == greedy.text
    stop = greedy.text[5:8]
    cut = run(temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.find(stop)]


BAD = [  # (endpoint, body, status, param or message fragment)
    ("chat/completions", {"model": MODEL}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {"model": 3, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": 9}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "word " * 200}, 400, "prompt"),  # longer than the context (128)
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 500}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD)
def test_bad_requests_get_an_openai_error_body_and_a_4xx(server, endpoint, body, status, param):
    r = requests.post(f"{server.url}/v1/{endpoint}", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param or param in err["message"]


def test_malformed_bodies_keys_and_routes_get_openai_errors(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [requests.post(f"{server.url}/v1/completions", data="{not json", headers=auth),
             requests.post(f"{server.url}/v1/completions", data="x" * (65 << 10), headers=auth),
             requests.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}),
             requests.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"},
                           headers={"Authorization": "Bearer wrong"}),
             requests.get(f"{server.url}/v1/models", headers={"Authorization": "Basic abc"}),
             requests.get(f"{server.url}/v1/nothing-here", headers=auth)]
    assert [r.status_code for r in cases] == [400, 413, 401, 401, 401, 404]
    for r in cases:
        assert r.json()["error"]["message"], r.text
    assert "JSON" in cases[0].json()["error"]["message"]
    assert cases[3].json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed for the probe


def test_a_client_that_disconnects_frees_its_batch_slot(server):
    sched = server.app.state.server.scheduler
    seqs, submit = [], sched.submit
    sched.submit = lambda *a, **k: seqs.append(submit(*a, **k)) or seqs[-1]
    try:
        with requests.post(f"{server.url}/v1/completions", stream=True, headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 120, "stream": True,
                                 "temperature": 0}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith(b"data: {")
    finally:
        sched.submit = submit
    deadline = time.monotonic() + 10
    while sched.load() != (0, 0):
        assert time.monotonic() < deadline, sched.load()
        time.sleep(0.01)
    assert seqs[0].finish_reason == "cancelled" and len(seqs[0].out) < 120


def test_a_full_queue_answers_429_with_a_clear_message(engine, live_server, monkeypatch):
    live = live_server(create_app(engine, ServeConfig(max_batch=1, max_queue=0, max_model_len=128)))
    decoder, answered = live.app.state.server.scheduler.decoder, threading.Event()
    real_decode = decoder._decode
    monkeypatch.setattr(decoder, "_decode", lambda: answered.wait(30) and real_decode())  # the first cannot end
    body = {"model": MODEL, "prompt": "class A:", "max_tokens": 100, "stream": True, "temperature": 0}
    with requests.post(f"{live.url}/v1/completions", json=body, stream=True) as first:
        assert first.status_code == 200
        next(line for line in first.iter_lines() if line)  # it is running: the one slot is taken
        second = requests.post(f"{live.url}/v1/completions", json=body)
        answered.set()
    assert second.status_code == 429 and "capacity" in second.json()["error"]["message"]


def test_metrics_count_requests_tokens_latencies_and_experts(engine, server, client):
    before = _metrics(server)
    r = client.completions.create(model=MODEL, prompt="for i in range(10):", max_tokens=10, temperature=0)
    requests.post(f"{server.url}/v1/completions", json={"model": MODEL}, headers={"Authorization": f"Bearer {KEY}"})
    after = _metrics(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("dynaexq_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("dynaexq_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("dynaexq_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("dynaexq_completion_tokens_total") == 10
    assert delta("dynaexq_time_to_first_token_seconds_count") == 1
    assert delta("dynaexq_time_per_output_token_seconds_count") == 9
    assert delta("dynaexq_batch_size_count") >= 9
    assert after[("dynaexq_experts", (("precision", "int8"),))] == 6 * 32
    assert after[("dynaexq_expert_bytes", (("kind", "expert_bytes"),))] == engine.expert_bytes()


def test_experts_report_is_the_published_map_and_the_served_hotness(engine, server):
    rep = requests.get(f"{server.url}/v1/experts", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert rep["counts"] == {"int8": 192} and rep["dynamic"] is False and rep["num_experts"] == 32
    for layer in rep["layers"]:
        assert layer["precision"] == [v.precision.value for v in engine.banks[layer["layer"]].versions]
        assert all(h >= 0 for h in layer["hotness"]) and 0 < sum(layer["hotness"]) <= 1 + 1e-4  # mass per token
    assert rep["budget"]["expert_bytes"] == engine.expert_bytes()
    schema = requests.get(f"{server.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/experts", "/health"} <= set(schema["paths"])
    assert json.dumps(schema).count('"422"') == 0  # our 400s are what is documented


def test_a_failing_step_fails_its_requests_with_a_server_error_and_the_server_goes_on(server, client, monkeypatch):
    decoder = server.app.state.server.scheduler.decoder
    real, calls = decoder._prefill_chunk, []

    def broken(seq):
        calls.append(seq)
        if len(calls) == 1:
            raise RuntimeError("injected kernel failure")
        return real(seq)

    monkeypatch.setattr(decoder, "_prefill_chunk", broken)
    r = requests.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "x = 1", "max_tokens": 4})
    assert r.status_code == 500 and "injected kernel failure" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    again = client.completions.create(model=MODEL, prompt="x = 1", max_tokens=4, temperature=0)
    assert again.usage.completion_tokens == 4
