"""A property-based run of schemathesis against /v1/openapi.json on the live loopback server: for every operation,
generated requests with a valid key get no 5xx, and every response conforms to the document. Operations on one
resource run twice: with generated ids (404s) and with the ids of real rows, so updates and deletes are reached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
    # The client is synchronous (requests): it runs in a thread while this loop serves the engine.
    failures = await asyncio.to_thread(_fuzz, document, engine, tenant.owner_key, mode, ids)
    assert failures == [], "\n\n".join(failures)


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
