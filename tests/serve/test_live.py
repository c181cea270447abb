"""`dynaexq serve` as a user starts it (a subprocess, the dynaexq runtime policy), under load, and its dashboard in
headless Chromium. The load: 16 concurrent streaming clients for 30 s whose prompts move from code to dictionary
text halfway, so the hot experts change while requests stream."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest
import requests
from PIL import Image

from dynaexq.demo import BUNDLED

pytestmark = pytest.mark.slow  # a 30-s soak and a browser: CI runs them after `make test` (.ci/run)

CLIENTS, SECONDS = 16, 30
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1100,1000", "--virtual-time-budget=4000"]


def _snippets(domain: str, n: int = 24) -> list[str]:
    text = (BUNDLED / "eval" / f"{domain}.txt").read_text()
    starts = range(0, len(text) - 400, (len(text) - 400) // n)
    return [text[s:s + 240] for s in starts][:n]


def launch(args, log):
    """`dynaexq serve ARGS` on a free port of 127.0.0.1, output to `log` -> (url, process) once /health answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "dynaexq.cli", "serve", *map(str, args), "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return url, proc
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)


def run_threads(client, monitor, clients: int, seconds: float) -> None:
    """`clients` threads of client(i) and one of monitor(), joined."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=monitor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 180)


def soak(url, proc, prompts_at, clients: int, seconds: float, max_tokens: tuple) -> dict:
    """`clients` streaming clients (the official openai client) for `seconds`, each drawing prompts from
    prompts_at(seconds elapsed), and a monitor polling /v1/experts and the server's RSS -> {"done", "started",
    "errors", "polls", "rss" {"warm", "end"}, "end": the last /v1/experts}."""
    t0 = time.monotonic()
    errors, done, started, polls, rss = [], [0], [0], [], {}
    lock = threading.Lock()

    def client(i):
        rng = random.Random(i)
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        while time.monotonic() - t0 < seconds:
            prompts = prompts_at(time.monotonic() - t0)
            with lock:
                started[0] += 1
            try:
                finish = None
                for chunk in api.completions.create(model="dxq-moe-mini", prompt=rng.choice(prompts), stream=True,
                                                    max_tokens=rng.randint(*max_tokens), temperature=0.8,
                                                    seed=rng.randint(0, 1 << 30)):
                    finish = chunk.choices[0].finish_reason or finish
                assert finish in ("stop", "length"), finish
                with lock:
                    done[0] += 1
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(repr(err))

    def monitor():
        while time.monotonic() - t0 < seconds + 5:
            polls.append(requests.get(url + "/v1/experts").json())
            if "warm" not in rss and time.monotonic() - t0 > 0.3 * seconds:
                rss["warm"] = psutil.Process(proc.pid).memory_info().rss
            time.sleep(0.5)

    run_threads(client, monitor, clients, seconds)
    rss["end"] = psutil.Process(proc.pid).memory_info().rss
    return {"done": done[0], "started": started[0], "errors": errors, "polls": polls, "rss": rss,
            "end": requests.get(url + "/v1/experts").json()}


@pytest.fixture(scope="module")
def served(bundled_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    log, hot = work / "serve.log", work / "hotness.json"
    url, proc = launch(["--model", bundled_store, "--policy", "dynaexq", "--expert-budget", "int3", "--update-every",
                        "16", "--max-batch", "16", "--max-model-len", "320", "--hotness-file", hot], log)
    yield url, proc, log
    proc.terminate()  # uvicorn shuts down gracefully, then exits by the same signal
    assert proc.wait(timeout=60) in (0, -15), log.read_text()[-3000:]
    assert json.loads(hot.read_text())["steps"] > 0  # the shutdown closed the engine: the runtime saved its hotness


def test_sixteen_streaming_clients_for_30s_all_complete_within_budget_while_precisions_switch(served):
    url, proc, _ = served
    code, words = _snippets("code"), _snippets("dict")
    start = requests.get(url + "/v1/experts").json()
    r = soak(url, proc, lambda elapsed: code if elapsed < SECONDS / 2 else words,  # the workload shifts halfway
             CLIENTS, SECONDS, (16, 48))
    errors, done, started, polls, rss, end = r["errors"], r["done"], r["started"], r["polls"], r["rss"], r["end"]
    print(f"\n{done} streams, rss {rss['warm'] >> 20} -> {rss['end'] >> 20} MiB, transitions "
          f"{end['transitions']}, peak {end['budget']['peak_used']} of {end['budget']['cap']}")
    assert errors == [] and done == started and done >= CLIENTS, (errors[:5], done, started)
    assert rss["end"] - rss["warm"] < 128 << 20, rss  # no growth with the number of requests served
    for rep in polls + [end]:
        b = rep["budget"]
        assert b["expert_bytes"] <= b["cap"] and b["peak_used"] <= b["cap"], b
    moved = {k: end["transitions"][k] - start["transitions"][k] for k in ("pairs", "promotions", "demotions")}
    assert moved["promotions"] > 0 and moved["demotions"] > 0, moved  # the served traffic moved the hot set
    assert any(p["transitions"]["pairs"] > start["transitions"]["pairs"] for p in polls[:len(polls) // 2 + 2])
    metrics = requests.get(url + "/metrics").text
    assert 'dynaexq_requests_total{endpoint="/v1/completions",status="200"}' in metrics


def _chromium(*args, timeout=90):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian chromium is not installed (make test installs it: apt-get install chromium)"
    return subprocess.run([exe, *CHROMIUM_FLAGS, *args], capture_output=True, timeout=timeout,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})


def test_dashboard_renders_the_heatmap_and_its_numbers_match_the_experts_report(served, tmp_path):
    url, _, _ = served
    for _ in range(100):  # let transitions from the load test finish: the map is then still
        rep = requests.get(url + "/v1/experts").json()
        if rep["transitions"]["in_flight"] == 0 and rep["transitions"]["pending"] == 0:
            break
        time.sleep(0.1)
    shot = tmp_path / "dashboard.png"
    dom = _chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url + "/dashboard").stdout.decode()
    _chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}", url + "/dashboard")
    rep = requests.get(url + "/v1/experts").json()

    from html.parser import HTMLParser

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.attrs, self.cells, self.layer, self.prec = {}, {}, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "id" in a:
                self.attrs[a["id"]] = a
            if tag == "tr" and "data-layer" in a:
                self.layer = int(a["data-layer"])
            self.prec = a.get("data-precision") if tag == "td" else None

        def handle_data(self, data):
            if self.prec is not None and self.layer is not None:
                self.cells[(self.layer, self.prec)] = int(data)
                self.prec = None

    page = Parse()
    page.feed(dom)
    assert int(page.attrs["expert-bytes"]["data-value"]) == rep["budget"]["expert_bytes"], dom[:2000]
    assert int(page.attrs["cap"]["data-value"]) == rep["budget"]["cap"]
    t = rep["transitions"]
    assert int(page.attrs["switches"]["data-value"]) == t["promotions"] + t["demotions"]
    expected = {(layer["layer"], p): layer["precision"].count(p) for layer in rep["layers"] for p in rep["precisions"]}
    assert page.cells == expected and len(set(rep["precisions"])) >= 2
    left, top, width, height = map(int, page.attrs["heatmap"]["data-rect"].split(","))
    img = Image.open(shot).convert("RGB").crop((left, top, left + width, top + height))
    colours = img.getcolors(maxcolors=1 << 20)
    non_white = sum(n for n, c in colours if sum(c) < 3 * 245)
    assert non_white > 0.5 * width * height and len(colours) > 8, (non_white, len(colours))
