"""`serve --ray`: replicas of the bundled model behind Ray Serve's proxy on a real Ray cluster on 127.0.0.1, driven
by the official openai client: both replicas answer (each response names its own), a replica killed mid-stream
ends that stream with an OpenAI error (no hang) and the next request succeeds, a restarted replica starts from the
merged hotness, /metrics labels every sample with its replica. The merge and the metrics relabelling are checked
against independent computations without a cluster."""
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

openai = pytest.importorskip("openai")

from prometheus_client import CollectorRegistry, Counter, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dynaexq.serve.replicas import APP, HEADER, HotnessMerge, merge_metrics  # noqa: E402


def test_the_merged_hotness_is_the_routed_token_weighted_mean_seeded_with_one_token():
    merge = HotnessMerge(seed={0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0]})
    merge.push("a", 3, {0: [0.0, 0.5, 0.5], 1: [0.2, 0.2, 0.6]})
    merge.push("b", 0, {0: [9.0, 9.0, 9.0], 1: [9.0, 9.0, 9.0]})  # routed nothing yet: no weight
    merge.push("a", 6, {0: [0.0, 1.0, 0.0], 1: [0.5, 0.5, 0.0]})  # the latest push replaces the earlier one
    got = merge.merged()
    # by hand: (6 * a + 1 * seed) / 7
    assert got["tokens"] == 7 and got["replicas"] == 2
    assert got["hotness"][0] == pytest.approx([1 / 7, 6 / 7, 0.0])
    assert got["hotness"][1] == pytest.approx([3 / 7, 4 / 7, 0.0])
    assert HotnessMerge().merged() is None  # nothing pushed, no seed


def test_merged_metrics_label_every_sample_with_its_replica():
    texts = []
    for replica, n in (("r1", 2), ("r2", 5)):
        reg = CollectorRegistry()
        c = Counter("dynaexq_requests", "HTTP requests", ["endpoint"], registry=reg)
        c.labels("/v1/completions").inc(n)
        texts.append((replica, generate_latest(reg).decode()))
    families = {f.name: f for f in text_string_to_metric_families(merge_metrics(texts).decode())}
    totals = {(s.labels["replica"], s.labels["endpoint"]): s.value for s in families["dynaexq_requests"].samples
              if s.name == "dynaexq_requests_total"}
    assert totals == {("r1", "/v1/completions"): 2.0, ("r2", "/v1/completions"): 5.0}


def test_serve_refuses_zero_replicas_and_replicas_without_ray_before_it_loads_anything():
    cmd = [sys.executable, "-m", "dynaexq.cli", "serve", "--ray", "127.0.0.1:1", "--replicas", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--replicas must be >= 1, got 0" in done.stderr
    done = subprocess.run(cmd[:4] + ["--replicas", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--replicas 2 needs --ray" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def replicas(ray_cluster, bundled_store):
    """Two replicas (1 CPU each, dynaexq at int3's bytes, hotness pushed every 0.3 s) -> (base URL, model id)."""
    pytest.importorskip("ray", reason="the ray extra: pip install 'dynaexq[ray]'")
    import ray
    from ray import serve

    from dynaexq.serve.replicas import application

    ray.init(address=ray_cluster, ignore_reinit_error=True, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(bundled_store, replicas=2, hotness_every_s=0.3, policy="dynaexq", expert_budget="int3",
                          threads=1), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{port}/v1"
    try:
        model = openai.OpenAI(base_url=base, api_key="none").models.list().data[0].id
        yield base, model
    finally:
        serve.delete(APP)
        serve.shutdown()


def _shutdown_serve(address: str) -> None:
    import ray
    from ray import serve
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.shutdown()


def _ask(client, model, prompt):
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    return raw.headers[HEADER], raw.parse()


def _experts(base, replica, deadline=120):
    """/v1/experts of `replica`, asked until the proxy routes it there."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        r = requests.get(f"{base}/experts", timeout=30)
        if r.status_code == 200 and r.headers[HEADER] == replica:
            return r.json()
    raise AssertionError(f"replica {replica} never answered /v1/experts")


@pytest.mark.slow
def test_replicas_answer_stream_fail_over_and_restart_warm(replicas):
    import ray
    from ray import serve

    base, model = replicas
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    prompts = [f"The {w} of the river" for w in ("sound", "colour", "end", "source", "song", "bank", "mouth", "bed")]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: _ask(client, model, p), prompts * 2))
    assert all(a.choices[0].finish_reason in ("length", "stop") and a.usage.completion_tokens > 0 for _, a in answers)
    seen = {replica for replica, _ in answers}
    assert len(seen) == 2, f"one replica answered everything: {seen}"

    # every replica's metrics in one scrape, labelled by replica
    text = requests.get(base.removesuffix("/v1") + "/metrics", timeout=30).text
    fam = {f.name: f for f in text_string_to_metric_families(text)}["dynaexq_completion_tokens"]
    per = {s.labels["replica"]: s.value for s in fam.samples if s.name == "dynaexq_completion_tokens_total"}
    assert set(per) == seen and sum(per.values()) == sum(a.usage.completion_tokens for _, a in answers)

    time.sleep(1.0)  # both replicas pushed their hotness since their last token
    # a stream whose replica dies: an OpenAI error event, no hang
    raw = client.completions.with_raw_response.create(model=model, prompt="Once upon a time", max_tokens=400,
                                                      temperature=0, stream=True)
    victim = raw.headers[HEADER]
    stream = raw.parse()
    first = next(iter(stream))
    assert first.choices[0].text is not None
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#EngineReplica#{victim}", namespace="serve"), no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 60

    # meanwhile new requests succeed (on the survivor, or a retry)
    replica, answer = _ask(client, model, "The sound of the river")
    assert answer.usage.completion_tokens > 0 and replica != victim

    # Serve starts a new replica; it loads the merged hotness as its warm start
    handle = serve.get_deployment_handle("EngineReplica", APP)
    deadline = time.monotonic() + 180
    warm, ids = None, set()
    while warm is None and time.monotonic() < deadline:
        time.sleep(1)
        for res in handle.broadcast("warm_start").results(return_exceptions=True):
            if not isinstance(res, BaseException):
                ids.add(res[0])
                warm = res[1] if res[0] not in seen else warm
    assert warm is not None, f"no new replica came up (replicas now {ids})"
    new = next(i for i in ids if i not in seen)
    assert warm["replicas"] >= 2 and warm["tokens"] > 0
    report = _experts(base, new)
    for layer in report["layers"]:
        got, want = np.array(layer["hotness"]), np.array(warm["hotness"][layer["layer"]])
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert max(max(layer["hotness"]) for layer in report["layers"]) > 0  # not a cold start


@pytest.mark.slow
def test_the_serve_command_runs_replicas_until_interrupted_and_saves_the_merged_hotness(ray_cluster, bundled_store,
                                                                                        tmp_path):
    from dynaexq.runtime.hotness import Hotness
    from dynaexq.store.reader import StoreReader

    port, hot = _free_port(), tmp_path / "hotness.json"
    cmd = [sys.executable, "-m", "dynaexq.cli", "serve", "--model", str(bundled_store), "--ray", ray_cluster,
           "--replicas", "2", "--threads", "1", "--port", str(port), "--policy", "uniform:int4", "--hotness-file",
           str(hot)]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the replicas did not come up"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app not deployed yet
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(4) as pool:
            seen = {r for r, _ in pool.map(lambda p: _ask(client, model, p), [f"Tell me about {n}" for n in range(12)])}
        assert len(seen) == 2
        time.sleep(6)  # the default push interval (5 s) has passed: the merge holds both replicas' traffic
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.returncode != 0:  # the app the CLI deployed would keep the cluster's CPUs from later tests
            _shutdown_serve(ray_cluster)
    reader = StoreReader(bundled_store)
    h = Hotness(reader.layers, reader.num_experts)
    h.load(hot)  # the merged hotness, in --hotness-file's format, for this model
    assert all(float(s.sum()) > 0 for s in h.snapshot().values())
