"""What a client sends can neither hang nor 500 the server, a failing step fails exactly its requests, and slow
report endpoints stay off the event loop (a real uvicorn server on 127.0.0.1)."""
import statistics
import threading
import time

import pytest
import requests
import torch

import dynaexq
from dynaexq.config import ServeConfig
from dynaexq.serve.app import create_app
from live import LiveServer

MODEL = "dxq-moe-mini"
# the shape of Mixtral's real template: it raises on role orders it rejects (as Qwen3's does on no user turn)
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def engine(bundled_store):
    eng = dynaexq.load(bundled_store, policy="uniform:int4", dtype=torch.float32, progress=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(create_app(engine, ServeConfig(max_model_len=256)))
    yield live
    live.close()


def post(server, endpoint, body=None, data=None, timeout=60, **kw):
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{server.url}/v1/{endpoint}", json=body, data=data, headers=headers, timeout=timeout, **kw)


def test_a_request_whose_prefill_completes_in_a_failing_decode_step_gets_a_500(server, monkeypatch):
    decoder = server.app.state.server.scheduler.decoder
    real_prefill, real_decode = decoder._prefill_chunk, decoder._decode
    armed = {"on": False, "prefilled": False}

    def prefill(seq):
        done = real_prefill(seq)
        armed["prefilled"] = done and armed["on"]
        return done

    def decode():
        if armed.pop("prefilled", False):
            armed["on"] = False
            raise RuntimeError("injected decode failure")
        armed["prefilled"] = False
        return real_decode()

    monkeypatch.setattr(decoder, "_prefill_chunk", prefill)
    monkeypatch.setattr(decoder, "_decode", decode)
    monkeypatch.setattr(server.app.state.server.scheduler, "stop_ids", {False: set(), True: set()})  # A runs on
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 200, "temperature": 0, "stream": True}
    with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=60) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: {")  # A is decoding
        armed["on"] = True
        late = post(server, "completions", {"model": MODEL, "prompt": "x = 1", "max_tokens": 4}, timeout=30)
        rest = b"\n".join(lines)
    assert late.status_code == 500 and "injected decode failure" in late.json()["error"]["message"], late.text
    assert b"injected decode failure" in rest and rest.strip().endswith(b"data: [DONE]")
    deadline = time.monotonic() + 10
    while server.app.state.server.scheduler.load() != (0, 0):  # nothing left behind: no row, no queued sequence
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert decoder.prefilling is None and not any(decoder.kv.lens)


def test_client_input_is_never_a_server_error(server, engine, monkeypatch):
    user = [{"role": "user", "content": "hi"}]
    cases = {
        "seed too large": post(server, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                       "seed": 2**70}),
        "seed too small": post(server, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                       "seed": -2**70}),
        "lone surrogate": post(server, "completions", data=b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}'
                               % MODEL.encode()),
        "not UTF-8": post(server, "completions", data=b'{"model": "%s", "prompt": "\xff\xfe", "max_tokens": 2}'
                          % MODEL.encode()),
        "deep nesting": post(server, "completions", data=b'{"model": "x", "prompt": ' + b"[" * 50_000
                             + b"]" * 50_000 + b"}"),
        "surrogate in chat": post(server, "chat/completions", data=b'{"model": "%s", "messages": [{"role": "user", '
                                  b'"content": "\\udfff"}], "max_tokens": 2}' % MODEL.encode()),
    }
    monkeypatch.setattr(engine.tokenizer, "chat_template", STRICT_TEMPLATE)
    cases["template raises"] = post(server, "chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "assistant", "content": "I start"}, *user]})
    for name, r in cases.items():
        assert r.status_code == 400, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", name
    assert "alternate" in cases["template raises"].json()["error"]["message"]
    ok = {"control characters": post(server, "completions", {"model": MODEL, "prompt": "a\x00\x07\x1b[0m\u202eb",
                                                             "max_tokens": 2}),
          "seed at int64 bounds": post(server, "completions", {"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                               "seed": -2**63, "temperature": 1}),
          "template accepts": post(server, "chat/completions", {"model": MODEL, "messages": user, "max_tokens": 2})}
    for name, r in ok.items():
        assert r.status_code == 200, (name, r.text)


def test_report_endpoints_run_off_the_event_loop(server, monkeypatch):
    srv, threads = server.app.state.server, set()
    real = srv.report
    monkeypatch.setattr(srv, "report", lambda: threads.add(threading.current_thread().name) or real())
    assert requests.get(f"{server.url}/metrics", timeout=30).ok and requests.get(f"{server.url}/v1/experts").ok
    assert threads and server.thread.name not in threads, threads  # the event loop's thread ran neither


@pytest.mark.slow  # a latency figure under contention; the property it rests on is the test above
def test_a_slow_metrics_scrape_never_stalls_token_streaming(server, monkeypatch):
    srv = server.app.state.server
    real, loop_threads = srv.report, set()

    def slow_report():  # a scrape that takes a second (a device sync under a big runtime, say)
        loop_threads.add(threading.current_thread().name)
        time.sleep(1.0)
        return real()

    monkeypatch.setattr(srv, "report", slow_report)
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            requests.get(f"{server.url}/metrics", timeout=30)
            requests.get(f"{server.url}/v1/experts", timeout=30)

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for t in scrapers:
        t.start()
    try:
        time.sleep(0.3)
        arrivals = []
        body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 40, "temperature": 0, "stream": True}
        with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic())
    finally:
        stop.set()
        for t in scrapers:
            t.join()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(gaps) >= 30 and loop_threads, (len(gaps), loop_threads)
    # on the loop, chunks pile up behind each 1 s scrape (gaps of ~1 s); off it, they arrive at the decode rate
    assert max(gaps) < 0.6, (max(gaps), statistics.median(gaps))
    assert server.thread.name not in loop_threads  # the event loop's thread never ran the report


def test_the_cli_and_the_server_sample_the_same_text_for_the_same_seed(server, bundled_store, capsys):
    from dynaexq.cli import main

    prompt, params = "def parse(line):", {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 1234}
    r = post(server, "completions", {"model": MODEL, "prompt": prompt, "max_tokens": 24, **params})
    served = r.json()["choices"][0]["text"]
    code = main(["generate", "--model", str(bundled_store), "--policy", "uniform:int4", "--dtype", "float32",
                 "--max-new-tokens", "24", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40", "--seed", "1234",
                 prompt])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == prompt + served + "\n" and len(served) > 10, (out, served)


def _stream(server, prompt="def f(x):", max_tokens=40):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=60)


def _events(lines) -> list:
    import json
    return [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]


def test_a_failing_controller_step_fails_no_request_and_the_scheduler_goes_on(server, engine, monkeypatch):
    calls = {"n": 0}
    real = engine.after_step

    def after_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected controller failure")
        return real()

    monkeypatch.setattr(engine, "after_step", after_step)
    with _stream(server) as running:
        events = _events(running.iter_lines())
    assert calls["n"] > 3 and events[-1]["choices"][0]["finish_reason"] == "length", events[-3:]
    later = post(server, "completions", {"model": MODEL, "prompt": "x = 1", "max_tokens": 4}, timeout=30)
    assert later.status_code == 200, later.text
    assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    assert 'dynaexq_scheduler_errors_total{where="after_step"} 1.0' in requests.get(f"{server.url}/metrics").text


def test_a_client_callback_that_raises_fails_only_its_own_request(server, monkeypatch):
    srv = server.app.state.server
    real_submit = srv.scheduler.submit

    def submit(prompt_ids, params, on_event, chat=False):
        if params.max_tokens == 7:  # the doomed request's callback raises at its first event
            def on_event(seq, delta):
                raise RuntimeError("injected callback failure")
        return real_submit(prompt_ids, params, on_event, chat)

    monkeypatch.setattr(srv.scheduler, "submit", submit)
    with _stream(server, max_tokens=30) as running:
        lines = running.iter_lines()
        first = next(line for line in lines if line)
        doomed = {}
        t = threading.Thread(target=lambda: doomed.update(r=post(
            server, "completions", {"model": MODEL, "prompt": "y", "max_tokens": 7}, timeout=30)))
        t.start()
        events = _events([first, *lines])
        t.join(30)
    assert events[-1]["choices"][0]["finish_reason"] == "length", events[-3:]
    # its callback could not reach its handler: the handler notices its sequence ended and answers the error
    assert doomed["r"].status_code == 500 and "callback failed" in doomed["r"].json()["error"]["message"]
    deadline = time.monotonic() + 10
    while srv.scheduler.load() != (0, 0):  # the doomed one is not left behind either
        assert time.monotonic() < deadline, srv.scheduler.load()
        time.sleep(0.01)


def test_if_the_scheduler_thread_dies_requests_get_503_and_health_is_unhealthy(engine):
    """A fresh server (its scheduler is killed): the stream in flight ends with an error event, queued and new
    requests get 503, /health answers 503 unhealthy."""
    live = LiveServer(create_app(engine, ServeConfig(max_model_len=256, max_batch=1)))
    try:
        sched = live.app.state.server.scheduler
        real = engine.after_step
        armed = threading.Event()

        def after_step():
            if armed.is_set():
                raise SystemExit("injected: the thread is gone")  # not an Exception: the guard lets it through
            return real()

        engine.after_step = after_step  # the engine's step calls it (removed again below)
        with _stream(live, max_tokens=60) as running:
            lines = running.iter_lines()
            first = next(line for line in lines if line)
            queued = {}
            t = threading.Thread(target=lambda: queued.update(r=post(live, "completions", {
                "model": MODEL, "prompt": "y", "max_tokens": 4}, timeout=30)))
            t.start()
            deadline = time.monotonic() + 10
            while sched.load()[1] == 0:  # the second request waits behind the first (max batch 1)
                assert time.monotonic() < deadline
                time.sleep(0.005)
            armed.set()
            rest = b"\n".join([first, *lines])
            t.join(30)
        assert b'"error"' in rest and b"scheduler" in rest and rest.strip().endswith(b"data: [DONE]"), rest[-500:]
        assert queued["r"].status_code == 503, queued["r"].text
        assert queued["r"].json()["error"]["type"] == "server_error"
        new = post(live, "completions", {"model": MODEL, "prompt": "z", "max_tokens": 4}, timeout=30)
        assert new.status_code == 503 and "scheduler" in new.json()["error"]["message"], new.text
        health = requests.get(f"{live.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy", health.text
    finally:
        engine.__dict__.pop("after_step", None)
        live.close()
