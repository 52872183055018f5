"""Each /v1 resource through the real server: create, read, list, update, delete, and the errors a caller can fix."""

from __future__ import annotations

import base64
import json

import asyncpg
import pytest

from storage import voices
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Acme", credits=42)


@pytest.fixture(scope="module")
async def globex(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Globex")


async def test_organization_credits(api: Api, acme: Tenant) -> None:
    status, body = await api.call("GET", "/organization/credits", acme.owner_key)
    assert status == 200
    assert body == {"credits": 42, "plan": "free"}


async def test_organization_rename(api: Api, pool: asyncpg.Pool, globex: Tenant) -> None:
    tenant = await make_tenant(pool, "Renamed")
    status, body = await api.call("PATCH", "/organization", tenant.owner_key, json={"name": "Renamed Inc"})
    assert status == 200
    assert body["name"] == "Renamed Inc"
    taken = await pool.fetchval('SELECT "slug" FROM "Organization" WHERE "id" = $1', globex.organization_id)
    status, body = await api.call("PATCH", "/organization", tenant.owner_key, json={"slug": taken})
    assert status == 409
    assert_error(body, "already_exists", "slug")
    assert taken not in body["error"]["message"]  # another tenant's value is not echoed
    status, body = await api.call("PATCH", "/organization", tenant.owner_key, json={"credits": 1_000_000})
    assert status == 422
    assert_error(body, "validation_error", "credits")
    status, body = await api.call("PATCH", "/organization", tenant.owner_key, json={"slug": "Not A Slug"})
    assert status == 422
    assert_error(body, "validation_error", "slug")
    assert (await api.call("PATCH", "/organization", tenant.viewer_key, json={"name": "Viewer Inc"}))[0] == 403
    assert await pool.fetchval('SELECT "name" FROM "Organization" WHERE "id" = $1', tenant.organization_id) == (
        "Renamed Inc"
    )


async def test_agent_lifecycle(api: Api, acme: Tenant) -> None:
    status, agent = await api.call(
        "POST",
        "/agents",
        acme.owner_key,
        json={"name": "Front desk", "callerType": "INBOUND", "configuration": {"llm": {"provider": "openai"}}},
    )
    assert status == 201
    assert agent["name"] == "Front desk"
    assert agent["organizationId"] == acme.organization_id
    assert agent["configuration"]["llm"][0]["provider"] == "openai"  # stored normalised, defaults filled
    assert agent.pop("warnings") == []  # no transfer it cannot make
    status, fetched = await api.call("GET", f"/agents/{agent['id']}", acme.owner_key)
    assert status == 200 and fetched == agent
    status, updated = await api.call(
        "PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"status": "INACTIVE", "description": "Nights"}
    )
    assert status == 200
    assert (updated["status"], updated["description"], updated["name"]) == ("INACTIVE", "Nights", "Front desk")
    _, inactive = await api.call("GET", "/agents?status=INACTIVE", acme.owner_key)
    assert [a["id"] for a in inactive["data"]] == [agent["id"]]
    _, active = await api.call("GET", "/agents?status=ACTIVE", acme.owner_key)
    assert agent["id"] not in [a["id"] for a in active["data"]]
    assert (await api.call("DELETE", f"/agents/{agent['id']}", acme.owner_key))[0] == 204
    assert (await api.call("GET", f"/agents/{agent['id']}", acme.owner_key))[0] == 404


async def test_an_agent_configuration_error_names_its_path(api: Api, acme: Tenant) -> None:
    status, body = await api.call(
        "POST", "/agents", acme.owner_key, json={"name": "Bad", "configuration": {"llm": {"provider": "nobody"}}}
    )
    assert status == 422
    assert body["error"]["field"] == "configuration.llm.provider"
    assert "nobody" in body["error"]["message"]


async def test_an_agent_saved_with_a_bad_transfer_destination_is_refused_naming_it(api: Api, acme: Tenant) -> None:
    billing = {"number": "+14155550199", "label": "Billing"}
    status, agent = await api.call(
        "POST",
        "/agents",
        acme.owner_key,
        json={"name": "Desk", "configuration": {"transfer": {"destinations": [billing]}}},
    )
    assert (status, agent["configuration"]["transfer"]["destinations"][0]["number"]) == (201, "+14155550199")

    wildcard = {"pattern": "+1415555", "label": "Support"}
    status, body = await api.call(
        "PATCH",
        f"/agents/{agent['id']}",
        acme.owner_key,
        json={"configuration": {"transfer": {"destinations": [billing, wildcard]}}},
    )
    assert (status, body["error"]["field"]) == (422, "configuration.transfer.destinations[1].pattern")
    assert "one '*' per remaining digit" in body["error"]["message"]


async def test_an_agent_variable_named_like_a_built_in_prompt_variable_is_refused_naming_it(
    api: Api, acme: Tenant
) -> None:
    # {{today}} would read "Monday special" in every call, or the user's "Monday special" would be lost: renamed.
    variables = {"plan": "gold", "today": "Monday special"}
    status, body = await api.call(
        "POST", "/agents", acme.owner_key, json={"name": "Dated", "configuration": {"variables": variables}}
    )
    assert (status, body["error"]["field"]) == (422, "configuration.variables.today"), body
    assert body["error"]["message"] == (
        "body configuration.variables.today: a variable named 'today' would hide the built-in prompt variable "
        "{{today}} (the date of the call), which every call fills in; rename it"
    )

    _, agent = await api.call("POST", "/agents", acme.owner_key, json={"name": "Dated"})
    status, body = await api.call(
        "PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"configuration": {"variables": {"customer": "VIP"}}}
    )
    assert (status, body["error"]["field"]) == (422, "configuration.variables.customer"), body
    status, body = await api.call(
        "PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"configuration": {"variables": {"customer.plan": "x"}}}
    )
    assert (status, body["configuration"]["variables"]) == (200, {"customer.plan": "x"})  # adds to {{customer.…}}


async def test_an_update_cannot_null_a_required_field(api: Api, acme: Tenant) -> None:
    _, agent = await api.call("POST", "/agents", acme.owner_key, json={"name": "Keeps its name"})
    status, body = await api.call("PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"name": None})
    assert status == 422
    assert_error(body, "validation_error", "name")
    assert (await api.call("GET", f"/agents/{agent['id']}", acme.owner_key))[1]["name"] == "Keeps its name"


async def test_an_agent_cannot_use_another_organizations_number(api: Api, acme: Tenant, globex: Tenant) -> None:
    _, number = await api.call("POST", "/phone-numbers", globex.owner_key, json={"phoneNumber": "+14155550999"})
    status, body = await api.call(
        "POST", "/agents", acme.owner_key, json={"name": "Thief", "phoneNumberId": number["id"]}
    )
    assert status == 422
    assert_error(body, "invalid_reference", "phoneNumberId")


async def test_an_agent_configuration_naming_another_organizations_path_or_tool_is_refused_naming_it(
    api: Api, acme: Tenant, globex: Tenant
) -> None:
    _, their_path = await api.call("POST", "/conversation-paths", globex.owner_key, json={"name": "Theirs"})
    _, their_tool = await api.call("POST", "/tools", globex.owner_key, json={"name": "Their key"})
    _, own_path = await api.call("POST", "/conversation-paths", acme.owner_key, json={"name": "Ours, not linked yet"})
    _, agent = await api.call("POST", "/agents", acme.owner_key, json={"name": "Configured"})
    path_llm = {"llm": [{"provider": "conversation_path", "conversation_path_id": their_path["id"]}]}
    tool_key = {"llm": [{"provider": "openai", "api_key_ref": f"tool:{their_tool['id']}"}]}
    for configuration, field in (
        (path_llm, "configuration.llm[0].conversation_path_id"),
        (tool_key, "configuration.llm[0].api_key_ref"),
    ):
        status, body = await api.call(
            "POST", "/agents", acme.owner_key, json={"name": "Borrower", "configuration": configuration}
        )
        assert status == 422
        assert_error(body, "invalid_reference", field)
        status, body = await api.call(
            "PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"configuration": configuration}
        )
        assert status == 422
        assert_error(body, "invalid_reference", field)
    own = {"llm": [{"provider": "conversation_path", "conversation_path_id": own_path["id"]}]}
    status, saved = await api.call("PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"configuration": own})
    assert status == 200
    assert saved["configuration"]["llm"][0]["conversation_path_id"] == own_path["id"]


async def test_agent_links_to_knowledge_bases_tools_and_paths(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    _, agent = await api.call("POST", "/agents", acme.owner_key, json={"name": "Linked"})
    _, kb = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "FAQ"})
    _, tool = await api.call("POST", "/tools", acme.owner_key, json={"name": "Calendar"})
    _, path = await api.call("POST", "/conversation-paths", acme.owner_key, json={"name": "Booking"})
    for collection, target in (("knowledge-bases", kb), ("tools", tool), ("conversation-paths", path)):
        url = f"/agents/{agent['id']}/{collection}/{target['id']}"
        assert (await api.call("PUT", url, acme.owner_key))[0] == 204
        assert (await api.call("PUT", url, acme.owner_key))[0] == 204  # idempotent
    links = await pool.fetchval(
        """SELECT (SELECT count(*) FROM "AgentKnowledgeBase" WHERE "agentId" = $1)
                + (SELECT count(*) FROM "AgentTool" WHERE "agentId" = $1)
                + (SELECT count(*) FROM "AgentConversationPath" WHERE "agentId" = $1)""",
        agent["id"],
    )
    assert links == 3
    status, bundle = await api.call("GET", f"/agents/{agent['id']}/bundle", acme.owner_key)
    assert status == 200
    assert bundle["agent"]["id"] == agent["id"]
    assert [kb_["id"] for kb_ in bundle["knowledgeBases"]] == [kb["id"]]
    assert bundle["knowledgeBases"][0]["documents"] == []
    assert [t["id"] for t in bundle["tools"]] == [tool["id"]]
    assert "configuration" not in bundle["tools"][0]
    assert [p["id"] for p in bundle["conversationPaths"]] == [path["id"]]
    assert (bundle["phoneNumber"], bundle["voice"]) == (None, None)
    assert (await api.call("DELETE", f"/agents/{agent['id']}/tools/{tool['id']}", acme.owner_key))[0] == 204
    status, body = await api.call("DELETE", f"/agents/{agent['id']}/tools/{tool['id']}", acme.owner_key)
    assert status == 404
    status, body = await api.call("PUT", f"/agents/{agent['id']}/tools/nosuchtool", acme.owner_key)
    assert status == 404
    assert_error(body, "not_found")


async def test_phone_numbers(api: Api, acme: Tenant, globex: Tenant) -> None:
    status, number = await api.call(
        "POST", "/phone-numbers", acme.owner_key, json={"phoneNumber": "+1 (415) 555-0100", "label": "Support"}
    )
    assert status == 201
    assert number["phoneNumber"] == "+14155550100"
    status, body = await api.call("POST", "/phone-numbers", globex.owner_key, json={"phoneNumber": "+14155550100"})
    assert status == 409
    assert_error(body, "already_exists", "phoneNumber")
    status, body = await api.call("POST", "/phone-numbers", acme.owner_key, json={"phoneNumber": "555-0100"})
    assert status == 422
    assert_error(body, "invalid_value", "phoneNumber")
    status, updated = await api.call(
        "PATCH", f"/phone-numbers/{number['id']}", acme.owner_key, json={"inboundStatus": "DISABLED", "label": None}
    )
    assert status == 200
    assert (updated["inboundStatus"], updated["outboundStatus"], updated["label"]) == ("DISABLED", "ENABLED", None)
    assert (await api.call("DELETE", f"/phone-numbers/{number['id']}", acme.owner_key))[0] == 204


async def test_voices_system_ones_are_read_only(api: Api, pool: asyncpg.Pool, acme: Tenant, globex: Tenant) -> None:
    system = await voices.upsert_system_voice(pool, name="June", provider="elevenlabs", provider_voice_id="june-api")
    status, custom = await api.call(
        "POST", "/voices", acme.owner_key, json={"name": "Our CEO", "provider": "elevenlabs", "tags": ["warm"]}
    )
    assert status == 201
    assert custom["isCustom"] is True and custom["tags"] == ["warm"]
    _, listed = await api.call("GET", "/voices", acme.owner_key)
    ids = [v["id"] for v in listed["data"]]
    assert system.id in ids and custom["id"] in ids
    _, only_custom = await api.call("GET", "/voices?custom=true", acme.owner_key)
    assert [v["id"] for v in only_custom["data"]] == [custom["id"]]
    _, globex_voices = await api.call("GET", "/voices", globex.owner_key)
    assert custom["id"] not in [v["id"] for v in globex_voices["data"]]
    status, body = await api.call("DELETE", f"/voices/{system.id}", acme.owner_key)
    assert status == 409
    assert_error(body, "read_only")
    status, body = await api.call("PATCH", f"/voices/{system.id}", acme.owner_key, json={"name": "Mine now"})
    assert status == 409
    status, renamed = await api.call("PATCH", f"/voices/{custom['id']}", acme.owner_key, json={"name": "Founder"})
    assert status == 200 and renamed["name"] == "Founder"
    assert (await api.call("DELETE", f"/voices/{custom['id']}", acme.owner_key))[0] == 204


async def test_knowledge_base_documents_are_counted(api: Api, acme: Tenant) -> None:
    _, kb = await api.call("POST", "/knowledge-bases", acme.owner_key, json={"name": "Policies"})
    assert kb["status"] == "EMPTY"
    status, doc = await api.call(
        "POST",
        f"/knowledge-bases/{kb['id']}/documents",
        acme.owner_key,
        json={"name": "Hours", "type": "TEXT", "content": "Open 9 to 5"},
    )
    assert status == 201 and doc["status"] == "PROCESSING"
    _, counted = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    # The engine's ingestion worker may already have read it (tests/test_knowledge_api.py follows that through).
    assert counted["textCount"] == 1 and counted["status"] in {"PROCESSING", "READY"}
    _, docs = await api.call("GET", f"/knowledge-bases/{kb['id']}/documents", acme.owner_key)
    assert [d["id"] for d in docs["data"]] == [doc["id"]]
    assert (await api.call("DELETE", f"/knowledge-bases/{kb['id']}/documents/{doc['id']}", acme.owner_key))[0] == 204
    _, emptied = await api.call("GET", f"/knowledge-bases/{kb['id']}", acme.owner_key)
    assert (emptied["textCount"], emptied["status"]) == (0, "EMPTY")
    status, body = await api.call(
        "POST", f"/knowledge-bases/{kb['id']}/documents", acme.owner_key, json={"name": "Site", "type": "WEBSITE"}
    )
    assert status == 422
    assert_error(body, "validation_error")
    status, renamed = await api.call("PATCH", f"/knowledge-bases/{kb['id']}", acme.owner_key, json={"name": "Rules"})
    assert status == 200 and renamed["name"] == "Rules"
    assert (await api.call("DELETE", f"/knowledge-bases/{kb['id']}", acme.owner_key))[0] == 204
    assert (await api.call("GET", f"/knowledge-bases/{kb['id']}/documents", acme.owner_key))[0] == 404


async def test_conversation_paths(api: Api, acme: Tenant) -> None:
    nodes = [{"id": "start", "type": "speak", "data": {"text": "Hello"}}]
    status, path = await api.call(
        "POST", "/conversation-paths", acme.owner_key, json={"name": "Greeting", "useCase": "support", "nodes": nodes}
    )
    assert status == 201 and path["nodes"] == nodes and path["edges"] == []
    edges = [{"id": "e1", "source": "start", "target": "start"}]
    status, updated = await api.call(
        "PATCH", f"/conversation-paths/{path['id']}", acme.owner_key, json={"edges": edges}
    )
    assert status == 200 and updated["edges"] == edges and updated["nodes"] == nodes
    assert (await api.call("DELETE", f"/conversation-paths/{path['id']}", acme.owner_key))[0] == 204


async def test_tool_configuration_is_write_only(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    secret = "cal-secret-token-123"
    status, tool = await api.call(
        "POST", "/tools", acme.owner_key, json={"name": "Calendar", "configuration": {"apiKey": secret}}
    )
    assert status == 201
    assert tool["configurationKeys"] == ["apiKey"]
    assert secret not in str(tool)
    _, listed = await api.call("GET", "/tools", acme.owner_key)
    assert secret not in str(listed)
    stored = await pool.fetchval('SELECT "configuration" FROM "Tool" WHERE "id" = $1', tool["id"])
    assert stored == {"apiKey": secret}
    status, updated = await api.call("PATCH", f"/tools/{tool['id']}", acme.owner_key, json={"isConnected": True})
    assert status == 200 and updated["isConnected"] is True and updated["configurationKeys"] == ["apiKey"]
    assert (await api.call("DELETE", f"/tools/{tool['id']}", acme.owner_key))[0] == 204


async def test_a_body_value_of_another_json_type_is_refused_not_converted(api: Api, acme: Tenant) -> None:
    _, tool = await api.call("POST", "/tools", acme.owner_key, json={"name": "Strict"})
    for changes, field in (
        ({"isConnected": 0}, "isConnected"),
        ({"isConnected": "true"}, "isConnected"),
        ({"name": 5}, "name"),
    ):
        status, body = await api.call("PATCH", f"/tools/{tool['id']}", acme.owner_key, json=changes)
        assert (status, body["error"]["code"], body["error"]["field"]) == (422, "validation_error", field), changes
    status, body = await api.call(
        "POST", "/api-keys", acme.owner_key, json={"name": "ci", "expirationDate": 1764000000}
    )
    assert (status, body["error"]["field"]) == (422, "expirationDate")
    _, unchanged = await api.call("GET", f"/tools/{tool['id']}", acme.owner_key)
    assert unchanged["isConnected"] is False


async def test_events(api: Api, acme: Tenant, globex: Tenant) -> None:
    _, agent = await api.call("POST", "/agents", acme.owner_key, json={"name": "Notifier"})
    status, event = await api.call(
        "POST",
        "/events",
        acme.owner_key,
        json={"name": "call.ended", "webhookUrl": "https://hooks.example.com/calls", "agentId": agent["id"]},
    )
    assert status == 201 and event["agentId"] == agent["id"] and event["isEnabled"] is True
    status, body = await api.call(
        "POST", "/events", acme.owner_key, json={"name": "call.ended", "webhookUrl": "ftp://example.com"}
    )
    assert status == 422
    assert_error(body, "invalid_value", "webhookUrl")
    _, other_agent = await api.call("POST", "/agents", globex.owner_key, json={"name": "Theirs"})
    status, body = await api.call(
        "PATCH", f"/events/{event['id']}", acme.owner_key, json={"agentId": other_agent["id"]}
    )
    assert status == 422
    assert_error(body, "invalid_reference", "agentId")
    status, updated = await api.call(
        "PATCH", f"/events/{event['id']}", acme.owner_key, json={"isEnabled": False, "agentId": None}
    )
    assert status == 200 and updated["isEnabled"] is False and updated["agentId"] is None
    assert (await api.call("DELETE", f"/events/{event['id']}", acme.owner_key))[0] == 204


async def test_api_keys_show_the_key_once(api: Api, pool: asyncpg.Pool, acme: Tenant) -> None:
    status, created = await api.call("POST", "/api-keys", acme.owner_key, json={"name": "CI", "mode": "test"})
    assert status == 201
    key = created["key"]
    assert key.startswith("sk_test_") and len(key) >= len("sk_test_") + 43
    assert key.startswith(created["keyPrefix"])
    stored = await pool.fetchval('SELECT "key" FROM "ApiKey" WHERE "id" = $1', created["id"])
    assert stored != key and len(stored) == 64  # a SHA-256 hex digest, not the key
    _, listed = await api.call("GET", "/api-keys", acme.owner_key)
    assert key not in str(listed)
    assert created["id"] in [k["id"] for k in listed["data"]]
    status, fetched = await api.call("GET", f"/api-keys/{created['id']}", acme.owner_key)
    assert status == 200 and "key" not in fetched
    assert (await api.call("GET", "/organization", key))[0] == 200
    status, revoked = await api.call("POST", f"/api-keys/{created['id']}/revoke", acme.owner_key)
    assert status == 200 and revoked["status"] == "REVOKED"
    assert (await api.call("GET", "/organization", key))[0] == 401


async def test_an_api_key_cannot_expire_in_the_past(api: Api, acme: Tenant) -> None:
    status, body = await api.call(
        "POST", "/api-keys", acme.owner_key, json={"name": "old", "expirationDate": "2020-01-01T00:00:00Z"}
    )
    assert status == 422
    assert_error(body, "validation_error", "expirationDate")


async def test_an_api_key_can_be_given_an_expiration_date(api: Api, acme: Tenant) -> None:
    status, created = await api.call(
        "POST", "/api-keys", acme.owner_key, json={"name": "contractor", "expirationDate": "2099-01-01T00:00:00+02:00"}
    )
    assert status == 201, created
    assert created["expirationDate"].startswith("2098-12-31T22:00:00")


async def test_a_key_that_expires_makes_only_keys_that_expire_no_later(api: Api, acme: Tenant) -> None:
    expires = "2099-01-01T00:00:00Z"
    status, short = await api.call(
        "POST", "/api-keys", acme.owner_key, json={"name": "contractor", "expirationDate": expires}
    )
    assert status == 201, short
    status, body = await api.call(
        "POST", "/api-keys", short["key"], json={"name": "forever", "expirationDate": "2100-01-01T00:00:00Z"}
    )
    assert status == 422, body
    assert_error(body, "invalid_value", "expirationDate")
    status, made = await api.call("POST", "/api-keys", short["key"], json={"name": "no date"})
    assert status == 201 and made["expirationDate"].startswith("2099-01-01T00:00:00"), made
    status, sooner = await api.call(
        "POST", "/api-keys", short["key"], json={"name": "sooner", "expirationDate": "2098-01-01T00:00:00Z"}
    )
    assert status == 201 and sooner["expirationDate"].startswith("2098-01-01T00:00:00"), sooner
    status, forever = await api.call("POST", "/api-keys", acme.owner_key, json={"name": "owner's"})
    assert status == 201 and forever["expirationDate"] is None  # a key that never expires makes any key


async def test_lists_page_newest_first_with_cursors(api: Api, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Pager")
    made = [(await api.call("POST", "/tools", tenant.owner_key, json={"name": f"Tool {n}"}))[1]["id"] for n in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        path = "/tools?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await api.call("GET", path, tenant.owner_key)
        assert status == 200
        seen += [t["id"] for t in page["data"]]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(made))


def forged_cursor(when: str, id: str) -> str:
    """A cursor made as the API makes one, holding what the API never would."""
    raw = json.dumps([when, id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "bm90LWEtY3Vyc29y",
        forged_cursor("2026-01-01T00:00:00", "t0"),
        forged_cursor("0001-01-01T00:00:00+14:00", "t0"),
        forged_cursor("9999-12-31T23:59:59-14:00", "t0"),
        forged_cursor("2026-01-01T00:00:00+00:00", "t\x00"),
        forged_cursor("2026-01-01T00:00:00+00:00", "\ud800"),
    ],
    ids=["not a cursor", "no offset", "before year 1 in UTC", "after year 9999 in UTC", "NUL in the id", "surrogate"],
)
async def test_a_cursor_this_api_did_not_issue_is_422(api: Api, acme: Tenant, cursor: str) -> None:
    status, body = await api.call("GET", f"/tools?cursor={cursor}", acme.owner_key)
    assert status == 422
    assert_error(body, "validation_error", "cursor")
