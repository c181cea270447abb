"""The OpenAI wire format: request and response models (pydantic) for the endpoints the server offers.

Only what the server honours is declared; other fields a client sends are ignored, as OpenAI-compatible servers
do. Ranges are in the schema (so `/openapi.json` documents them and bad values are 400s before any work).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the served model's id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = off")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; generation ends before the first")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer: the same seed, the "
                             "same text")
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (newer name)")


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] = Field(description="one prompt: a string or token ids")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dynaexq"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    running: int
    waiting: int
    error: str | None = None  # why, when unhealthy


class LayerExperts(BaseModel):
    layer: int
    hotness: list[float] = Field(description="EMA of routed probability mass per token, per expert")
    precision: list[str] = Field(description="published precision per expert")
    target: list[str] | None = Field(None, description="the controller's target (runtime policies)")


class OffloadReport(BaseModel):
    resident: int = Field(description="experts with a resident version")
    offloaded: int = Field(description="experts read from the store when routed to")
    resident_by_precision: dict[str, int]
    hits: int
    misses: int
    hit_rate: float
    prefetches: int = Field(description="experts fetched by the look-ahead")
    prefetch_hits: int
    evictions: int
    upgrades: int = Field(description="background fetches of a wanted higher precision")
    stall_s: float = Field(description="seconds forward passes waited for misses")
    read_bytes: int
    read_s: float
    io_mode: str = Field(description="direct (O_DIRECT), buffered (pages dropped after reads) or cached")
    mean_recall: float | None = Field(None, description="look-ahead prediction recall, mean over layers")


class ExpertsReport(BaseModel):
    model: str
    policy: str
    dynamic: bool = Field(description="whether the hotness controller switches precisions live")
    num_experts: int
    precisions: list[str] = Field(description="the precisions in use, highest first")
    counts: dict[str, int] = Field(description="experts published per precision")
    layers: list[LayerExperts]
    budget: dict[str, int | None] = Field(description="bytes: experts resident, cap, peak used, whole-model budget")
    transitions: dict[str, int | float]
    forward_wait_s: float
    uptime_s: float
    offload: OffloadReport | None = Field(None, description="the offload regime's cache (None: every expert resident)")


ERRORS = {code: {"model": ErrorResponse, "description": what} for code, what in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model or route"),
    (413, "request body too large"), (429, "the server is at capacity"))}
