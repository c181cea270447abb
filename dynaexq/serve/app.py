"""The OpenAI-compatible HTTP server: `create_app(engine, ServeConfig) -> FastAPI` (nothing runs at import time).

Endpoints: POST /v1/chat/completions (the tokenizer's chat template), POST /v1/completions, GET /v1/models,
GET /v1/experts (the live expert map), GET /health, GET /metrics (Prometheus), GET /dashboard (heatmap page).
Requests become `Sequence`s on the engine's one `Scheduler` thread (continuous batching); its events cross into
the event loop with `call_soon_threadsafe`. A streamed response is SSE in OpenAI's chunk format ending with
`data: [DONE]`; a client that goes away has its sequence cancelled, which frees its batch slot.
Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}} with a 4xx status for anything
the client can fix; /v1/* needs `Authorization: Bearer KEY` when the server has an API key.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dynaexq.config import ServeConfig
from dynaexq.engine.batch import SamplingParams
from dynaexq.engine.scheduler import QueueFull, Scheduler, Unavailable
from dynaexq.errors import UserError
from dynaexq.runtime.hotness import Hotness
from dynaexq.serve import protocol as P
from dynaexq.serve.metrics import Metrics, experts_report


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error(status, message, type="invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


class Server:
    """What the routes share: the engine, its scheduler, the metrics and the static policies' hotness."""

    def __init__(self, engine, config: ServeConfig):
        if engine.tokenizer is None:
            raise UserError("this model has no tokenizer files (tokenizer.json / tokenizer_config.json); serving "
                            "needs one")
        if config.max_batch < 1 or config.max_queue < 0 or config.prefill_chunk < 1 or config.max_body_bytes < 1:
            raise UserError(f"--max-batch, --prefill-chunk and --max-body-bytes must be >= 1 and --max-queue >= 0; "
                            f"got {config.max_batch}, {config.prefill_chunk}, {config.max_body_bytes}, "
                            f"{config.max_queue}")
        self.engine, self.config = engine, config
        self.model_name = config.served_model_name or Path(engine.reader.manifest["source"]["path"]).name
        limit = getattr(engine.model.config, "max_position_embeddings", None) or 1 << 30
        if config.max_model_len is not None and not 2 <= config.max_model_len <= limit:
            raise UserError(f"--max-model-len must be in [2, {limit}] (the model's maximum), got "
                            f"{config.max_model_len}")
        self.context = config.max_model_len or limit
        if engine.runtime is None and engine.hotness is None:  # static map: every step feeds the same EMA the
            engine.hotness = Hotness(engine.reader.layers, engine.reader.num_experts)  # controller would keep
        self.hotness = None if engine.runtime else engine.hotness
        self.started, self.created = time.monotonic(), int(time.time())
        self.scheduler = Scheduler(engine, config.max_batch, config.max_queue, config.prefill_chunk, self._on_step,
                                   context=self.context)
        self.metrics = Metrics(self)

    def report(self) -> dict:
        return experts_report(self.engine, self.hotness, self.model_name, self.started)

    def close(self) -> None:
        self.scheduler.close()
        self.engine.close()

    def _on_step(self, info) -> None:  # the scheduler thread, between forwards
        if info["batch"]:
            self.metrics.batch.observe(info["batch"])
        self.metrics.step.observe(info["seconds"])

    # --- one request -------------------------------------------------------------------------------------------
    def prepare(self, req, prompt_ids: list[int], chat: bool) -> SamplingParams:
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}' "
                           "(GET /v1/models)", "model", "model_not_found")
        what = "messages" if chat else "prompt"
        if not prompt_ids:
            raise APIError(400, f"the {what} is empty after tokenization; give some text", what)
        n = len(prompt_ids)
        max_tokens = req.max_tokens or (getattr(req, "max_completion_tokens", None) if chat else None)
        if max_tokens is None:
            max_tokens = self.context - n if chat else 16
        if n + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {n + max_tokens} tokens ({n} in the {what}, {max_tokens} in the completion). "
                           f"Please reduce the length of the {what} or the completion.", what,
                           "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings", "stop")
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k, stop=tuple(stop),
                                  seed=req.seed)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def submit(self, prompt_ids, params, chat: bool):
        """-> (sequence, asyncio.Queue of (delta, finish_reason, completion tokens, error)); 429 when full."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        t = {"start": time.perf_counter(), "last": None, "n": 0}
        m = self.metrics

        def on_event(seq, delta):  # the scheduler thread
            now = time.perf_counter()
            if len(seq.out) > t["n"]:
                (m.ttft.observe(now - t["start"]) if t["last"] is None else m.tpot.observe(now - t["last"]))
                t["last"], t["n"] = now, len(seq.out)
            if seq.finished:
                m.completion_tokens.inc(len(seq.out))
            loop.call_soon_threadsafe(q.put_nowait, (delta, seq.finish_reason, len(seq.out), seq.error))

        try:
            seq = self.scheduler.submit(prompt_ids, params, on_event, chat=chat)
        except QueueFull as err:
            raise APIError(429, str(err), code="rate_limit_exceeded", type="server_busy") from None
        except Unavailable as err:
            raise APIError(503, f"{err}; restart the server", type="server_error") from None
        m.prompt_tokens.inc(len(prompt_ids))
        return seq, q


class _BodyLimit:
    """413 in the OpenAI error shape for a body over the limit: by its Content-Length before anything is read, or
    counted while a chunked body streams in (FastAPI passes an HTTPException raised while reading through)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            message = f"the request body is larger than {self.limit} bytes (--max-body-bytes)"
            return await _error(413, message)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def _text(text: str, param: str) -> str:
    """Client text the tokenizer can take: valid Unicode (JSON lets a lone surrogate, \\ud800-\\udfff, through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate {text[err.start]!r} at character "
                       f"{err.start}); send UTF-8 text", param) from None
    return text


def _chat_ids(tok, req) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        messages.append({"role": m.role, "content": _text(content or "", f"messages.{i}.content")})
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:  # the model's template refuses this conversation (e.g. roles must alternate)
        raise APIError(400, f"messages: the model's chat template rejects them: {err}", "messages") from None
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def _prompt_ids(tok, req) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (a list of one string, a string, or token ids)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok(_text(prompt, "prompt"), add_special_tokens=False, verbose=False)["input_ids"]
    vocab = len(tok)
    if any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return list(prompt)


async def _next(seq, q: asyncio.Queue):
    """The sequence's next event, or within a second a TimeoutError; a sequence that ended with no event for
    its client (its event callback failed on the scheduler thread) ends with its error now."""
    try:
        return await asyncio.wait_for(q.get(), timeout=1.0)
    except asyncio.TimeoutError:
        if seq.finished and q.empty() and seq.finish_reason == "error":
            return "", "error", len(seq.out), seq.error or "generation failed"
        raise


def create_app(engine, config: ServeConfig = ServeConfig()) -> FastAPI:
    server = Server(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="dynaexq", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for Mixture-of-Experts models with per-expert runtime "
                  "precision under a memory budget")
    app.state.server = server
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.api_key is None:
            return
        if credentials is None:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(credentials.credentials.encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return _error(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        loc = [str(x) for x in first["loc"] if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first['msg']}" + (f" ({len(err.errors())} errors)"
                                                                   if len(err.errors()) > 1 else ""), param=param)

    @app.exception_handler(HTTPException)
    async def _http(request, err: HTTPException):
        messages = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here",
                    413: f"the request body is larger than {config.max_body_bytes} bytes (--max-body-bytes)"}
        return _error(err.status_code, messages.get(err.status_code, str(err.detail)))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        endpoint = path if any(r.path == path for r in app.routes) else "other"
        server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    sse_event = {"type": "object", "required": ["data"], "description": "one server-sent event: `data` is a chunk "
                 "(JSON), an error object (JSON) or [DONE]", "properties": {"data": {"type": "string"},
                                                                           "event": {"type": "string"}}}
    # OpenAPI < 3.2: the `schema` of an event stream describes each event
    stream_doc = {**P.ERRORS, 200: {"content": {"text/event-stream": {"schema": sse_event}},
                                    "description": "the completion (JSON), or SSE chunks when stream is true"}}

    # tokenization (and the chat template) run in the thread pool: a long prompt must not stall other streams
    @app.post("/v1/chat/completions", response_model=P.ChatCompletion, responses=stream_doc,
              dependencies=[Depends(authorized)])
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        return await _respond(req, request, await run_in_threadpool(_chat_ids, engine.tokenizer, req), chat=True)

    @app.post("/v1/completions", response_model=P.Completion, responses=stream_doc,
              dependencies=[Depends(authorized)])
    async def completions(req: P.CompletionRequest, request: Request):
        return await _respond(req, request, await run_in_threadpool(_prompt_ids, engine.tokenizer, req), chat=False)

    async def _respond(req, request: Request, ids, chat: bool):
        params = server.prepare(req, ids, chat)
        seq, q = server.submit(ids, params, chat)
        rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(seq, q, rid, created, chat, len(ids), usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, finish, n = [], None, 0
        try:
            while finish is None:
                try:
                    delta, finish, n, error = await _next(seq, q)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                parts.append(delta)
        finally:
            if finish is None:
                server.scheduler.cancel(seq)
        if finish == "error":  # 503 when the scheduler is gone (set before it fails what it held), else 500
            raise APIError(503 if server.scheduler.stopped else 500, error, type="server_error")
        usage = P.Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
        text = "".join(parts)
        if chat:
            return P.ChatCompletion(id=rid, created=created, model=server.model_name, usage=usage, choices=[
                P.ChatChoice(index=0, message=P.AssistantMessage(content=text), finish_reason=finish)])
        return P.Completion(id=rid, created=created, model=server.model_name, usage=usage,
                            choices=[P.CompletionChoice(index=0, text=text, finish_reason=finish)])

    async def _sse(seq, q, rid, created, chat: bool, prompt_tokens: int, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta=None, finish=None, text="", usage=None):
            choice = ({"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None} if chat else
                      {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            body = {"id": rid, "object": kind, "created": created, "model": server.model_name,
                    "choices": [] if usage else [choice]}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        finish = None
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while finish is None:
                try:
                    delta, finish, n, error = await _next(seq, q)
                except asyncio.TimeoutError:
                    continue
                if finish == "error":
                    yield f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n"
                    break
                if delta:
                    yield chunk({"content": delta}, text=delta)
                if finish is not None:
                    yield chunk({}, finish)
            if include_usage and finish != "error":
                yield chunk(usage={"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                   "total_tokens": prompt_tokens + n})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): a running sequence gives its slot back
            if finish is None:
                server.scheduler.cancel(seq)

    @app.get("/v1/models", response_model=P.ModelList, responses=P.ERRORS, dependencies=[Depends(authorized)])
    async def models():
        return P.ModelList(data=[_model(server)])

    @app.get("/v1/models/{model_id}", response_model=P.Model, responses=P.ERRORS, dependencies=[Depends(authorized)])
    async def model(model_id: str):
        if model_id != server.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return _model(server)

    # the reports read the runtime (a device sync under CUDA): plain `def` routes run in the thread pool
    @app.get("/v1/experts", response_model=P.ExpertsReport, responses=P.ERRORS, dependencies=[Depends(authorized)])
    def experts():
        return server.report()

    @app.get("/health", response_model=P.Health, responses={503: {"model": P.Health}})
    async def health():
        running, waiting = server.scheduler.load()
        stopped = server.scheduler.stopped
        if stopped is not None:  # the scheduler thread is gone: a load balancer should take this replica out
            return JSONResponse(P.Health(status="unhealthy", running=running, waiting=waiting,
                                         error=stopped).model_dump(), 503)
        return P.Health(status="ok", running=running, waiting=waiting)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    dashboard_html = resources.files("dynaexq.serve").joinpath("dashboard.html").read_text(encoding="utf-8")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(dashboard_html)

    def openapi():  # our 400s replace FastAPI's 422s: document what the server really answers
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema["paths"].values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _model(server: Server) -> P.Model:
    return P.Model(id=server.model_name, created=server.created, max_model_len=server.context)
