"""Which addresses the engine may call out to: public ones, unless a setting allows private networks too.

Agent tool webhooks and call-event webhooks are URLs an organization chose; left unchecked they would let it
reach the engine's own host, its private network or a cloud's metadata service. `ensure_public_url` checks a URL
before a request; `PublicAddressResolver` checks inside aiohttp's connector, so the address checked is the
address connected to and a DNS answer that changes between check and connect (rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL


class UnsafeURL(ValueError):
    """A URL resolving to an address the engine must not call (loopback, private, link-local...)."""


class UnresolvedHost(UnsafeURL):
    """A URL whose host DNS did not resolve: no address to call, though one may come once DNS answers."""


def check_public_address(host: str, address: str) -> None:
    """UnsafeURL unless `address` (what `host` resolved to, or `host` itself) is a public internet address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if not ip.is_global or (embedded is not None and not embedded.is_global):
        shown = host if host == address else f"{host} resolves to {address}, which"
        raise UnsafeURL(f"{shown} is not a public address")


_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""IPv6 prefixes whose last 32 bits are an IPv4 address a host or a NAT64 gateway may route to (RFC 4291, 6052)."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and may reach (mapped, compatible, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _IPV4_COMPATIBLE or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None


def literal_address(host: str) -> str | None:
    """The IP address `host` is a literal of, as aiohttp reads it (brackets of IPv6 removed), else None.

    aiohttp reads a URL's host through yarl, which maps non-ASCII hosts by IDNA first: "①②⑦.0.0.1", or 127.0.0.1
    in fullwidth digits and ideographic full stops, is the literal 127.0.0.1 to it, which it connects to without
    asking any resolver.
    """
    bare = host.strip("[]")
    if not bare.isascii():
        try:
            bare = URL.build(scheme="http", host=bare).raw_host or bare
        except ValueError:  # not a host yarl can read: aiohttp will refuse the URL itself
            return None
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None
    return bare


async def ensure_public_url(url: str, *, allow_private: bool) -> None:
    """Refuse URLs whose host resolves to a non-public address, unless `allow_private` (tests, private clouds)."""
    if allow_private:
        return
    host = urlsplit(url).hostname
    if not host:
        raise UnsafeURL(f"{url}: no host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnresolvedHost(f"{host}: cannot be resolved ({exc})") from None
    except UnicodeError:  # a label empty or longer than 63 characters ("crm..example.com"): no name DNS can be asked
        raise UnsafeURL(f"{host} is not a valid host name") from None
    for info in infos:
        check_public_address(host, str(info[4][0]))


class PublicAddressResolver(AbstractResolver):
    """An aiohttp resolver that refuses (UnsafeURL) hosts resolving to any non-public address.

    aiohttp never asks a resolver about IP literals: check those with `check_public_address` before the request.
    """

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The host's addresses, all of them public, or UnsafeURL."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_public_address(host, result["host"])
        return results

    async def close(self) -> None:
        """Release the wrapped resolver."""
        await self._inner.close()
