"""Saving a conversation path through the API checks it as a whole; errors name the node or edge and the field."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import asyncpg
import pytest

from pipelines.paths.graph import MAX_ID_CHARS, read_path
from storage.demo import DEMO_PATH_EDGES, DEMO_PATH_NODES
from tests.paths import (
    EVERY_TYPE_EDGES,
    EVERY_TYPE_NODES,
    PASSING_LOOP_EDGES,
    PASSING_LOOP_NODES,
    TRANSFER_TO,
    VARIABLES_PATH_EDGES,
    VARIABLES_PATH_NODES,
)
from tests.test_api_auth import Api, Tenant, assert_error, make_tenant


@pytest.fixture(scope="module")
async def acme(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Paths Inc")


def nodes() -> list[dict[str, Any]]:
    """A fresh copy of the path with every node type."""
    return copy.deepcopy(EVERY_TYPE_NODES)


def edges() -> list[dict[str, Any]]:
    """A fresh copy of its edges."""
    return copy.deepcopy(EVERY_TYPE_EDGES)


async def refused(api: Api, acme: Tenant, graph_nodes: Any, graph_edges: Any, field: str) -> str:
    """POST the graph, expect 422 naming `field`; the message."""
    status, body = await api.call(
        "POST", "/conversation-paths", acme.owner_key, json={"name": "Bad", "nodes": graph_nodes, "edges": graph_edges}
    )
    assert status == 422, body
    assert_error(body, "invalid_value", field)
    message: str = body["error"]["message"]
    return message


async def test_a_path_with_every_node_type_is_saved_as_sent(api: Api, acme: Tenant) -> None:
    status, path = await api.call(
        "POST", "/conversation-paths", acme.owner_key, json={"name": "All", "nodes": nodes(), "edges": edges()}
    )
    assert status == 201, path
    assert path["nodes"] == EVERY_TYPE_NODES and path["edges"] == EVERY_TYPE_EDGES


async def test_a_path_whose_lines_hold_variables_is_saved_as_sent(api: Api, acme: Tenant) -> None:
    body = {"name": "Variables", "nodes": VARIABLES_PATH_NODES, "edges": VARIABLES_PATH_EDGES}
    status, path = await api.call("POST", "/conversation-paths", acme.owner_key, json=body)
    assert status == 201, path
    assert path["nodes"] == VARIABLES_PATH_NODES


async def test_the_demo_path_and_an_empty_draft_are_accepted(api: Api, acme: Tenant) -> None:
    for body in ({"name": "Demo", "nodes": DEMO_PATH_NODES, "edges": DEMO_PATH_EDGES}, {"name": "Draft"}):
        status, saved = await api.call("POST", "/conversation-paths", acme.owner_key, json=body)
        assert status == 201, saved


async def test_an_unknown_node_type_is_refused_naming_the_node(api: Api, acme: Tenant) -> None:
    graph = nodes()
    graph[6]["type"] = "dance"
    message = await refused(api, acme, graph, edges(), "nodes[6].type")
    assert "'listen'" in message and "dance" in message


async def test_an_edge_to_a_missing_node_is_refused_naming_the_edge(api: Api, acme: Tenant) -> None:
    graph = edges()
    graph[2]["target"] = "nowhere"
    message = await refused(api, acme, nodes(), graph, "edges[2].target")
    assert "'got-account'" in message and "'nowhere'" in message


async def test_an_unreachable_node_is_refused(api: Api, acme: Tenant) -> None:
    graph = [edge for edge in edges() if edge["id"] != "menu-done" and edge["id"] != "answered"]
    message = await refused(api, acme, nodes(), graph, "nodes[8]")
    assert "'menu'" in message and "cannot be reached" in message


async def test_an_id_longer_than_the_limit_is_refused_on_save_and_still_runs_from_storage(
    api: Api, acme: Tenant
) -> None:
    # Ids are written with every turn of every call on the path and labelled in the metrics.
    long_id = "n" * (MAX_ID_CHARS + 1)
    graph_nodes, graph_edges = nodes(), edges()
    old_id = graph_nodes[3]["id"]
    graph_nodes[3]["id"] = long_id
    for edge in graph_edges:
        edge["source"] = long_id if edge["source"] == old_id else edge["source"]
        edge["target"] = long_id if edge["target"] == old_id else edge["target"]
    message = await refused(api, acme, graph_nodes, graph_edges, "nodes[3].id")
    assert f"at most {MAX_ID_CHARS}" in message
    assert long_id in read_path(graph_nodes, graph_edges, strict=False).nodes  # stored before the limit: it runs

    graph_edges = edges()
    graph_edges[1]["id"] = "e" * (MAX_ID_CHARS + 1)
    await refused(api, acme, nodes(), graph_edges, "edges[1].id")


async def test_two_start_nodes_are_refused(api: Api, acme: Tenant) -> None:
    graph = nodes()
    graph[3]["data"]["isStart"] = True
    message = await refused(api, acme, graph, edges(), "nodes[3].data.isStart")
    assert "'billing'" in message and "'greet'" in message


@pytest.mark.parametrize(
    ("index", "data", "field"),
    [
        (1, {"variable": "account"}, "nodes[1].data"),  # a gather that can never complete
        (1, {"variable": "account", "digitCount": 99}, "nodes[1].data.digitCount"),
        (11, {"number": "call Bob"}, "nodes[11].data.number"),
        (8, {"digits": "12x"}, "nodes[8].data.digits"),
        (0, {"isStart": True, "txt": "typo"}, "nodes[0].data.text"),
        (2, {"tool": "look up!"}, "nodes[2].data.tool"),
        (10, {"keywords": ["human"]}, "nodes[10].data.condition"),
    ],
)
async def test_a_node_field_that_is_wrong_for_its_type_is_named(
    api: Api, acme: Tenant, index: int, data: dict[str, Any], field: str
) -> None:
    graph = nodes()
    graph[index]["data"] = data
    message = await refused(api, acme, graph, edges(), field)
    assert f"'{graph[index]['id']}'" in message


@pytest.mark.parametrize(
    ("index", "key", "value", "field"),
    [
        (1, "variable", "today", "nodes[1].data.variable"),  # a gather node's keys
        (2, "variable", "now", "nodes[2].data.variable"),  # a webhook's reply
        (0, "extractVariables", [{"name": "plan"}, {"name": "customer"}], "nodes[0].data.extractVariables.1.name"),
    ],
)
async def test_a_variable_named_like_a_built_in_prompt_variable_is_refused_and_a_stored_one_still_runs(  # noqa: PLR0917
    api: Api, acme: Tenant, index: int, key: str, value: Any, field: str
) -> None:
    # What the path gathers would take the built-in's place in the nodes' instructions ({{customer.name}} empty).
    graph = nodes()
    graph[index]["data"][key] = value
    message = await refused(api, acme, graph, edges(), field)
    assert f"'{graph[index]['id']}'" in message and "would hide the built-in prompt variable {{" in message
    assert message.endswith("; rename it")
    assert read_path(graph, edges(), strict=False).nodes[graph[index]["id"]]  # stored before the rule: it runs


async def test_an_edge_out_of_an_end_node_is_refused(api: Api, acme: Tenant) -> None:
    graph = [*edges(), {"id": "after-end", "source": "goodbye", "target": "greet"}]
    message = await refused(api, acme, nodes(), graph, f"edges[{len(graph) - 1}].source")
    assert "'after-end'" in message


async def test_a_loop_a_call_would_go_round_without_the_caller_is_refused(api: Api, acme: Tenant) -> None:
    # Touch tones and a webhook need nobody to answer: round and round, the call would never stop.
    message = await refused(api, acme, PASSING_LOOP_NODES, PASSING_LOOP_EDGES, "nodes[1]")
    assert "'tones' → 'check' → 'tones'" in message and "give one of them an edge" in message


@pytest.mark.parametrize(
    "done",
    [
        {"source": "check", "data": {"result": "success"}},
        {"source": "menu", "data": {"keywords": ["bye"]}},  # no success edge: the call stays at the webhook node
    ],
)
async def test_a_webhook_retried_on_failure_that_stops_on_success_is_saved(
    api: Api, acme: Tenant, done: dict[str, Any]
) -> None:
    graph_nodes = [*PASSING_LOOP_NODES, {"id": "bye", "type": "end", "data": {"text": "Goodbye."}}]
    graph_edges = [edge for edge in PASSING_LOOP_EDGES if edge["id"] != "again"] + [
        {"id": "retry", "source": "check", "target": "tones", "data": {"result": "failure"}},
        {"id": "done", "target": "bye", **done},
    ]
    body = {"name": "Retry", "nodes": graph_nodes, "edges": graph_edges}
    status, saved = await api.call("POST", "/conversation-paths", acme.owner_key, json=body)
    assert status == 201, saved


@pytest.mark.parametrize(
    ("source", "data", "rule"),
    [
        ("tones", {}, "node 'tones' (press_digits) always follows its first edge, 'to-check'"),
        ("check", {}, "node 'check' (webhook) follows its first edge for each result ('again' on success, 'again'"),
    ],
)
async def test_an_edge_out_of_a_node_passed_through_that_no_call_can_take_is_refused(
    api: Api, acme: Tenant, source: str, data: dict[str, Any], rule: str
) -> None:
    # Tones and webhooks pass on by their first edge (a webhook's first for each result): a second is never taken.
    graph_nodes = [*PASSING_LOOP_NODES, {"id": "bye", "type": "end", "data": {"text": "Goodbye."}}]
    graph_edges = [edge for edge in PASSING_LOOP_EDGES if edge["id"] != "again"] + [
        {"id": "again", "source": "check", "target": "bye"},
        {"id": "unused", "source": source, "target": "bye", "data": data},
    ]
    message = await refused(api, acme, graph_nodes, graph_edges, "edges[3]")
    assert message.startswith(f"edges[3]: edge 'unused' is never taken: {rule}")


async def test_a_patch_that_breaks_the_path_is_refused_and_changes_nothing(api: Api, acme: Tenant) -> None:
    status, path = await api.call(
        "POST", "/conversation-paths", acme.owner_key, json={"name": "Keep", "nodes": nodes(), "edges": edges()}
    )
    assert status == 201
    broken = edges()
    broken[0]["source"] = "ghost"
    status, body = await api.call(
        "PATCH", f"/conversation-paths/{path['id']}", acme.owner_key, json={"edges": broken, "name": "Changed"}
    )
    assert status == 422
    assert_error(body, "invalid_value", "edges[0].source")
    status, kept = await api.call("GET", f"/conversation-paths/{path['id']}", acme.owner_key)
    assert status == 200 and kept["name"] == "Keep" and kept["edges"] == EVERY_TYPE_EDGES
    # Nodes alone are checked against the stored edges: dropping a node an edge needs is refused.
    status, body = await api.call(
        "PATCH", f"/conversation-paths/{path['id']}", acme.owner_key, json={"nodes": nodes()[:-1]}
    )
    assert status == 422
    assert_error(body, "invalid_value", "edges[11].target")


async def waiting_for_locks(pool: asyncpg.Pool, statements: int) -> None:
    """Return once `statements` backends wait for a lock another transaction holds."""
    for _ in range(1000):
        waiting = await pool.fetchval("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted")
        if waiting >= statements:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{statements} statements did not wait for a lock within 10 s")


async def test_two_patches_racing_never_save_a_graph_neither_checked(
    api: Api, pool: asyncpg.Pool, acme: Tenant
) -> None:
    # One editor swaps node b for c (nodes and edges), another adds an edge back from b (edges alone, checked
    # against the nodes it read): applied one after the other unchecked, edges would lead to b, which is gone.
    start = {"id": "start", "type": "speak", "data": {"text": "Hello"}}
    b, c = ({"id": name, "type": "speak", "data": {"text": name}} for name in ("b", "c"))
    status, path = await api.call(
        "POST",
        "/conversation-paths",
        acme.owner_key,
        json={"name": "Raced", "nodes": [start, b], "edges": [{"id": "e1", "source": "start", "target": "b"}]},
    )
    assert status == 201, path
    url = f"/conversation-paths/{path['id']}"
    swap = {"nodes": [start, c], "edges": [{"id": "e1", "source": "start", "target": "c"}]}
    loop_back = {
        "edges": [{"id": "e1", "source": "start", "target": "b"}, {"id": "e2", "source": "b", "target": "start"}]
    }
    async with pool.acquire() as conn, conn.transaction():
        # Hold the row so both PATCHes are under way before either writes.
        await conn.execute('SELECT 1 FROM "ConversationPath" WHERE "id" = $1 FOR UPDATE', path["id"])
        patches = asyncio.gather(
            api.call("PATCH", url, acme.owner_key, json=swap), api.call("PATCH", url, acme.owner_key, json=loop_back)
        )
        await waiting_for_locks(pool, 2)
    answers = await patches
    assert sorted(status for status, _ in answers) == [200, 422], answers
    _, saved = await api.call("GET", url, acme.owner_key)
    read_path(saved["nodes"], saved["edges"], strict=True)  # what is stored is a graph the API would accept


async def test_a_linked_path_is_made_the_agents_default_and_comes_first_in_its_bundle(api: Api, acme: Tenant) -> None:
    # The path's transfer node must be one the agent may make (else the link is refused: test_path_transfer_checks).
    desk = {"transfer": {"destinations": [{"number": TRANSFER_TO, "label": "Desk"}]}}
    status, agent = await api.call("POST", "/agents", acme.owner_key, json={"name": "Desk", "configuration": desk})
    assert status == 201
    ids = []
    for name in ("First", "Second"):
        status, path = await api.call(
            "POST", "/conversation-paths", acme.owner_key, json={"name": name, "nodes": nodes(), "edges": edges()}
        )
        assert status == 201
        ids.append(path["id"])
        status, _ = await api.call("PUT", f"/agents/{agent['id']}/conversation-paths/{path['id']}", acme.owner_key)
        assert status == 204
    _, bundle = await api.call("GET", f"/agents/{agent['id']}/bundle", acme.owner_key)
    assert [path["id"] for path in bundle["conversationPaths"]] == ids  # link order
    for default in (ids[1], ids[0], ids[1]):
        status, body = await api.call(
            "PUT", f"/agents/{agent['id']}/conversation-paths/{default}/default", acme.owner_key
        )
        assert status == 204, body
        _, bundle = await api.call("GET", f"/agents/{agent['id']}/bundle", acme.owner_key)
        assert bundle["conversationPaths"][0]["id"] == default
    status, draft = await api.call("POST", "/conversation-paths", acme.owner_key, json={"name": "Unlinked"})
    status, body = await api.call(
        "PUT", f"/agents/{agent['id']}/conversation-paths/{draft['id']}/default", acme.owner_key
    )
    assert status == 404
    assert_error(body, "not_found")
