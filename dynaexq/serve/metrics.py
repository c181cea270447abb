"""What the server reports: the expert map (`experts_report`, GET /v1/experts) and Prometheus metrics (GET /metrics).

Request metrics are recorded as they happen (the scheduler thread records token timings; prometheus-client is
thread-safe). Expert and runtime metrics are read from `experts_report` at scrape time by a custom collector, so
/metrics and /v1/experts can never disagree. Every app has its own registry (several apps in one process).
For static policies there is no controller; the server keeps the same hotness EMA from the served traffic so the
dashboard shows where tokens go whatever the policy.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dynaexq.quant.precision import Precision

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


def experts_report(engine, hotness, model: str, started: float) -> dict:
    """Per layer x expert: hotness and published precision (and the controller's target); budget use and
    transition counters. `hotness`: the server's own tracker for static policies (None with a runtime)."""
    rt = engine.runtime
    stats = rt.stats() if rt is not None else None
    published = {layer: [v.precision.value if v is not None else "none" for v in bank.versions]
                 for layer, bank in engine.banks.items()}
    heat = stats["hotness"] if stats else {layer: s.tolist() for layer, s in hotness.snapshot().items()}
    held = [p for lst in published.values() for p in lst]
    order = sorted({p for p in held if p != "none"}, key=lambda p: -Precision(p).bits)
    layers = [{"layer": layer, "hotness": [round(float(x), 6) for x in heat[layer]], "precision": published[layer],
               "target": stats["target"][layer] if stats else None} for layer in sorted(published)]
    if stats:
        budget = {"expert_bytes": stats["bytes"]["experts"], "cap": stats["bytes"]["cap"],
                  "peak_used": stats["bytes"]["peak_used"], "staging_bytes": stats["bytes"]["staging"],
                  "total_budget": rt.plan.total}
        moves = {k: v for k, v in stats["transitions"].items() if k != "errors"}
    else:
        used = engine.expert_bytes()
        budget = {"expert_bytes": used, "cap": used, "peak_used": used, "staging_bytes": 0, "total_budget": None}
        moves = {"pairs": 0, "promotions": 0, "demotions": 0, "deferrals": 0, "failures": 0, "bytes_moved": 0,
                 "in_flight": 0, "pending": 0}
    off = stats.get("offload") if stats else None
    offload = None if off is None else {  # the offload regime: what the cache holds and how it is doing
        "resident": off["resident"], "offloaded": len(layers) * len(next(iter(published.values()))) - off["resident"],
        "resident_by_precision": off["resident_by_precision"], "hits": off.get("hits", 0),
        "misses": off.get("misses", 0), "hit_rate": off["hit_rate"], "prefetches": off.get("prefetches_done", 0),
        "prefetch_hits": off.get("prefetch_hits", 0), "evictions": off.get("evictions", 0),
        "upgrades": off.get("promotions", 0), "stall_s": off.get("stall_s", 0.0), "read_bytes": off["io"]["bytes"],
        "read_s": off["io"]["seconds"], "io_mode": off["io"]["mode"], "mean_recall": off["mean_recall"]}
    return {"model": model, "policy": engine.policy if rt is None else stats["policy"], "dynamic": rt is not None,
            "offload": offload,
            "num_experts": len(next(iter(published.values()))), "precisions": order,
            "counts": {p: held.count(p) for p in order}, "layers": layers, "budget": budget, "transitions": moves,
            "forward_wait_s": stats["forward_wait_s"] if stats else 0.0, "uptime_s": time.monotonic() - started}


class _ExpertCollector:
    def __init__(self, report, engine, scheduler):
        self.report, self.engine, self.scheduler = report, engine, scheduler

    def collect(self):
        r = self.report()
        counts = GaugeMetricFamily("dynaexq_experts", "experts published per precision", labels=["precision"])
        nbytes = GaugeMetricFamily("dynaexq_expert_bytes", "expert weight bytes by kind", labels=["kind"])
        for p, n in r["counts"].items():
            counts.add_metric([p], n)
        for kind, v in r["budget"].items():
            if v is not None:
                nbytes.add_metric([kind], v)
        yield counts
        yield nbytes
        for key in ("promotions", "demotions", "deferrals", "failures", "bytes_moved", "pairs"):
            c = CounterMetricFamily(f"dynaexq_transition_{key}", f"precision transitions: {key.replace('_', ' ')}")
            c.add_metric([], r["transitions"].get(key, 0))
            yield c
        wait = CounterMetricFamily("dynaexq_forward_wait_seconds", "time forward passes waited on transitions")
        wait.add_metric([], r["forward_wait_s"])
        yield wait
        off = r["offload"]
        if off is not None:
            state = GaugeMetricFamily("dynaexq_offload_experts", "offload regime: experts resident / not resident",
                                      labels=["state"])
            state.add_metric(["resident"], off["resident"])
            state.add_metric(["offloaded"], off["offloaded"])
            yield state
            for key, what in (("hits", "routed experts found resident"), ("misses", "routed experts fetched on demand"),
                              ("prefetches", "experts fetched by the look-ahead"),
                              ("prefetch_hits", "prefetched experts then routed to"),
                              ("evictions", "resident versions evicted"), ("upgrades", "background upgrades"),
                              ("stall_s", "seconds forward passes waited for misses"),
                              ("read_bytes", "bytes read from the store")):
                c = CounterMetricFamily(f"dynaexq_offload_{key.replace('_s', '_seconds')}", f"offload: {what}")
                c.add_metric([], off[key])
                yield c
        rt = self.engine.runtime
        if rt is not None:
            pools = GaugeMetricFamily("dynaexq_pool_slots", "slots per pool", labels=["pool", "state"])
            for name, p in rt.pools.occupancy().items():
                pools.add_metric([name, "used"], p["used"])
                pools.add_metric([name, "total"], p["slots"])
            yield pools
        running, waiting = self.scheduler.load()
        load = GaugeMetricFamily("dynaexq_sequences", "sequences in the scheduler", labels=["state"])
        load.add_metric(["running"], running)
        load.add_metric(["waiting"], waiting)
        yield load
        errors = CounterMetricFamily("dynaexq_scheduler_errors", "failures caught in the scheduler loop, by where "
                                     "(step: its sequences failed; after_step, on_step: no request failed; callback, "
                                     "add: one request failed)", labels=["where"])
        caught = self.scheduler.errors + self.engine.errors  # the controller's failures are the engine's
        for where in ("step", "after_step", "on_step", "callback", "add"):
            errors.add_metric([where], caught[where])
        yield errors


class Metrics:
    def __init__(self, server):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dynaexq_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dynaexq_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("dynaexq_completion_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("dynaexq_time_to_first_token_seconds", "request admitted -> first token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("dynaexq_time_per_output_token_seconds", "gap between a stream's successive tokens",
                              buckets=_LATENCY, registry=r)
        self.batch = Histogram("dynaexq_batch_size", "sequences decoded per step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.step = Histogram("dynaexq_step_seconds", "scheduler step time", buckets=_LATENCY, registry=r)
        Gauge("dynaexq_max_batch", "sequences decoded together at most (--max-batch)",
              registry=r).set(server.scheduler.max_batch)
        r.register(_ExpertCollector(server.report, server.engine, server.scheduler))
