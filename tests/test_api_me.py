"""GET /v1/me through the real server: the key's organization, user, role and the key itself (never its secret), and
what it may do: an OWNER's and an ADMIN's key may change things and listen to calls, a VIEWER's may do neither, with
the very reasons the 403s of a write and of the listen endpoint give it."""

from __future__ import annotations

import asyncpg

from storage import api_keys, users
from storage.enums import UserRole, UserStatus
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant
from tests.test_api_resources import acme

__all__ = ["acme"]  # that module's organization with an OWNER and a VIEWER (the engine is conftest's `api`)

PERMISSIONS = ("canWrite", "writeRefusal", "canListen", "listenRefusal")
"""What the answer says the key may do, and why not."""


async def test_an_owners_key_is_told_its_organization_user_and_key_and_that_it_may_listen(
    api: Api, acme: Tenant
) -> None:
    status, body = await api.call("GET", "/me", acme.owner_key)
    assert status == 200
    assert {name: body[name] for name in ("organizationId", "userId", "role")} == {
        "organizationId": acme.organization_id,
        "userId": acme.owner_id,
        "role": "OWNER",
    }
    assert (body["apiKey"]["id"], body["apiKey"]["name"], body["apiKey"]["mode"]) == (
        acme.owner_key_id,
        "owner",
        "live",
    )
    assert acme.owner_key.startswith(body["apiKey"]["keyPrefix"])
    assert [body[name] for name in PERMISSIONS] == [True, None, True, None]


async def test_the_answer_never_holds_the_key_itself(api: Api, acme: Tenant) -> None:
    async with api.session.get(api.base + "/v1/me", headers={"Authorization": f"Bearer {acme.owner_key}"}) as got:
        text = await got.text()
    assert got.status == 200
    assert acme.owner_key not in text


async def test_a_viewers_key_may_not_listen_and_is_told_why_in_the_listen_endpoints_own_words(
    api: Api, acme: Tenant
) -> None:
    status, body = await api.call("GET", "/me", acme.viewer_key)
    assert status == 200
    assert (body["role"], body["canWrite"], body["canListen"]) == ("VIEWER", False, False)
    refused_status, refused = await api.call("GET", "/live-calls/any-call/listen", acme.viewer_key)
    assert refused_status == 403
    assert body["listenRefusal"] == refused["error"]["message"]
    assert "listening to a call needs an OWNER's or ADMIN's key" in body["listenRefusal"]


async def test_a_viewers_key_may_not_write_and_is_told_why_in_the_words_of_a_writes_403(api: Api, acme: Tenant) -> None:
    status, body = await api.call("GET", "/me", acme.viewer_key)
    assert status == 200
    assert (body["role"], body["canWrite"]) == ("VIEWER", False)
    for path, payload in (("/live-calls/any-call/hangup", None), ("/live-calls/any-call/say", {"text": "Hello."})):
        refused_status, refused = await api.call("POST", path, acme.viewer_key, json=payload)
        assert refused_status == 403
        assert body["writeRefusal"] == refused["error"]["message"]
    assert body["writeRefusal"] == "this API key's user is a VIEWER of the organization and can only read"


async def test_an_admins_key_may_write_and_listen(api: Api, acme: Tenant, pool: asyncpg.Pool) -> None:
    admin = await users.create_user(pool, email=f"admin-{acme.organization_id}@example.com", status=UserStatus.ACTIVE)
    await users.add_member(pool, user_id=admin.id, organization_id=acme.organization_id, role=UserRole.ADMIN)
    key = await api_keys.create_api_key(
        pool, organization_id=acme.organization_id, user_id=admin.id, name="admin", live=True
    )
    status, body = await api.call("GET", "/me", key.plaintext)
    assert status == 200
    assert (body["role"], body["userId"], body["apiKey"]["id"]) == ("ADMIN", admin.id, key.api_key.id)
    assert [body[name] for name in PERMISSIONS] == [True, None, True, None]


async def test_each_key_is_told_its_own_organization(api: Api, acme: Tenant, pool: asyncpg.Pool) -> None:
    globex = await make_tenant(pool, "Globex")
    _, acmes = await api.call("GET", "/me", acme.owner_key)
    _, globexs = await api.call("GET", "/me", globex.owner_key)
    assert (acmes["organizationId"], globexs["organizationId"]) == (acme.organization_id, globex.organization_id)
    assert globexs["apiKey"]["id"] == globex.owner_key_id


async def test_without_a_key_it_is_a_401(api: Api) -> None:
    status, body = await api.call("GET", "/me", None)
    assert status == 401
    assert_error(body, "unauthorized")
