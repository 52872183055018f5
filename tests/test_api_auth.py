"""The /v1 API's front door: Bearer API keys (wrong, expired, revoked, another organization's, missing), VIEWERs
refused writes, lastUsedAt kept cheaply, and the one error shape for everything that goes wrong."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from storage import api_keys, organizations, users
from storage.enums import UserRole, UserStatus
from tests.engine_server import running_engine

_slugs = itertools.count(1)


@dataclass(frozen=True)
class Tenant:
    """An organization with an OWNER's key and a VIEWER's key."""

    organization_id: str
    owner_id: str
    owner_key: str
    viewer_key: str
    owner_key_id: str


async def make_tenant(pool: asyncpg.Pool, name: str, *, credits: int = 100) -> Tenant:
    """A fresh organization, an OWNER and a VIEWER, each with a live key."""
    n = next(_slugs)
    org = await organizations.create_organization(pool, name=name, slug=f"{name.lower()}-{n}", credits=credits)
    owner = await users.create_user(pool, email=f"owner-{n}-{name}@example.com", status=UserStatus.ACTIVE)
    viewer = await users.create_user(pool, email=f"viewer-{n}-{name}@example.com", status=UserStatus.ACTIVE)
    await users.add_member(pool, user_id=owner.id, organization_id=org.id, role=UserRole.OWNER)
    await users.add_member(pool, user_id=viewer.id, organization_id=org.id, role=UserRole.VIEWER)
    owner_key = await api_keys.create_api_key(pool, organization_id=org.id, user_id=owner.id, name="owner", live=True)
    viewer_key = await api_keys.create_api_key(
        pool, organization_id=org.id, user_id=viewer.id, name="viewer", live=False
    )
    return Tenant(org.id, owner.id, owner_key.plaintext, viewer_key.plaintext, owner_key.api_key.id)


class Api:
    """An HTTP client for the engine's /v1 API."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(
        self, method: str, path: str, key: str | None, *, json: Any = None, data: str | None = None
    ) -> tuple[int, Any]:
        """Send a request; the status and the decoded JSON body (None when empty)."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base + "/v1" + path, json=json, data=data, headers=headers
        ) as response:
            text = await response.text()
            if text:
                assert response.content_type == "application/json", text
                return response.status, await response.json()
            return response.status, None


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url) as base:
        yield base


@pytest.fixture(scope="module")
async def api(engine: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, engine)


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme")


@pytest.fixture(scope="module")
async def globex(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Globex")


def assert_error(body: Any, code: str, field: str | None = None) -> None:
    """The body is the API's one error shape with that code (and field)."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["field"] == field


async def test_a_valid_key_reaches_its_own_organization(api: Api, acme: Tenant) -> None:
    status, body = await api.call("GET", "/organization", acme.owner_key)
    assert status == 200
    assert body["id"] == acme.organization_id
    assert body["credits"] == 100


async def test_a_missing_authorization_header_is_401(api: Api) -> None:
    status, body = await api.call("GET", "/organization", None)
    assert status == 401
    assert_error(body, "unauthorized")


async def test_another_scheme_than_bearer_is_401(api: Api, acme: Tenant) -> None:
    async with api.session.get(
        api.base + "/v1/organization", headers={"Authorization": f"Basic {acme.owner_key}"}
    ) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert_error(await r.json(), "unauthorized")


@pytest.mark.parametrize(
    "key",
    [
        "sk_live_" + "A" * 43,  # the right shape, but no such key
        "sk_prod_" + "A" * 43,  # not a prefix we issue
        "not-a-key",
    ],
)
async def test_a_wrong_key_is_401(api: Api, key: str) -> None:
    status, body = await api.call("GET", "/organization", key)
    assert status == 401
    assert_error(body, "unauthorized")


async def test_an_expired_key_is_401(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    expired = await api_keys.create_api_key(
        pool,
        organization_id=acme.organization_id,
        user_id=acme.owner_id,
        name="expired",
        live=True,
        expiration_date=datetime.now(UTC) - timedelta(seconds=1),
    )
    status, body = await api.call("GET", "/organization", expired.plaintext)
    assert status == 401
    assert_error(body, "unauthorized")


async def test_a_revoked_key_is_401_from_the_next_request(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    created = await api_keys.create_api_key(
        pool, organization_id=acme.organization_id, user_id=acme.owner_id, name="soon revoked", live=True
    )
    assert (await api.call("GET", "/organization", created.plaintext))[0] == 200
    status, _ = await api.call("POST", f"/api-keys/{created.api_key.id}/revoke", acme.owner_key)
    assert status == 200
    status, body = await api.call("GET", "/organization", created.plaintext)
    assert status == 401
    assert_error(body, "unauthorized")


async def test_a_key_whose_user_left_the_organization_is_401(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    leaver = await users.create_user(pool, email="leaver@example.com", status=UserStatus.ACTIVE)
    await users.add_member(pool, user_id=leaver.id, organization_id=acme.organization_id, role=UserRole.ADMIN)
    key = await api_keys.create_api_key(
        pool, organization_id=acme.organization_id, user_id=leaver.id, name="leaver", live=True
    )
    await pool.execute('DELETE FROM "UserOrganization" WHERE "userId" = $1', leaver.id)
    status, body = await api.call("GET", "/organization", key.plaintext)
    assert status == 401
    assert_error(body, "unauthorized")


async def test_another_organizations_key_sees_only_its_own_rows(api: Api, acme: Tenant, globex: Tenant) -> None:
    status, created = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "Acme only"})
    assert status == 201
    status, body = await api.call("GET", f"/knowledge-bases/{created['id']}", globex.owner_key)
    assert status == 404
    assert_error(body, "not_found")
    status, body = await api.call("DELETE", f"/knowledge-bases/{created['id']}", globex.owner_key)
    assert status == 404
    _, listed = await api.call("GET", "/knowledge-bases", globex.owner_key)
    assert created["id"] not in [kb["id"] for kb in listed["data"]]
    status, still = await api.call("GET", f"/knowledge-bases/{created['id']}", acme.owner_key)
    assert status == 200 and still["name"] == "Acme only"


async def test_another_organizations_key_cannot_revoke_a_key(api: Api, acme: Tenant, globex: Tenant) -> None:
    status, body = await api.call("POST", f"/api-keys/{acme.owner_key_id}/revoke", globex.owner_key)
    assert status == 404
    assert_error(body, "not_found")
    assert (await api.call("GET", "/organization", acme.owner_key))[0] == 200


async def test_a_viewer_can_read(api: Api, acme: Tenant) -> None:
    status, body = await api.call("GET", "/agents", acme.viewer_key)
    assert status == 200
    assert body["nextCursor"] is None


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("POST", "/agents", {"name": "Not allowed"}),
        ("POST", "/api-keys", {"name": "escalate"}),
        ("DELETE", "/tools/anything", None),
        ("PATCH", "/phone-numbers/anything", {"label": "x"}),
    ],
)
async def test_a_viewer_cannot_change_anything(  # noqa: PLR0917 (fixtures and parameters)
    api: Api, pool: asyncpg.Pool, acme: Tenant, method: str, path: str, payload: Any
) -> None:
    before = await pool.fetchval('SELECT count(*) FROM "Agent" WHERE "organizationId" = $1', acme.organization_id)
    status, body = await api.call(method, path, acme.viewer_key, json=payload)
    assert status == 403
    assert_error(body, "forbidden")
    after = await pool.fetchval('SELECT count(*) FROM "Agent" WHERE "organizationId" = $1', acme.organization_id)
    assert after == before


async def test_last_used_is_recorded_at_most_once_a_minute(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    key = await api_keys.create_api_key(
        pool, organization_id=acme.organization_id, user_id=acme.owner_id, name="usage", live=True
    )
    assert (await api.call("GET", "/organization", key.plaintext))[0] == 200
    first = await pool.fetchval('SELECT "lastUsedAt" FROM "ApiKey" WHERE "id" = $1', key.api_key.id)
    assert first is not None
    assert (await api.call("GET", "/organization", key.plaintext))[0] == 200
    assert await pool.fetchval('SELECT "lastUsedAt" FROM "ApiKey" WHERE "id" = $1', key.api_key.id) == first
    # A minute later (moved back rather than waited for), the next request records it again.
    stale = first - timedelta(minutes=2)
    await pool.execute('UPDATE "ApiKey" SET "lastUsedAt" = $2 WHERE "id" = $1', key.api_key.id, stale)
    assert (await api.call("GET", "/organization", key.plaintext))[0] == 200
    assert await pool.fetchval('SELECT "lastUsedAt" FROM "ApiKey" WHERE "id" = $1', key.api_key.id) > stale


async def test_an_unknown_path_under_v1_is_a_json_404(api: Api, acme: Tenant) -> None:
    status, body = await api.call("GET", "/no-such-thing", acme.owner_key)
    assert status == 404
    assert_error(body, "not_found")


async def test_a_method_the_path_does_not_take_is_a_json_405(api: Api, acme: Tenant) -> None:
    async with api.session.put(
        api.base + "/v1/organization", json={}, headers={"Authorization": f"Bearer {acme.owner_key}"}
    ) as response:
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == {"GET", "PATCH"}
        assert_error(await response.json(), "method_not_allowed")


async def test_a_body_over_the_size_limit_is_a_json_413_naming_the_limit(api: Api, acme: Tenant) -> None:
    status, body = await api.call(
        "POST", "/knowledge-bases", acme.owner_key, json={"name": "Big", "description": "x" * 2_000_000}
    )
    assert status == 413
    assert_error(body, "payload_too_large")
    assert body["error"]["message"] == (
        "the request body is larger than 1048576 bytes, the most one request may carry; send it in smaller requests"
    )


async def test_a_body_that_is_not_json_is_400(api: Api, acme: Tenant) -> None:
    status, body = await api.call("POST", "/tools", acme.owner_key, data="{not json")
    assert status == 400
    assert_error(body, "invalid_json")


@pytest.mark.parametrize("depth", [2_000, 100_000])
async def test_json_nested_too_deeply_is_400_not_a_server_error(api: Api, acme: Tenant, depth: int) -> None:
    status, body = await api.call("POST", "/tools", acme.owner_key, data="[" * depth + "]" * depth)
    assert status == 400
    assert_error(body, "invalid_json")


@pytest.mark.parametrize(
    "number", ["1" + "0" * 5_000, "1e400", "NaN", "-Infinity"], ids=["5001 digits", "1e400", "NaN", "-Infinity"]
)
async def test_a_number_json_cannot_hold_is_400_not_a_server_error(api: Api, acme: Tenant, number: str) -> None:
    # Python's json module reads all of these (the first as an int past its 4,300 digits only by raising).
    status, body = await api.call(
        "POST", "/tools", acme.owner_key, data=f'{{"name": "T", "configuration": {{"k": {number}}}}}'
    )
    assert status == 400
    assert_error(body, "invalid_json")


async def test_a_validation_error_names_the_field_by_its_json_path(api: Api, acme: Tenant) -> None:
    status, body = await api.call(
        "POST",
        "/conversation-paths",
        acme.owner_key,
        json={"name": "Flow", "nodes": [{"id": "a"}, "not an object"]},
    )
    assert status == 422
    assert_error(body, "validation_error", "nodes[1]")


async def test_an_unknown_field_is_refused_by_name(api: Api, acme: Tenant) -> None:
    status, body = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "KB", "colour": "red"})
    assert status == 422
    assert_error(body, "validation_error", "colour")


async def test_text_the_database_cannot_store_is_refused_not_a_500(api: Api, acme: Tenant) -> None:
    status, body = await api.call(
        "POST", "/tools", acme.owner_key, json={"name": "T", "configuration": {"k": "a\x00b"}}
    )
    assert status == 422
    assert_error(body, "validation_error", "configuration.k")


async def test_the_openapi_document_needs_no_key(api: Api) -> None:
    status, body = await api.call("GET", "/openapi.json", None)
    assert status == 200
    assert body["openapi"] == "3.1.0"
    assert "/v1/call-logs" in body["paths"]
    assert body["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
