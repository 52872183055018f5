"""Which addresses outbound webhooks and tool webhooks may reach: public ones only, checked on the address actually
connected to."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from pipelines.clients import ProviderClients
from pipelines.tools import TOOL_ERROR_PREFIX, AgentFunction, FunctionSpec, ToolRunner
from pipelines.url_safety import (
    PublicAddressResolver,
    UnsafeURL,
    check_public_address,
    ensure_public_url,
    literal_address,
)
from tests.webhook_receiver import webhook_receiver


class FixedResolver(AbstractResolver):
    """Answers every lookup with the given addresses, as a DNS server under someone else's control might."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": address, "port": port, "family": family, "proto": 0, "flags": 0}
            for address in self.addresses
        ]

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1%eth0",
        "::ffff:10.0.0.1",
        "::127.0.0.1",  # IPv4-compatible
        "64:ff9b::7f00:1",  # NAT64's well-known prefix in front of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # ... and of the metadata service
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_loopback_private_and_link_local_addresses_are_refused(address: str) -> None:
    with pytest.raises(UnsafeURL, match="not a public address"):
        check_public_address("hooks.example.com", address)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "64:ff9b::5db8:d822", "2002:5db8:d822::1"]
)
def test_public_addresses_pass(address: str) -> None:
    check_public_address("hooks.example.com", address)


def test_literal_addresses_are_recognised_and_names_are_not() -> None:
    assert literal_address("[::1]") == "::1"
    assert literal_address("127.0.0.1") == "127.0.0.1"
    assert literal_address("hooks.example.com") is None


async def test_ensure_public_url_refuses_loopback_names_unless_allowed() -> None:
    with pytest.raises(UnsafeURL, match="localhost resolves to"):
        await ensure_public_url("http://localhost:9/hook", allow_private=False)
    await ensure_public_url("http://localhost:9/hook", allow_private=True)


async def test_the_resolver_refuses_a_name_if_any_of_its_addresses_is_private() -> None:
    resolver = PublicAddressResolver(FixedResolver("93.184.216.34", "10.0.0.7"))

    with pytest.raises(UnsafeURL, match=r"rebind\.example resolves to 10\.0\.0\.7"):
        await resolver.resolve("rebind.example", 80)
    await resolver.close()


async def test_the_resolver_passes_public_answers_through_unchanged() -> None:
    inner = FixedResolver("93.184.216.34")
    resolver = PublicAddressResolver(inner)

    [result] = await resolver.resolve("hooks.example.com", 443)
    await resolver.close()

    assert (result["host"], result["port"]) == ("93.184.216.34", 443)
    assert inner.closed


async def test_a_session_on_the_resolver_never_connects_to_what_a_name_resolves_to_privately() -> None:
    async with webhook_receiver() as receiver:
        port = int(receiver.base_url.rsplit(":", 1)[1])
        connector = aiohttp.TCPConnector(resolver=PublicAddressResolver(FixedResolver("127.0.0.1")))
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(UnsafeURL):
                await session.post(f"http://hooks.example.com:{port}/hook", data=b"{}")

    assert receiver.received == []


async def test_the_tools_session_refuses_a_name_resolving_to_loopback_at_connect_time() -> None:
    clients = ProviderClients()
    async with webhook_receiver() as receiver:
        port = int(receiver.base_url.rsplit(":", 1)[1])
        with pytest.raises(UnsafeURL, match="localhost resolves to"):
            await clients.http(allow_private=False).post(f"http://localhost:{port}/hook", data=b"{}")
    await clients.aclose()

    assert receiver.received == []


async def test_a_tool_webhook_redirect_is_an_error_and_is_not_followed() -> None:
    clients = ProviderClients()
    async with webhook_receiver() as receiver:
        receiver.redirect_to = receiver.url("elsewhere")
        function = AgentFunction(
            tool_id="t1",
            spec=FunctionSpec("lookup", "Look a customer up.", {"type": "object"}),
            url=receiver.url("hook"),
            method="POST",
            headers={},
            timeout_seconds=5,
        )
        tools = ToolRunner([function], call={}, session=clients.http(allow_private=True), allow_private=True)
        result = await tools.run("lookup", {})
    await clients.aclose()

    assert result.startswith(f"{TOOL_ERROR_PREFIX}the lookup service answered HTTP 307")
    assert [r.path for r in receiver.received] == ["/hook"]


async def test_a_host_name_that_cannot_be_encoded_is_refused_as_unsafe() -> None:
    # An empty label or one over 63 characters made the lookup raise UnicodeError, which no caller expected.
    with pytest.raises(UnsafeURL, match=r"crm\.\.example\.com is not a valid host name"):
        await ensure_public_url("http://crm..example.com/hook", allow_private=False)


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_tool_whose_webhook_host_cannot_be_encoded_answers_the_model_with_an_error(allow_private: bool) -> None:
    # The UnicodeError of "crm..example.com" left ToolRunner.run, failing the model's reply (and the call's turn)
    # where a broken Tool must only give the model an error to act on.
    clients = ProviderClients()
    function = AgentFunction(
        tool_id="t1",
        spec=FunctionSpec("lookup", "Look a customer up.", {"type": "object"}),
        url="http://crm..example.com/hook",
        method="POST",
        headers={},
        timeout_seconds=5,
    )
    session = clients.http(allow_private=allow_private)
    tools = ToolRunner([function], call={}, session=session, allow_private=allow_private)
    result = await tools.run("lookup", {})
    await clients.aclose()

    assert result.startswith(f"{TOOL_ERROR_PREFIX}the lookup service address is not")
