"""A property-based run of schemathesis against /v1/openapi.json on the live loopback server: for every operation,
generated requests with a valid key get no 5xx, and every response conforms to the document. Operations on one
resource run twice: with generated ids (404s) and with the ids of real rows, so updates and deletes are reached.
Long-text fields are fuzzed up to FUZZ_MAX_LENGTH characters; their real limits get one over-long value each."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err

from storage import call_logs
from storage.enums import CallStatus, CallType
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant

EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 4}
"""Examples per operation: enough to reach each one's validation edges, bounded so the file runs quickly."""
FUZZ_NUMBERS = {GenerationMode.POSITIVE: "+14155550301", GenerationMode.NEGATIVE: "+14155550302"}
FUZZ_MAX_LENGTH = 4_000
"""The most characters the fuzzed document lets a pattern-checked string have. schemathesis folds such a string's
maxLength into its pattern as a counted repetition (`^[^\\x00]{0,100000}$`) whose compilation grows with the count:
LongText's 100,000 cost half a second per schema, most of this file's time. Hypothesis draws nothing near that long
anyway (no string past a few hundred characters); each capped field's own limit gets one over-long value instead."""
OVER_LONG_NUMBER = "+14155550303"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url) as base:
        yield base


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
async def test_generated_requests_get_no_5xx_and_conforming_responses(
    engine: str, pool: asyncpg.Pool, mode: GenerationMode
) -> None:
    tenant = await make_tenant(pool, f"Fuzz {mode.value}")
    async with aiohttp.ClientSession() as session:
        async with session.get(engine + "/v1/openapi.json") as response:
            document = await response.json()
        ids = await seed_rows(Api(session, engine), pool, tenant, number=FUZZ_NUMBERS[mode])
    fuzzed, _ = capped_for_fuzzing(document)
    # The client is synchronous (requests): it runs in a thread while this loop serves the engine.
    failures = await asyncio.to_thread(_fuzz, fuzzed, engine, tenant.owner_key, mode, ids)
    assert failures == [], "\n\n".join(failures)


async def test_each_long_text_field_refuses_one_character_over_its_limit(engine: str, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Over-long texts")
    async with aiohttp.ClientSession() as session:
        async with session.get(engine + "/v1/openapi.json") as response:
            document = await response.json()
        api = Api(session, engine)
        ids = await seed_rows(api, pool, tenant, number=OVER_LONG_NUMBER)
        fields = long_text_fields(document)
        assert fields, "no field is beyond the fuzzer's reach: this test has nothing left to prove"
        assert capped_in_use(document) <= {field.pointer for field in fields}, "a capped field gets no over-long value"
        for field in fields:
            # Past the 8,190 bytes of request line aiohttp reads, a query is refused before the API sees it: a query
            # parameter must document a limit the server can carry.
            assert field.where != "query", f"{field.label}: a query parameter longer than a request line can carry"
            status, body = await api.call(
                field.method, field.request_path(ids), tenant.owner_key, json=field.request_body(ids)
            )
            assert status == 422, f"{field.label}: {status} {str(body)[:300]}"
            assert body["error"]["field"] == field.name, f"{field.label}: {body}"
            assert "more problem" not in body["error"]["message"], f"{field.label}: more was wrong: {body}"


async def seed_rows(api: Api, pool: asyncpg.Pool, tenant: Tenant, *, number: str) -> dict[str, str]:
    """One row of each resource, made through the API; their ids by path parameter name."""

    async def create(path: str, body: dict[str, Any]) -> str:
        status, created = await api.call("POST", path, tenant.owner_key, json=body)
        assert status == 201, created
        return str(created["id"])

    ids = {
        "agentId": await create("/agents", {"name": "Fuzzed agent"}),
        "phoneNumberId": await create("/phone-numbers", {"phoneNumber": number}),
        "voiceId": await create("/voices", {"name": "Fuzzed voice"}),
        "knowledgeBaseId": await create("/knowledge-bases", {"name": "Fuzzed KB"}),
        "conversationPathId": await create("/conversation-paths", {"name": "Fuzzed path"}),
        "toolId": await create("/tools", {"name": "Fuzzed tool", "configuration": {"token": "t"}}),
        "eventId": await create("/events", {"name": "call.ended", "webhookUrl": "https://example.com/hook"}),
        "apiKeyId": await create("/api-keys", {"name": "Fuzzed key, not the one fuzzing"}),
    }
    ids["documentId"] = await create(
        f"/knowledge-bases/{ids['knowledgeBaseId']}/documents", {"name": "Doc", "type": "TEXT", "content": "Hi"}
    )
    log = await call_logs.create_call_log(
        pool, organization_id=tenant.organization_id, call_type=CallType.INBOUND, call_id=f"CAfuzz{number}"
    )
    await call_logs.finalize_call_log(
        pool, organization_id=tenant.organization_id, call_log_id=log.id, status=CallStatus.COMPLETED
    )
    ids["callLogId"] = log.id
    return ids


def capped_for_fuzzing(document: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """A copy of `document` whose long pattern-checked strings allow FUZZ_MAX_LENGTH characters, and the JSON
    pointers of the schemas it capped."""
    fuzzed = copy.deepcopy(document)
    capped: set[str] = set()
    for pointer, node in objects_in(fuzzed):
        if beyond_fuzzing(node):
            node["maxLength"] = FUZZ_MAX_LENGTH
            capped.add(pointer)
    return fuzzed, capped


def capped_in_use(document: dict[str, Any]) -> set[str]:
    """The JSON pointers of the schemas capped_for_fuzzing caps that some operation uses."""
    _, capped = capped_for_fuzzing(document)
    used = references(document)
    return {pointer for pointer in capped if component(pointer) is None or component(pointer) in used}


def beyond_fuzzing(schema: dict[str, Any]) -> bool:
    """Whether `schema` is a pattern-checked string allowed more than FUZZ_MAX_LENGTH characters."""
    limit = schema.get("maxLength")
    return isinstance(limit, int) and limit > FUZZ_MAX_LENGTH and "pattern" in schema


@dataclass(frozen=True)
class LongTextField:
    """A query parameter or a top-level body field beyond the fuzzer's reach, and its schema's JSON pointer."""

    method: str
    path: str
    where: str
    name: str
    limit: int
    pointer: str

    @property
    def label(self) -> str:
        """The operation and the field, for messages."""
        return f"{self.method} {self.path} {self.where} {self.name}"

    def request_path(self, ids: dict[str, str]) -> str:
        """The operation's path under /v1 on real rows, with the over-long value when it is a query parameter."""
        path = self.path.removeprefix("/v1").format(**ids)
        return f"{path}?{self.name}={self.over_long}" if self.where == "query" else path

    def request_body(self, ids: dict[str, str]) -> dict[str, Any] | None:
        """A body valid but for the over-long value, when the field is in the body."""
        if self.where != "body":
            return None
        if self.method == "PATCH":
            return {self.name: self.over_long}
        required = {
            ("POST", "/v1/agents"): {"name": "Long"},
            ("POST", "/v1/voices"): {"name": "Long"},
            ("POST", "/v1/knowledge-bases"): {"name": "Long"},
            ("POST", "/v1/knowledge-bases/{knowledgeBaseId}/documents"): {"name": "Long", "type": "TEXT"},
            ("POST", "/v1/conversation-paths"): {"name": "Long"},
            ("POST", "/v1/tools"): {"name": "Long"},
            ("POST", "/v1/events"): {"name": "call.ended", "webhookUrl": "https://example.com/hook"},
            ("POST", "/v1/campaigns"): {"batchName": "Long", "agentId": ids["agentId"]},
        }
        assert (self.method, self.path) in required, f"{self.label}: add the rest of a valid body to request_body"
        return required[self.method, self.path] | {self.name: self.over_long}

    @property
    def over_long(self) -> str:
        """One character more than the field allows."""
        return "x" * (self.limit + 1)


def long_text_fields(document: dict[str, Any]) -> list[LongTextField]:
    """Every query parameter and top-level JSON body field of `document` beyond the fuzzer's reach."""
    fields = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            at = f"#/paths/{_escaped(path)}/{method}"
            for index, parameter in enumerate(operation.get("parameters", [])):
                if beyond_fuzzing(parameter["schema"]):
                    limit = parameter["schema"]["maxLength"]
                    pointer = f"{at}/parameters/{index}/schema"
                    fields.append(
                        LongTextField(method.upper(), path, parameter["in"], parameter["name"], limit, pointer)
                    )
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            pointer = body["schema"]["$ref"]
            schema = document["components"]["schemas"][pointer.rsplit("/", 1)[1]]
            for name, spec in schema.get("properties", {}).items():
                choices = (
                    [(f"/anyOf/{n}", choice) for n, choice in enumerate(spec["anyOf"])]
                    if "anyOf" in spec
                    else [("", spec)]
                )
                for suffix, choice in choices:
                    if beyond_fuzzing(choice):
                        at_choice = f"{pointer}/properties/{_escaped(name)}{suffix}"
                        fields.append(LongTextField(method.upper(), path, "body", name, choice["maxLength"], at_choice))
    return fields


def references(document: dict[str, Any]) -> set[str]:
    """Every `$ref` in `document`."""
    return {node["$ref"] for _, node in objects_in(document) if isinstance(node.get("$ref"), str)}


def objects_in(node: Any, pointer: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON object in `node` (itself included) with its JSON pointer, outer ones first."""
    if isinstance(node, dict):
        yield pointer, node
        for key, value in node.items():
            yield from objects_in(value, f"{pointer}/{_escaped(key)}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from objects_in(value, f"{pointer}/{index}")


def component(pointer: str) -> str | None:
    """The component schema a JSON pointer is inside (`#/components/schemas/Name`), if any."""
    parts = pointer.split("/")
    return "/".join(parts[:4]) if parts[1:3] == ["components", "schemas"] else None


def _escaped(key: str) -> str:
    """A key as a JSON pointer spells it."""
    return key.replace("~", "~0").replace("/", "~1")


def _fuzz(
    document: dict[str, Any],
    base_url: str,
    key: str,
    mode: GenerationMode = GenerationMode.POSITIVE,
    ids: dict[str, str] | None = None,
) -> list[str]:
    """Run every operation of `document` with generated requests, then those on one row with `ids`' real rows
    (deletions last); one line per failing operation."""
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    called = streamed_operations(document)  # they answer for as long as the client reads: tested on their own
    with requests.Session() as session:
        on_rows = []
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                failures.append(f"the document describes an unusable operation: {result.err()}")
                continue
            operation = result.ok()
            if operation.label in called:
                continue
            parameters = [p.name for p in operation.path_parameters]
            if ids is not None and parameters and all(p in ids for p in parameters):
                on_rows.append((operation, {p: ids[p] for p in parameters}))
            failures += _run(operation, mode, session, base_url, headers, None)
            called.add(operation.label)
        # Deletions last, nested rows (a knowledge base's document) before their parents.
        on_rows.sort(key=lambda entry: (entry[0].method.upper() == "DELETE", -entry[0].path.count("/")))
        for operation, path_parameters in on_rows:
            failures += _run(operation, mode, session, base_url, headers, path_parameters)
    assert called == set(document_operations(document)), "some operations were never called"
    return failures


def _run(  # noqa: PLR0917 (one call site)
    operation: schemathesis.APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    session: requests.Session,
    base_url: str,
    headers: dict[str, str],
    path_parameters: dict[str, str] | None,
) -> list[str]:
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    def run(case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    except (Exception, FailureGroup) as exc:  # the smallest failing case: report it, go on
        where = f" with {path_parameters}" if path_parameters else ""
        return [f"{operation.label}{where}: {exc}"]
    return []


def document_operations(document: dict[str, Any]) -> list[str]:
    """Every "METHOD /path" the document describes."""
    return [f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item]


def streamed_operations(document: dict[str, Any]) -> set[str]:
    """The "METHOD /path"s that answer a stream of Server-Sent Events (tests/test_live_events.py)."""
    return {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method, spec in item.items()
        if "text/event-stream" in spec["responses"].get("200", {}).get("content", {})
    }
