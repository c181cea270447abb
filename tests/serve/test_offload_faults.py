"""Read faults in the offload regime, through real HTTP: an expert that cannot be read fails only the streams whose
tokens were routed to it (an OpenAI-shaped error event naming the expert); every other stream of the same batch
decodes on and gets exactly the text it gets with no fault; no cache slot leaks; the server stays healthy."""
import json
import threading

import requests
import torch

import dynaexq
from dynaexq.config import ServeConfig
from dynaexq.quant.precision import Precision
from dynaexq.runtime.version import slot_layout
from dynaexq.serve.app import create_app
from live import LiveServer

MODEL = "dxq-moe-mini"
PROMPTS = ["def fibonacci(n):", "The history of the", "apple (noun): a"]
TOKENS = 40


def _stream(url, prompt, out, i):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as r:
        out[i] = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]


def test_an_unreadable_expert_fails_only_the_streams_routed_to_it(bundled_store):
    probe = dynaexq.load(bundled_store, policy="uniform:int4", dtype=torch.float32, progress=False)
    slot = slot_layout(probe.make_version(probe.reader.layers[0], 0, Precision.INT4))[1]
    clean = [probe.generate(p, TOKENS) for p in PROMPTS]  # greedy text with every expert readable
    probe.close()
    # 12 int4 slots per layer (below every expert at int2): a decode step of 3 rows (<= 12 experts a layer) is one wave
    engine = dynaexq.load(bundled_store, policy="lru-offload:int4", expert_budget=6 * 12 * slot,
                          dtype=torch.float32, progress=False)
    cache = engine.runtime.residency
    assert engine.runtime.regime == "offload"
    armed, expected, real = threading.Event(), {}, cache.io.read
    decoder_rows = []

    def read(layer, e, p):
        if armed.is_set():
            raise OSError(f"injected: sector unreadable under expert {e}")
        return real(layer, e, p)
    cache.io.read = read

    def pre(module, args):  # the first decode step where some rows' experts are all resident and others' are not
        _, idx, _ = args
        if expected or not decoder_rows or idx.shape[0] < 2:  # decode steps of 2 or more rows only
            return
        resident = {e for (layer, e) in cache.resident() if layer == module.layer}
        missing = [bool(set(row) - resident) for row in idx.tolist()]
        if any(missing) and not all(missing):
            expected.update(layer=module.layer, rows=[s for s, m in zip(decoder_rows[0], missing) if m],
                            kept=[s for s, m in zip(decoder_rows[0], missing) if not m])
            armed.set()

    hooks = [h for bank in engine.banks.values() for h in (
        bank.register_forward_pre_hook(pre), bank.register_forward_hook(lambda *_: armed.clear()))]
    live = LiveServer(create_app(engine, ServeConfig(max_batch=3)))
    decoder = live.app.state.server.scheduler.decoder
    real_decode = decoder._decode

    def decode():
        decoder_rows[:] = [[s.prompt for s in decoder.rows]]
        try:
            return real_decode()
        finally:
            decoder_rows.clear()
    decoder._decode = decode
    try:
        out = {}
        threads = [threading.Thread(target=_stream, args=(live.url, p, out, i)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert expected, "no decode step mixed resident and missing experts (the fault was never injected)"
        ids = {tuple(engine.tokenizer(p, add_special_tokens=False)["input_ids"]): i for i, p in enumerate(PROMPTS)}
        failed = {ids[tuple(p)] for p in expected["rows"]}
        kept = {ids[tuple(p)] for p in expected["kept"]}
        for i, events in out.items():
            if i in failed:
                err = events[-1]["error"]
                assert err["type"] == "server_error" and f"of layer {expected['layer']} could not be read" in err["message"] and \
                    "injected" in err["message"], err
            else:
                text = "".join(e["choices"][0]["text"] for e in events if "choices" in e)
                assert events[-1]["choices"][0]["finish_reason"] == "length", events[-2:]
                assert text == clean[i], (i, text, clean[i])
        assert kept and failed and len(out) == len(PROMPTS)
        assert requests.get(live.url + "/health", timeout=10).json()["status"] == "ok"
        again = requests.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0],
                                                                  "max_tokens": TOKENS, "temperature": 0}, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == clean[0]
        cache.drain()
        engine.runtime.check(quiescent=True)  # no slot stranded by the failed reads
    finally:
        for h in hooks:
            h.remove()
        live.close()
