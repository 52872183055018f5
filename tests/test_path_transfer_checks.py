"""A path's transfer node its agent can never make is named before calls: pairing them is refused, editing one side
is saved with a warning."""

from __future__ import annotations

import copy
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from pipelines.conversation.transfer_rules import TransferRules
from pipelines.paths.transfer_check import TransferNode, UnmakeableTransfer, unmakeable_transfers
from storage import phone_numbers
from tests.paths import EVERY_TYPE_EDGES, EVERY_TYPE_NODES, TRANSFER_TO
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant

OTHER_DESK = "+16505557650"
ALLOWS_THE_PATH = {"transfer": {"destinations": [{"number": TRANSFER_TO, "label": "Front desk"}]}}
ALLOWS_ANOTHER = {"transfer": {"destinations": [{"number": OTHER_DESK, "label": "Back office"}]}}
TRANSFER_FIELD = f"nodes[{next(i for i, n in enumerate(EVERY_TYPE_NODES) if n['type'] == 'transfer')}].data.number"


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    """An organization with a US number, so its dial policy dials the US numbers these paths transfer to."""
    tenant = await make_tenant(pool, "Transfer Checks Inc")
    await phone_numbers.create_phone_number(pool, organization_id=tenant.organization_id, phone_number="+14155550100")
    return tenant


def graph(number: str = TRANSFER_TO) -> dict[str, Any]:
    """The path with a node of every type, its transfer node sending to `number`."""
    nodes = copy.deepcopy(EVERY_TYPE_NODES)
    next(node for node in nodes if node["type"] == "transfer")["data"]["number"] = number
    return {"nodes": nodes, "edges": copy.deepcopy(EVERY_TYPE_EDGES)}


async def new_agent(api: Api, tenant: Tenant, configuration: dict[str, Any]) -> str:
    status, agent = await api.call(
        "POST", "/agents", tenant.owner_key, json={"name": "Desk", "configuration": configuration}
    )
    assert status == 201, agent
    return str(agent["id"])


async def new_path(api: Api, tenant: Tenant, number: str = TRANSFER_TO) -> str:
    status, path = await api.call(
        "POST", "/conversation-paths", tenant.owner_key, json={"name": "Support", **graph(number)}
    )
    assert status == 201, path
    return str(path["id"])


async def linked_paths(api: Api, tenant: Tenant, agent_id: str) -> list[str]:
    _, bundle = await api.call("GET", f"/agents/{agent_id}/bundle", tenant.owner_key)
    return [path["id"] for path in bundle["conversationPaths"]]


def assert_names_the_node(message: str, *, agent_id: str, path_id: str, number: str = TRANSFER_TO) -> None:
    assert f"conversation path {path_id} node 'transfer' ({TRANSFER_FIELD}) transfers to {number}" in message
    assert f"agent {agent_id}" in message


def test_the_transfer_nodes_the_rules_refuse_are_listed_with_the_rules_reason() -> None:
    rules = TransferRules.from_config(parse_agent_configuration(ALLOWS_ANOTHER).transfer)
    refused = unmakeable_transfers(graph()["nodes"], graph()["edges"], rules)
    assert refused == [
        UnmakeableTransfer(TransferNode("transfer", TRANSFER_FIELD, TRANSFER_TO), rules.check(TRANSFER_TO).message)  # type: ignore[union-attr]
    ]
    assert "is not a number this agent may transfer to" in refused[0].reason
    allowed = TransferRules.from_config(parse_agent_configuration(ALLOWS_THE_PATH).transfer)
    assert unmakeable_transfers(graph()["nodes"], graph()["edges"], allowed) == []
    assert unmakeable_transfers([], [], rules) == []  # a draft has nothing a call could reach


async def test_linking_a_path_whose_transfer_the_agent_refuses_is_422_and_links_nothing(api: Api, acme: Tenant) -> None:
    agent_id, path_id = await new_agent(api, acme, ALLOWS_ANOTHER), await new_path(api, acme)
    status, body = await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{path_id}", acme.owner_key)
    assert status == 422, body
    assert_error(body, "invalid_value")
    assert_names_the_node(body["error"]["message"], agent_id=agent_id, path_id=path_id)
    assert "is not a number this agent may transfer to" in body["error"]["message"]
    assert await linked_paths(api, acme, agent_id) == []

    no_transfers = await new_agent(api, acme, {})
    status, body = await api.call("PUT", f"/agents/{no_transfers}/conversation-paths/{path_id}", acme.owner_key)
    assert status == 422, body
    assert "this agent cannot transfer calls" in body["error"]["message"]


async def test_a_path_whose_transfer_the_agent_allows_is_linked_and_made_default(api: Api, acme: Tenant) -> None:
    agent_id, path_id = await new_agent(api, acme, ALLOWS_THE_PATH), await new_path(api, acme)
    status, body = await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{path_id}", acme.owner_key)
    assert status == 204, body
    status, body = await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{path_id}/default", acme.owner_key)
    assert status == 204, body
    assert await linked_paths(api, acme, agent_id) == [path_id]


async def test_an_agent_configuration_that_refuses_a_linked_paths_transfer_is_saved_with_a_warning(
    api: Api, acme: Tenant
) -> None:
    agent_id, path_id = await new_agent(api, acme, ALLOWS_THE_PATH), await new_path(api, acme)
    assert (await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{path_id}", acme.owner_key))[0] == 204

    status, saved = await api.call(
        "PATCH", f"/agents/{agent_id}", acme.owner_key, json={"configuration": ALLOWS_ANOTHER}
    )
    assert status == 200, saved
    assert saved["configuration"]["transfer"]["destinations"][0]["number"] == OTHER_DESK  # saved all the same
    [warning] = saved["warnings"]
    assert (warning["agentId"], warning["conversationPathId"], warning["nodeId"], warning["field"]) == (
        agent_id,
        path_id,
        "transfer",
        TRANSFER_FIELD,
    )
    assert warning["number"] == TRANSFER_TO
    assert_names_the_node(warning["message"], agent_id=agent_id, path_id=path_id)

    status, saved = await api.call(
        "PATCH", f"/agents/{agent_id}", acme.owner_key, json={"configuration": ALLOWS_THE_PATH}
    )
    assert (status, saved["warnings"]) == (200, [])


async def test_making_a_path_the_default_of_an_agent_that_refuses_its_transfer_is_422(api: Api, acme: Tenant) -> None:
    agent_id, path_id = await new_agent(api, acme, ALLOWS_THE_PATH), await new_path(api, acme)
    other_id = await new_path(api, acme)
    for linked in (path_id, other_id):
        assert (await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{linked}", acme.owner_key))[0] == 204
    await api.call("PATCH", f"/agents/{agent_id}", acme.owner_key, json={"configuration": ALLOWS_ANOTHER})

    status, body = await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{other_id}/default", acme.owner_key)
    assert status == 422, body
    assert_names_the_node(body["error"]["message"], agent_id=agent_id, path_id=other_id)
    assert await linked_paths(api, acme, agent_id) == [path_id, other_id]  # the default is as it was


async def test_a_shared_paths_new_transfer_number_is_saved_warning_only_of_the_agents_that_refuse_it(
    api: Api, acme: Tenant
) -> None:
    path_id = await new_path(api, acme)
    allows_old = await new_agent(api, acme, ALLOWS_THE_PATH)
    allows_new = await new_agent(api, acme, {"transfer": {"destinations": [
        {"number": TRANSFER_TO, "label": "Front desk"}, {"number": OTHER_DESK, "label": "Back office"}
    ]}})  # fmt: skip
    for agent_id in (allows_old, allows_new):
        assert (await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{path_id}", acme.owner_key))[0] == 204

    status, saved = await api.call("PATCH", f"/conversation-paths/{path_id}", acme.owner_key, json=graph(OTHER_DESK))
    assert status == 200, saved
    assert saved["nodes"] == graph(OTHER_DESK)["nodes"]
    assert [(w["agentId"], w["number"]) for w in saved["warnings"]] == [(allows_old, OTHER_DESK)]
    assert_names_the_node(saved["warnings"][0]["message"], agent_id=allows_old, path_id=path_id, number=OTHER_DESK)

    status, saved = await api.call("PATCH", f"/conversation-paths/{path_id}", acme.owner_key, json=graph())
    assert (status, saved["warnings"]) == (200, [])


async def test_a_campaign_whose_agent_refuses_its_paths_transfer_is_422_at_its_path(api: Api, acme: Tenant) -> None:
    path_id = await new_path(api, acme)
    refusing, allowing = await new_agent(api, acme, ALLOWS_ANOTHER), await new_agent(api, acme, ALLOWS_THE_PATH)
    body = {"batchName": "Follow-ups", "conversationPathId": path_id}
    status, refused = await api.call("POST", "/campaigns", acme.owner_key, json={**body, "agentId": refusing})
    assert status == 422, refused
    assert refused["error"]["field"] == "conversationPathId"
    assert_names_the_node(refused["error"]["message"], agent_id=refusing, path_id=path_id)
    _, page = await api.call("GET", "/campaigns?limit=100", acme.owner_key)
    assert [c for c in page["data"] if c["agentId"] == refusing] == []  # nothing created

    status, created = await api.call("POST", "/campaigns", acme.owner_key, json={**body, "agentId": allowing})
    assert status == 201, created
    # The campaign pairs them as a link does: the agent's configuration is checked against its path too.
    status, saved = await api.call("PATCH", f"/agents/{allowing}", acme.owner_key, json={"configuration": {}})
    assert status == 200, saved
    assert [(w["conversationPathId"], w["nodeId"]) for w in saved["warnings"]] == [(path_id, "transfer")]


async def test_another_organization_neither_sees_the_warnings_nor_links_the_path(
    api: Api, acme: Tenant, pool: asyncpg.Pool
) -> None:
    agent_id, path_id = await new_agent(api, acme, ALLOWS_THE_PATH), await new_path(api, acme)
    assert (await api.call("PUT", f"/agents/{agent_id}/conversation-paths/{path_id}", acme.owner_key))[0] == 204
    await api.call("PATCH", f"/agents/{agent_id}", acme.owner_key, json={"configuration": {}})  # acme's own warning

    other = await make_tenant(pool, "Elsewhere Ltd")
    their_agent = await new_agent(api, other, {})
    status, saved = await api.call("PATCH", f"/agents/{their_agent}", other.owner_key, json={"name": "Theirs"})
    assert (status, saved["warnings"]) == (200, [])
    status, body = await api.call("PUT", f"/agents/{their_agent}/conversation-paths/{path_id}", other.owner_key)
    assert (status, body["error"]["code"]) == (404, "not_found"), body  # not a 422 describing acme's path
    status, body = await api.call(
        "POST",
        "/campaigns",
        other.owner_key,
        json={"batchName": "X", "agentId": their_agent, "conversationPathId": path_id},
    )
    assert (status, body["error"]["code"]) == (422, "invalid_reference"), body
    assert "transfers to" not in body["error"]["message"]


PREMIUM_RATE = "+19005550123"
UK_DESK = "+442079460000"


async def test_a_path_or_an_agent_whose_transfer_the_dial_policy_refuses_is_saved_with_a_warning(
    api: Api, acme: Tenant
) -> None:
    # Whatever an agent's rules say, the organization's dial policy refuses a premium-rate number and a country the
    # organization does not dial (acme has a US number only): every call that reaches such a transfer fails it.
    status, path = await api.call(
        "POST", "/conversation-paths", acme.owner_key, json={"name": "Premium", **graph(PREMIUM_RATE)}
    )
    assert status == 201, path
    [warning] = path["warnings"]
    assert (warning["agentId"], warning["conversationPathId"], warning["nodeId"], warning["field"]) == (
        None,
        path["id"],
        "transfer",
        TRANSFER_FIELD,
    )
    assert warning["number"] == PREMIUM_RATE
    assert f"transfers to {PREMIUM_RATE}, which the organization's dial policy refuses: " in warning["message"]
    assert "premium-rate" in warning["message"] and "PATCH /v1/organization/dial-policy" in warning["message"]
    status, saved = await api.call("PATCH", f"/conversation-paths/{path['id']}", acme.owner_key, json=graph())
    assert (status, saved["warnings"]) == (200, [])

    destinations = {"transfer": {"destinations": [
        {"number": TRANSFER_TO, "label": "Front desk"}, {"number": UK_DESK, "label": "London office"}
    ]}}  # fmt: skip
    status, agent = await api.call(
        "POST", "/agents", acme.owner_key, json={"name": "Desk", "configuration": destinations}
    )
    assert status == 201, agent
    [warning] = agent["warnings"]
    assert (warning["agentId"], warning["conversationPathId"], warning["nodeId"], warning["field"]) == (
        agent["id"],
        None,
        None,
        "configuration.transfer.destinations[1].number",
    )
    assert f"'London office' (configuration.transfer.destinations[1].number) is {UK_DESK}" in warning["message"]
    assert "United Kingdom" in warning["message"]

    # Once an OWNER opens the country, the same configuration saves with no warning.
    status, policy = await api.call(
        "PATCH", "/organization/dial-policy", acme.owner_key, json={"allowedCountries": ["GB", "US"]}
    )
    assert status == 200, policy
    status, saved = await api.call(
        "PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"configuration": destinations}
    )
    assert (status, saved["warnings"]) == (200, [])
    status, saved = await api.call("PATCH", f"/agents/{agent['id']}", acme.owner_key, json={"name": "Desk 2"})
    assert (status, saved["warnings"]) == (200, [])
    await api.call("PATCH", "/organization/dial-policy", acme.owner_key, json={"allowedCountries": None})
