"""schemathesis against the server's own /openapi.json: generated requests (valid and invalid) never get a 5xx,
and every response conforms to the documented status codes, content types and schemas."""
from collections import Counter

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

import dynaexq
from dynaexq.config import ServeConfig
from dynaexq.serve.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(bundled_store):
    from live import LiveServer

    engine = dynaexq.load(bundled_store, policy="uniform:int4", dtype=torch.float32, progress=False)
    live = LiveServer(create_app(engine, ServeConfig(max_model_len=40)))  # short generations keep this quick
    yield live
    live.close()


def _run(server, operations, statuses, modes=(GenerationMode.POSITIVE, GenerationMode.NEGATIVE), examples=30):
    for op in operations:
        for mode in modes:
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET" and "{" not in op.path:
                continue  # nothing to make invalid

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "dxq-moe-mini"  # a random model id would only ever meet the 404
                statuses[(op.path, case.call_and_validate(base_url=server.url, checks=CHECKS).status_code)] += 1

            run()


def test_generated_requests_get_no_5xx_and_schema_conforming_responses(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    body = server.app.openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert float(body["minimum"]) == -2.0**63 and float(body["maximum"]) == 2.0**63  # (as floats): negative mode
    # generates seeds outside the 64-bit range, which once reached torch.Generator.manual_seed (a 500)
    statuses = Counter()
    _run(server, operations, statuses)
    total = Counter()
    for (_, status), n in statuses.items():
        total[status] += n
    assert total[200] > 20 and total[400] > 20, statuses  # both accepted and rejected requests were tried


def test_generated_conversations_against_a_template_that_raises_get_400s_not_500s(server, monkeypatch):
    """A chat template that rejects role orders (Mixtral's, Qwen3's do) meets random conversations."""
    from test_robustness import STRICT_TEMPLATE

    monkeypatch.setattr(server.app.state.server.engine.tokenizer, "chat_template", STRICT_TEMPLATE)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    chat = [r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/chat/completions"]
    statuses = Counter()
    _run(server, chat, statuses, modes=(GenerationMode.POSITIVE,), examples=40)
    assert statuses[("/v1/chat/completions", 400)] > 5, statuses  # the template did refuse some
