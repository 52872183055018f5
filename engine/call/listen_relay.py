"""Listen-in across engine processes: the node holding a call publishes its audio on NOTIFY while leased, and a
listener's process routes what arrives to its own listeners.

A listener's process asks the holding node with the `listen` command, naming a lease it renews every
`RENEW_SECONDS`; the node's `AudioPublisher` for the call then NOTIFYs each chunk on `LISTEN_AUDIO_CHANNEL`
(base64 μ-law of both sides, numbered) until every lease on it lapses or the call ends (an end marker follows).
Every process shares the channel through the command channel's one listening connection and keeps the calls it
listens to; a gap in the numbering (a NOTIFY lost, a chunk the node dropped behind a slow database) is heard as
silence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from engine.call.audio_tap import (
    CALL_ENDED,
    CHUNK_BYTES,
    NODE_LOST,
    SILENT_CHUNK,
    AudioTap,
    TapChunk,
    TapListener,
)
from engine.call.control_channel import CONTROL, ControlChannel, ControlChannelError
from engine.server.appkeys import SETTINGS
from storage.errors import DATABASE_ERRORS
from storage.records import new_id

log = logging.getLogger(__name__)

LISTEN: Final = "listen"
"""The command name asking the holding node for a call's audio (arguments: `lease`, `seconds`; 0 gives it up)."""
LISTEN_AUDIO_CHANNEL: Final = "dialtone_listen_audio"
"""The channel a holding node NOTIFYs listened calls' chunks and end markers on."""
LEASE_SECONDS: Final = 10.0
"""How long a lease keeps a call's audio flowing without a renewal."""
RENEW_SECONDS: Final = 3.0
"""How often a listener's process renews its lease."""
PUBLISH_BACKLOG: Final = 20
"""Chunks a holding node keeps waiting for the database per call; older ones are dropped (heard as silence)."""
MAX_FILLED_GAP: Final = 50
"""A gap of more chunks than this (5 s) is not filled with silence: the listener resumes where the audio is."""


class ListenRefused(Exception):
    """The holding node will not send the call's audio (it no longer holds the call)."""


def encode_chunk(call_log_id: str, chunk: TapChunk) -> str:
    """A chunk as a NOTIFY payload (about 2.2 kB)."""
    return json.dumps(
        {
            "call": call_log_id,
            "seq": chunk.sequence,
            "caller": base64.b64encode(chunk.caller).decode("ascii"),
            "agent": base64.b64encode(chunk.agent).decode("ascii"),
        },
        separators=(",", ":"),
    )


def encode_end(call_log_id: str, reason: str) -> str:
    """The end marker of a call's audio as a NOTIFY payload."""
    return json.dumps({"call": call_log_id, "end": reason}, separators=(",", ":"))


class AudioPublisher:
    """On the holding node: a listener of one call's tap that NOTIFYs its chunks while a lease on them is alive."""

    def __init__(
        self,
        call_log_id: str,
        publish: Callable[[str], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Publish the call's audio through `publish` (one NOTIFY payload) once `run` runs."""
        self.call_log_id = call_log_id
        self._publish = publish
        self._clock = clock
        self._leases: dict[str, float] = {}
        self._outbox: deque[str] = deque()
        self._wake = asyncio.Event()
        self._over = False

    @property
    def over(self) -> bool:
        """Whether it publishes nothing more (every lease lapsed, or the call ended)."""
        return self._over

    def renew(self, lease: str, seconds: float) -> None:
        """Keep the audio flowing for `lease` `seconds` more."""
        self._leases[lease] = self._clock() + seconds

    def hear(self, chunk: TapChunk) -> bool:
        """Queue the chunk for NOTIFY while a lease lives; False once all have lapsed (the tap lets it go)."""
        now = self._clock()
        self._leases = {lease: until for lease, until in self._leases.items() if until > now}
        if not self._leases:
            self._over = True
            self._wake.set()
            return False
        if len(self._outbox) >= PUBLISH_BACKLOG:
            self._outbox.popleft()
        self._outbox.append(encode_chunk(self.call_log_id, chunk))
        self._wake.set()
        return True

    def end(self, reason: str) -> None:
        """The call's audio is over: publish the end marker after what is queued."""
        self._outbox.append(encode_end(self.call_log_id, reason))
        self._over = True
        self._wake.set()

    async def run(self) -> None:
        """NOTIFY queued payloads in order until it is over and all are out."""
        while True:
            while self._outbox:
                payload = self._outbox.popleft()
                try:
                    await self._publish(payload)
                except DATABASE_ERRORS as exc:  # the listeners hear silence for it
                    log.warning("listen-in: call %s: audio not published (%s)", self.call_log_id, type(exc).__name__)
            if self._over:
                return
            self._wake.clear()
            await self._wake.wait()


@dataclass(slots=True)
class _RemoteCall:
    """A call this process listens to on another node: its lease, its listeners and the next chunk expected."""

    node: str
    lease: str
    listeners: list[TapListener] = field(default_factory=list)
    next_sequence: int | None = None
    renewal: asyncio.Task[None] | None = None
    ended: str | None = None
    """Why its audio ended, once it has (its end marker can come before the acknowledgement of its first lease)."""


class ListenRelay:
    """This process's side of listen-in across nodes: publishers for calls held here, listeners for calls held
    elsewhere."""

    def __init__(self, channel: ControlChannel, *, control_timeout: float) -> None:
        """Relay through `channel`, waiting `control_timeout` s for a holding node's acknowledgements."""
        self._channel = channel
        self._timeout = control_timeout
        self._publishers: dict[str, AudioPublisher] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._remote: dict[str, _RemoteCall] = {}
        self._subscribed = False

    # ------------------------------------------------------------------------------------------ holding node

    def lease(self, call_log_id: str, tap: AudioTap, lease: str, seconds: float) -> None:
        """Publish the call's audio (from `tap`) for `seconds` more on `lease`'s behalf (0: the lease is given up)."""
        publisher = self._publishers.get(call_log_id)
        if seconds <= 0:
            if publisher is not None:
                publisher.renew(lease, 0)
            return
        if publisher is None or publisher.over:
            publisher = AudioPublisher(call_log_id, self._publish)
            self._publishers[call_log_id] = publisher
            tap.add(publisher)
            task = asyncio.create_task(publisher.run(), name=f"listen-publish-{call_log_id}")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._publisher_done, publisher))
        publisher.renew(lease, seconds)

    def _publisher_done(self, publisher: AudioPublisher, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._publishers.get(publisher.call_log_id) is publisher:
            del self._publishers[publisher.call_log_id]

    async def _publish(self, payload: str) -> None:
        await self._channel.publish(LISTEN_AUDIO_CHANNEL, payload)

    # --------------------------------------------------------------------------------------- listening side

    async def listen(self, node: str, call_log_id: str, listener: TapListener) -> None:
        """Send `listener` the audio of the call `node` holds, from now until it ends or the node is lost.

        ListenRefused if the node does not hold the call; ControlChannelError if it cannot be reached.
        """
        if not self._subscribed:
            self._subscribed = True
            await self._channel.subscribe(LISTEN_AUDIO_CHANNEL, self._on_audio)
        remote = self._remote.get(call_log_id)
        if remote is None:
            remote = _RemoteCall(node, new_id())
            self._remote[call_log_id] = remote
            try:
                await self._ask(remote, call_log_id)
            except BaseException:
                self._end(call_log_id, remote, NODE_LOST)  # listeners that joined meanwhile
                raise
            if remote.ended is not None:
                listener.end(remote.ended)  # the call ended as its node took the lease: nothing will follow
                return
            remote.renewal = asyncio.create_task(self._renew(call_log_id, remote), name=f"listen-{call_log_id}")
        remote.listeners.append(listener)

    def leave(self, call_log_id: str, listener: TapListener) -> None:
        """Send `listener` nothing more; with no listener left here, the lease is given up."""
        remote = self._remote.get(call_log_id)
        if remote is None or listener not in remote.listeners:
            return  # its call's audio ended already
        remote.listeners.remove(listener)
        if not remote.listeners and remote.renewal is not None:  # (while its first lease is asked, the asker is next)
            self._forget(call_log_id, remote)
            task = asyncio.create_task(self._release(call_log_id, remote), name=f"listen-release-{call_log_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _release(self, call_log_id: str, remote: _RemoteCall) -> None:
        """Let the holding node stop publishing now rather than when the lease would lapse."""
        args = {"lease": remote.lease, "seconds": 0}
        with contextlib.suppress(ControlChannelError, *DATABASE_ERRORS):  # the lease lapses all the same
            await self._channel.send(remote.node, call_log_id, LISTEN, args, timeout=self._timeout)

    async def _ask(self, remote: _RemoteCall, call_log_id: str) -> None:
        args = {"lease": remote.lease, "seconds": LEASE_SECONDS}
        ack = await self._channel.send(remote.node, call_log_id, LISTEN, args, timeout=self._timeout)
        if not ack.applied:
            raise ListenRefused(ack.detail or f"engine node {remote.node} does not hold call {call_log_id}")

    async def _renew(self, call_log_id: str, remote: _RemoteCall) -> None:
        reason = NODE_LOST
        try:
            while True:
                await asyncio.sleep(RENEW_SECONDS)
                await self._ask(remote, call_log_id)
        except ListenRefused:
            reason = CALL_ENDED  # the node answers but holds the call no more: it ended (its marker was lost)
        except ControlChannelError as exc:
            log.warning("listen-in: call %s: %s", call_log_id, exc)
        except DATABASE_ERRORS as exc:
            log.warning("listen-in: call %s: the lease could not be renewed (%s)", call_log_id, type(exc).__name__)
        if self._remote.get(call_log_id) is remote:
            remote.renewal = None  # this task: nothing to cancel
            self._end(call_log_id, remote, reason)

    def _on_audio(self, payload: str | None) -> None:
        if payload is None or not self._remote:
            return  # NOTIFYs lost while reconnecting show up as a gap; another process's listening is not ours
        try:
            message = json.loads(payload)
            remote = self._remote.get(str(message["call"]))
            if remote is None:
                return
            if "end" in message:
                self._end(str(message["call"]), remote, str(message["end"]))
                return
            chunk = TapChunk(
                int(message["seq"]),
                base64.b64decode(message["caller"], validate=True),
                base64.b64decode(message["agent"], validate=True),
            )
            if len(chunk.caller) != CHUNK_BYTES or len(chunk.agent) != CHUNK_BYTES:
                raise ValueError("a chunk of the wrong size")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            log.warning("listen-in: ignored a malformed audio message (%s)", exc)
            return
        self._deliver(str(message["call"]), remote, chunk)

    def _deliver(self, call_log_id: str, remote: _RemoteCall, chunk: TapChunk) -> None:
        expected = remote.next_sequence
        if expected is not None and chunk.sequence < expected:
            return  # another process's lease made it start over, or a duplicate
        chunks = [chunk]
        if expected is not None and 0 < chunk.sequence - expected <= MAX_FILLED_GAP:
            gap = range(expected, chunk.sequence)
            chunks = [TapChunk(sequence, SILENT_CHUNK, SILENT_CHUNK) for sequence in gap] + chunks
        remote.next_sequence = chunk.sequence + 1
        for each in chunks:
            for listener in list(remote.listeners):
                if not listener.hear(each):
                    self.leave(call_log_id, listener)

    def _end(self, call_log_id: str, remote: _RemoteCall, reason: str) -> None:
        remote.ended = reason
        self._forget(call_log_id, remote)
        for listener in remote.listeners:
            listener.end(reason)

    def _forget(self, call_log_id: str, remote: _RemoteCall) -> None:
        if self._remote.get(call_log_id) is remote:
            del self._remote[call_log_id]
        if remote.renewal is not None:
            remote.renewal.cancel()
            remote.renewal = None

    async def close(self) -> None:
        """Stop publishing and listening: listeners here hear NODE_LOST."""
        for call_log_id, remote in list(self._remote.items()):
            self._end(call_log_id, remote, NODE_LOST)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._subscribed:
            self._channel.unsubscribe(LISTEN_AUDIO_CHANNEL, self._on_audio)


LISTEN_RELAY = web.AppKey("listen_relay", ListenRelay)


async def listen_relay_context(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context running this process's ListenRelay under LISTEN_RELAY (after the command channel's)."""
    relay = app[LISTEN_RELAY] = ListenRelay(app[CONTROL], control_timeout=app[SETTINGS].control_timeout)
    try:
        yield
    finally:
        await relay.close()
