"""Serving replicas on Ray Serve: `dynaexq serve --ray [ADDRESS] --replicas N`, or `application(...)` in a user's
own Serve app (`serve.run(application(model, replicas=2, policy="dynaexq", expert_budget="int3"))`).

One Serve application of three deployments:
  Proxy          the ingress (one replica, no CPU). Each HTTP request goes to one EngineReplica as a streaming
                 handle call: status and headers first, then the body as the app makes it (an SSE stream stays a
                 stream), with `x-dynaexq-replica: <replica id>` added. A replica that fails before its response
                 starts (it died, or is being replaced): the request goes to another one, up to RETRIES times,
                 then 503 in OpenAI's error shape. One that dies after an SSE stream started: the stream ends with
                 an OpenAI error event and `data: [DONE]` (the openai client raises APIError), never a hang; a JSON
                 body cut short ends the connection. GET /metrics gathers every replica's metrics (a broadcast),
                 each sample labelled replica="<id>".
  EngineReplica  N replicas of `threads` CPUs each: its own engine at its own byte budget, and the dynaexq app of
                 serve/app.py called in process through ASGI (the same routes, errors and limits as `dynaexq
                 serve`). Every `hotness_every_s` it sends its hotness and routed tokens to HotnessMerge; Serve
                 restarts a replica that dies or whose scheduler stopped (`check_health`).
  HotnessMerge   one replica, no CPU: the latest hotness of every replica that ever ran; `merged()` is their mean
                 weighted by routed tokens (a hotness file, when given, seeds it with the weight of one token):
                 the warm start a new or restarted replica loads. A runtime policy starts its map from it (as from
                 --hotness-file, no calibration pass); a static map reports it as its hotness.
Every node runs the same dynaexq and reads the model from the same path (a shared or copied directory).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dynaexq.config import ServeConfig
from dynaexq.errors import UserError

APP = "dynaexq"  # the Serve application's name
HEADER = "x-dynaexq-replica"
RETRIES = 2  # a request whose replica fails before answering goes to another one this many times
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": None}}, status)


class HotnessMerge:
    """Every replica's latest (routed tokens, hotness), and their merge: the warm start of the next replica."""

    def __init__(self, seed: dict | None = None):
        self.seed = seed  # {layer: [E]} from a hotness file
        self.latest: dict = {}  # replica id -> (routed tokens, {layer: [E]})

    def push(self, replica: str, tokens: int, hotness: dict) -> None:
        self.latest[replica] = (tokens, hotness)

    def merged(self) -> dict | None:
        """-> {"hotness": {layer: [E]}, "replicas", "tokens"}: the routed-token-weighted mean, or None (nothing yet)."""
        parts = [(t, h) for t, h in self.latest.values() if t > 0] + ([(1, self.seed)] if self.seed else [])
        if not parts:
            return None
        weights = np.array([t for t, _ in parts], dtype=np.float64)
        hot = {layer: np.average([np.asarray(h[layer], dtype=np.float64) for _, h in parts], axis=0,
                                 weights=weights).tolist() for layer in parts[0][1]}
        return {"hotness": hot, "replicas": len(self.latest), "tokens": int(weights.sum())}


async def _asgi(app, method: str, path: str, query: str, headers: list, body: bytes, out: asyncio.Queue,
                gone: asyncio.Event) -> None:
    """One HTTP request through the ASGI app in this process: its messages into `out`, then None; `gone` set: the
    client left (the app sees http.disconnect)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],  # HTTP's charset
             "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 0)}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    try:
        await app(scope, receive, out.put)
    finally:
        out.put_nowait(None)


class EngineReplica:
    async def __init__(self, model, load_kwargs: dict, config: ServeConfig, merge, hotness_every_s: float = 5.0):
        from ray import serve

        import dynaexq
        from dynaexq.config import RuntimeConfig
        from dynaexq.runtime.planners import parse_policy
        from dynaexq.serve.app import create_app

        self.id, self.merge, self.every = serve.get_replica_context().replica_tag, merge, hotness_every_s
        warm = await merge.merged.remote()
        kw, self.tmp = dict(load_kwargs), Path(tempfile.mkdtemp(prefix="dynaexq-replica-"))
        policy = kw.get("policy", "auto")
        planner = parse_policy(policy) if isinstance(policy, str) and policy != "auto" else policy
        if warm is not None and getattr(planner, "dynamic", False):
            file = self.tmp / "hotness.json"  # the runtime's warm start (and where it saves at close)
            file.write_text(json.dumps({"hotness": {str(k): v for k, v in warm["hotness"].items()}}))
            kw["runtime"] = dataclasses.replace(kw.get("runtime") or RuntimeConfig(), hotness_file=str(file))
        self.engine = await asyncio.to_thread(dynaexq.load, model, progress=False, **kw)
        self.app = create_app(self.engine, config)  # a static map's server keeps engine.hotness (serve/app.py)
        self.server, rt = self.app.state.server, self.engine.runtime
        self.hotness, self.warm = (rt.hotness if rt is not None else self.engine.hotness), warm
        if warm is not None:  # a static map reports it; a runtime started from it (under "auto": learns from here)
            self.hotness.set(warm["hotness"])
        self._stop = threading.Event()
        threading.Thread(target=self._push, name="dynaexq-hotness-push", daemon=True).start()

    def _push(self) -> None:
        """Every `every` seconds: this replica's hotness and routed tokens to HotnessMerge (no reply awaited)."""
        while not self._stop.wait(self.every):
            hot = {layer: s.tolist() for layer, s in self.hotness.snapshot().items()}
            self.merge.push.remote(self.id, self.engine.routed_tokens, hot)

    def check_health(self) -> None:
        if self.server.scheduler.stopped is not None:
            raise RuntimeError(f"the scheduler stopped: {self.server.scheduler.stopped}")

    def warm_start(self) -> tuple[str, dict | None]:
        """-> (replica id, the merged hotness it started from, or None: a cold start)."""
        return self.id, self.warm

    def metrics_text(self) -> tuple[str, str]:
        return self.id, generate_latest(self.server.metrics.registry).decode()

    async def handle(self, method: str, path: str, query: str, headers: list, body: bytes):
        """One request -> {"status", "headers", "replica"}, then the body's chunks (bytes) as the app sends them."""
        out, gone = asyncio.Queue(), asyncio.Event()
        task = asyncio.create_task(_asgi(self.app, method, path, query, headers, body, out, gone))
        try:
            while (msg := await out.get()) is not None:
                if msg["type"] == "http.response.start":
                    yield {"status": msg["status"], "replica": self.id,
                           "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg["headers"]]}
                elif msg["type"] == "http.response.body" and msg.get("body"):
                    yield msg["body"]
            task.result()  # the app's own error, if it raised
        finally:  # done, or the caller went away (cancelled): the app sees the client leave
            gone.set()
            await asyncio.wait({task}, timeout=10)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.server.close()
        shutil.rmtree(getattr(self, "tmp", ""), ignore_errors=True)


class _Merged:
    """A collector of the families of every replica's exposition text, each sample labelled with its replica."""

    def __init__(self, texts):
        self.texts = texts

    def collect(self):
        families = {}
        for replica, text in self.texts:
            for fam in text_string_to_metric_families(text):
                m = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                m.samples += [s._replace(labels={"replica": replica, **s.labels}) for s in fam.samples]
        return list(families.values())


def merge_metrics(texts) -> bytes:
    """[(replica id, Prometheus text)] -> one exposition with a `replica` label on every sample."""
    registry = CollectorRegistry()
    registry.register(_Merged(texts))
    return generate_latest(registry)


class Proxy:
    def __init__(self, engines):
        self.engines = engines

    def __serve_build_asgi_app__(self):
        return Starlette(routes=[Route("/metrics", self.metrics), Route("/{path:path}", self.forward, methods=METHODS)])

    async def metrics(self, request):
        got = await self.engines.broadcast("metrics_text").results_async(return_exceptions=True)
        return Response(merge_metrics([r for r in got if not isinstance(r, BaseException)]),
                        media_type=CONTENT_TYPE_LATEST)

    async def forward(self, request):
        body = await request.body()
        call = (request.method, request.url.path, request.url.query, list(request.headers.items()), body)
        for _ in range(RETRIES + 1):
            gen = self.engines.options(stream=True).handle.remote(*call)
            try:
                start = await gen.__anext__()
                break
            except Exception as err:  # died or being replaced before it answered: nothing was sent, try another
                gen.cancel()
                failure = f"{type(err).__name__}: {err}"
        else:
            return _error(503, f"no replica could take the request ({failure.splitlines()[0]}); retry")
        sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in start["headers"])
        headers = {k: v for k, v in start["headers"] if k.lower() != "content-length"}
        headers[HEADER] = start["replica"]

        async def stream():
            done = False
            try:
                async for chunk in gen:
                    yield chunk
                done = True
            except Exception as err:
                if not sse:
                    raise  # a JSON body cut short: the connection ends
                message = f"replica {start['replica']} failed mid-stream ({type(err).__name__}); retry the request"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n".encode()
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                if not done:  # the client went away: the replica cancels the sequence
                    gen.cancel()

        return StreamingResponse(stream(), status_code=start["status"], headers=headers)


def application(model=None, *, replicas: int = 1, serve_config: ServeConfig | None = None, hotness: dict | None = None,
                hotness_every_s: float = 5.0, **load_kwargs):
    """The Serve application: `replicas` engines of `model` (dynaexq.load's path and keyword arguments), each with
    `load_kwargs["threads"]` CPUs (default 1), behind the proxy; `hotness` ({layer: [E]}) seeds the merge."""
    from ray import serve

    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    config = serve_config or ServeConfig()
    merge = serve.deployment(HotnessMerge, num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(hotness)
    engines = serve.deployment(EngineReplica, num_replicas=replicas, health_check_period_s=5,
                               ray_actor_options={"num_cpus": load_kwargs.get("threads") or 1},
                               max_ongoing_requests=config.max_batch + config.max_queue)
    proxy = serve.deployment(serve.ingress()(Proxy), name="Proxy", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=4096)
    return proxy.bind(engines.bind(None if model is None else str(model), load_kwargs, config, merge, hotness_every_s))


def run(address: str | None, model, load_kwargs: dict, config: ServeConfig, replicas: int, host: str, port: int,
        hotness_file: str | None = None) -> int:
    """`dynaexq serve --ray`: deploy on the cluster at `address` (None: a local one), serve until interrupted, then
    write the merged hotness to `hotness_file` (when given) and remove the application."""
    from ray import serve

    from dynaexq.cluster import connect
    from dynaexq.runtime.hotness import Hotness

    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    ray = connect(address)
    seed = None
    if hotness_file and Path(hotness_file).is_file():
        seed = {int(k): v for k, v in json.loads(Path(hotness_file).read_text())["hotness"].items()}
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(model, replicas=replicas, serve_config=config, hotness=seed, **load_kwargs), name=APP,
                  route_prefix="/")
    except RuntimeError as err:
        serve.delete(APP)
        raise UserError(f"the replicas did not start: {str(err).splitlines()[0]}") from None
    print(f"dynaexq: serving {replicas} replica(s) on the Ray cluster at {ray.get_runtime_context().gcs_address}, at "
          f"http://{host}:{port}/v1 (metrics of every replica /metrics; each response names its replica in "
          f"{HEADER}); Ctrl-C or SIGTERM stops", file=sys.stderr)
    # our own handlers: a process started with SIGINT ignored (a background job of a non-interactive shell) has
    # no KeyboardInterrupt, and a process manager stops with SIGTERM
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if hotness_file:
            merged = serve.get_deployment_handle("HotnessMerge", APP).merged.remote().result()
            if merged is not None:
                layers = sorted(merged["hotness"])
                h = Hotness(layers, len(merged["hotness"][layers[0]]))
                h.set(merged["hotness"])
                h.save(hotness_file)
        serve.delete(APP)
    return 0
