"""The vendors' SDK clients an engine's calls share: made on first use, one per key and endpoint, closed together;
and the scripted phrases its voices have already said (`PhraseCache`).

The engine's app makes one `ProviderClients` in a cleanup context and closes it after everything that uses it
(calls, post-call analysis) has stopped; the providers get it through `pipelines.registry.ProviderContext`.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

import aiohttp

from pipelines.tts.phrases import PhraseCache
from pipelines.url_safety import PublicAddressResolver

if TYPE_CHECKING:
    from deepgram import AsyncDeepgramClient
    from elevenlabs.client import AsyncElevenLabs
    from openai import AsyncOpenAI

__all__ = ["CloseClient", "ProviderClients", "ProviderClientsClosed", "load_cloud_providers"]

log = logging.getLogger(__name__)

CloseClient = Callable[[], Awaitable[None]]
"""Releases one client's connection pool."""

_Client = TypeVar("_Client")
_Key = TypeVar("_Key", bound=Hashable)


_CLOUD_PROVIDER_MODULES = ("pipelines.stt.deepgram", "pipelines.llm.openai_chat", "pipelines.tts.elevenlabs")
"""The cloud providers' modules, each loading its vendor's SDK."""


def load_cloud_providers() -> None:
    """Import the cloud providers' modules and their SDKs now.

    A server calls this before it takes calls. Left to the first call that needs them, these imports (about half a
    second of CPU, more under load) would run on the event loop and hold up the audio of every call on the engine.
    """
    started = time.perf_counter()
    for module in _CLOUD_PROVIDER_MODULES:
        importlib.import_module(module)
    log.info("cloud providers loaded in %.0f ms", (time.perf_counter() - started) * 1000)


class ProviderClientsClosed(RuntimeError):
    """A client was asked for after `ProviderClients.aclose()`: something outlived the engine's shutdown."""


class ProviderClients:
    """The SDK clients of one engine, each holding one connection pool that every call uses.

    Clients belong to the event loop they are first used on (the app's). A cloud SDK is imported when one of its
    clients is first asked for, unless it is loaded already: `dialtone serve` loads them all before it takes calls
    (`load_cloud_providers`); other commands and tests on the offline providers never load them.
    """

    def __init__(self) -> None:
        """No client yet: each is made on first use."""
        self._openai: dict[tuple[str, str], AsyncOpenAI] = {}
        self._deepgram: dict[tuple[str, str], AsyncDeepgramClient] = {}
        self._elevenlabs: dict[tuple[str, str], AsyncElevenLabs] = {}
        self._http: dict[bool, aiohttp.ClientSession] = {}
        self._closers: list[tuple[str, CloseClient]] = []
        self._closed = False
        self.phrases = PhraseCache()
        """The scripted phrases the engine's calls have synthesized, for its later calls to say from memory."""

    def openai(self, api_key: str, base_url: str) -> AsyncOpenAI:
        """The OpenAI client for this key and API base URL: chat models, Realtime sessions, post-call analysis."""
        from pipelines.llm import openai_chat

        url = base_url.rstrip("/")
        return self._cached("openai", self._openai, (api_key, url), lambda: openai_chat.new_client(api_key, url))

    def deepgram(self, api_key: str, url: str) -> AsyncDeepgramClient:
        """The Deepgram client for this key and base URL (http(s):// or ws(s)://)."""
        from pipelines.stt import deepgram

        return self._cached("deepgram", self._deepgram, (api_key, url), lambda: deepgram.new_client(api_key, url))

    def elevenlabs(self, api_key: str, url: str) -> AsyncElevenLabs:
        """The ElevenLabs HTTP client for this key and API base URL (http(s)://)."""
        from pipelines.tts import elevenlabs

        return self._cached(
            "elevenlabs", self._elevenlabs, (api_key, url), lambda: elevenlabs.new_http_client(api_key, url)
        )

    def http(self, *, allow_private: bool) -> aiohttp.ClientSession:
        """The HTTP session the agents' functions call their webhooks through.

        The webhooks are URLs an organization chose: unless `allow_private`, the session refuses at connect time
        any name resolving to a non-public address, so a DNS answer that changes after a check cannot slip through.
        """

        def make() -> tuple[aiohttp.ClientSession, CloseClient]:
            resolver = None if allow_private else PublicAddressResolver()
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver))
            return session, session.close

        return self._cached("tools http", self._http, allow_private, make)

    async def aclose(self) -> None:
        """Close every client made so far; asking for one afterwards raises ProviderClientsClosed."""
        self._closed = True
        closers, self._closers = self._closers, []
        for name, close in closers:
            try:
                await close()
            except Exception:  # one client failing to close must not leave the others open
                log.exception("closing the %s client failed", name)

    def _cached(
        self,
        name: str,
        cache: dict[_Key, _Client],
        key: _Key,
        make: Callable[[], tuple[_Client, CloseClient]],
    ) -> _Client:
        if self._closed:
            raise ProviderClientsClosed(f"the {name} client was asked for after the engine's clients were closed")
        client = cache.get(key)
        if client is None:
            client, close = make()
            cache[key] = client
            self._closers.append((name, close))
        return client
