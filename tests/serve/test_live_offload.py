"""`dynaexq serve` in the offload regime (an expert budget below every expert at int2: most experts are read from the
store on demand): 16 streaming clients for 20 s complete with no error, the budget is never exceeded, RSS stays
flat, and /metrics and the dashboard show the cache (resident / offloaded experts, hits, misses, prefetches)."""
import pytest
import requests

from test_live import _chromium, _snippets, launch, soak

pytestmark = pytest.mark.slow

CLIENTS, SECONDS = 16, 20


@pytest.fixture(scope="module")
def served(bundled_store, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-offload") / "serve.log"
    url, proc = launch(["--model", bundled_store, "--policy", "dynaexq", "--expert-budget", "2MiB",
                        "--update-every-tokens", "32", "--max-batch", "16", "--max-model-len", "320"], log)
    assert "regime: offload" in log.read_text()
    yield url, proc
    proc.terminate()
    assert proc.wait(timeout=60) in (0, -15), log.read_text()[-3000:]


def test_sixteen_clients_under_an_offload_budget_complete_within_budget_with_flat_rss(served):
    url, proc = served
    prompts = _snippets("code") + _snippets("dict")
    r = soak(url, proc, lambda elapsed: prompts, CLIENTS, SECONDS, (16, 40))
    errors, done, polls, rss, end = r["errors"], r["done"], r["polls"], r["rss"], r["end"]
    off = end["offload"]
    print(f"\n{done} streams, rss {rss['warm'] >> 20} -> {rss['end'] >> 20} MiB, offload {off}")
    assert errors == [] and done >= CLIENTS, (errors[:5], done)
    assert rss["end"] - rss["warm"] < 128 << 20, rss
    for rep in polls + [end]:
        b = rep["budget"]
        assert b["expert_bytes"] <= b["cap"] and b["peak_used"] <= b["cap"], b
        assert rep["offload"]["resident"] + rep["offload"]["offloaded"] == 6 * 32
    assert off["misses"] > 0 and off["hits"] > 0 and off["offloaded"] > 0 and off["read_bytes"] > 0
    metrics = requests.get(url + "/metrics").text
    for name in ("dynaexq_offload_experts{state=\"resident\"}", "dynaexq_offload_hits_total",
                 "dynaexq_offload_misses_total", "dynaexq_offload_prefetches_total", "dynaexq_offload_read_bytes_total"):
        assert name in metrics, name


def test_the_dashboard_shows_the_offload_cache(served, tmp_path):
    url, _ = served
    dom = _chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url + "/dashboard").stdout.decode()
    off = requests.get(url + "/v1/experts").json()["offload"]  # no traffic now: the numbers are still
    for key in ("resident", "offloaded", "hits", "misses", "prefetches"):
        assert f'id="{key}" data-value="{off[key]}"' in dom, (key, off[key], dom[:3000])
    assert '<div id="offload" class="stats">' in dom  # shown (hidden only without an offload regime)
