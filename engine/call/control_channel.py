"""Live-call commands between engine processes, through PostgreSQL LISTEN/NOTIFY.

Any process can ask the node that holds a call to act on it: `ControlChannel.send` NOTIFYs a command (a name and
JSON arguments) on `CONTROL_CHANNEL` addressed to that node, and waits for the node's acknowledgement on
`REPLY_CHANNEL`. The node runs the handler registered for the command's name and replies whether it was applied.
Each process keeps one dedicated listening connection, reconnected when the database drops it; commands sent while
a node is disconnected are not queued (NOTIFY is not durable), so the sender hears nothing and times out. A command
carries the instant its sender stops waiting, on the database's clock (hosts' clocks may disagree): one that reaches
its node later (the node was stopped or starved, its connection slow) is not carried out, since its sender has
already answered that it was not.

Other live-call features share that connection: `subscribe` adds a channel of their own (its callback gets each
payload, and `None` after every (re)connection, when anything NOTIFYed while disconnected was lost), and `publish`
NOTIFYs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.server.appkeys import DATABASE, SETTINGS
from engine.workers.recovery import NODE_ID
from storage import Pool
from storage.errors import DATABASE_ERRORS
from storage.pool import DirectConnection, connect_direct
from storage.records import new_id

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "dialtone_control"
"""The channel commands travel on; every node listens and acts only on those addressed to it."""
REPLY_CHANNEL = "dialtone_control_reply"
"""The channel acknowledgements travel on; a sender resolves the one that answers its command's id."""
MAX_PAYLOAD_BYTES = 7000
"""NOTIFY payloads must stay under 8000 bytes: a command's arguments are small by design."""
_DATABASE_NOW = "extract(epoch FROM clock_timestamp())::float8"
"""The database's clock in epoch seconds: commands' expiry is judged by one clock for every host."""
KEEPALIVE_SECONDS = 5.0
RECONNECT_MAX_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """What the holding node did with a command: applied or not, why not, and what it answers."""

    applied: bool
    detail: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)


Handler = Callable[[str, Mapping[str, Any]], Awaitable[Acknowledgement]]
"""Carry out a command on the call (CallLog id) with these arguments, on the node that holds it."""

Subscriber = Callable[[str | None], None]
"""Called with each payload NOTIFYed on a subscribed channel, and with None once the channel listens again after
the connection was (re)made: payloads sent in between were lost, so the subscriber catches up another way."""


class ControlChannelError(Exception):
    """A command could not be delivered or was not acknowledged in time."""


class ControlChannel:
    """This process's end of the command channel: it sends commands, and answers those addressed to it."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[DirectConnection]],
        pool: Pool,
        *,
        node_id: str,
        handlers: Mapping[str, Handler],
    ) -> None:
        """Listen on connections `connect` opens; NOTIFY through `pool`; act on commands for `node_id`."""
        self._connect = connect
        self._pool = pool
        self.node_id = node_id
        self._handlers = dict(handlers)
        self._waiting: dict[str, asyncio.Future[Acknowledgement]] = {}
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._conn: DirectConnection | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, timeout: float = 10.0) -> None:
        """Start listening; return once the first connection listens (or after `timeout`, still retrying)."""
        self._task = asyncio.create_task(self._listen(), name="control-channel")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=timeout)

    async def stop(self) -> None:
        """Stop listening and cancel commands still being carried out."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):
            task.cancel()
        for future in self._waiting.values():
            future.cancel()

    async def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Call `subscriber` with every payload NOTIFYed on `channel` (and None after each reconnection)."""
        first = channel not in self._subscribers
        self._subscribers.setdefault(channel, []).append(subscriber)
        conn = self._conn
        if first and conn is not None and self._listening.is_set():
            with contextlib.suppress(*DATABASE_ERRORS):  # a lost connection re-adds every channel as it reconnects
                await conn.add_listener(channel, self._on_subscribed)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Stop calling `subscriber` for `channel` (the connection keeps listening; unknown payloads are dropped)."""
        subscribers = self._subscribers.get(channel, [])
        with contextlib.suppress(ValueError):
            subscribers.remove(subscriber)

    async def publish(self, channel: str, payload: str) -> None:
        """NOTIFY `payload` (under MAX_PAYLOAD_BYTES) on `channel`, to every process subscribed to it."""
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a payload for {channel!r} is too large for NOTIFY")
        await self._pool.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def send(
        self,
        node_id: str,
        call_log_id: str,
        command: str,
        args: Mapping[str, Any],
        *,
        timeout: float,
        work_seconds: float = 0.0,
    ) -> Acknowledgement:
        """Ask `node_id` to carry out `command` on the call and return its acknowledgement.

        The node must start it within `timeout`; a command whose work waits on something slower (a Twilio request)
        names how long that may take, `work_seconds`, and is waited for that much longer, and `timeout` again for
        the node's own steps around it and the acknowledgement's way back: the sender never gives up on a command
        its node may still carry out. ControlChannelError when this process is not listening, or no acknowledgement
        comes in that time.
        """
        if not self._listening.is_set():
            raise ControlChannelError("this engine process is not connected to the command channel")
        command_id = new_id()
        payload = json.dumps(
            {"id": command_id, "node": node_id, "call": call_log_id, "command": command, "args": dict(args)},
            separators=(",", ":"),
        )
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"command {command!r}: arguments too large for the command channel")
        waited = timeout + work_seconds + (timeout if work_seconds else 0.0)
        future: asyncio.Future[Acknowledgement] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        try:
            await self._pool.execute(
                f"SELECT pg_notify($1, ($2::text::jsonb || jsonb_build_object('expires', {_DATABASE_NOW} + $3))::text)",
                CONTROL_CHANNEL,
                payload,
                timeout,
            )
            return await asyncio.wait_for(future, timeout=waited)
        except TimeoutError:
            raise ControlChannelError(
                f"engine node {node_id} did not acknowledge {command!r} within {waited:g} s"
            ) from None
        finally:
            self._waiting.pop(command_id, None)

    async def _listen(self) -> None:
        wait = 0.5
        while True:
            conn: DirectConnection | None = None
            try:
                conn = await self._connect()
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _conn, done=closed: done.set())
                await conn.add_listener(CONTROL_CHANNEL, self._on_command)
                await conn.add_listener(REPLY_CHANNEL, self._on_reply)
                for channel in list(self._subscribers):
                    await conn.add_listener(channel, self._on_subscribed)
                self._conn = conn
                self._listening.set()
                self._tell_subscribers(None)
                wait = 0.5
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), timeout=KEEPALIVE_SECONDS)
                    if not closed.is_set():  # a connection the network lost silently fails this
                        await conn.execute("SELECT 1", timeout=KEEPALIVE_SECONDS)
            except DATABASE_ERRORS as exc:
                log.warning("command channel: connection lost (%s); reconnecting in %.1f s", type(exc).__name__, wait)
            finally:
                self._listening.clear()
                self._conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_MAX_SECONDS)

    def _on_command(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            message = json.loads(str(payload))
            if message.get("node") != self.node_id:
                return
            command_id, call_log_id, name = str(message["id"]), str(message["call"]), str(message["command"])
            args = message.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args is not an object")
            expires = message.get("expires")  # a node of an earlier release sends none
            if expires is not None and not isinstance(expires, int | float):
                raise TypeError("expires is not a number")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("command channel: ignored a malformed command (%s)", exc)
            return
        task = asyncio.create_task(self._carry_out(command_id, call_log_id, name, args, expires))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def carry_out_here(self, call_log_id: str, name: str, args: Mapping[str, Any]) -> Acknowledgement:
        """Carry out a command on a call this process holds, as if another had sent it (its failure acknowledged)."""
        handler = self._handlers.get(name)
        if handler is None:
            return Acknowledgement(applied=False, detail=f"engine node {self.node_id} does not know {name!r}")
        try:
            return await handler(call_log_id, args)
        except Exception as exc:
            log.exception("command channel: %s on call %s failed", name, call_log_id)
            return Acknowledgement(applied=False, detail=f"{name} failed on the node holding the call: {exc}")

    async def _carry_out(
        self, command_id: str, call_log_id: str, name: str, args: Mapping[str, Any], expires: float | None
    ) -> None:
        if expires is not None and not await self._still_awaited(expires):
            log.warning(
                "command channel: %s on call %s arrived after its sender stopped waiting; not carried out",
                name,
                call_log_id,
            )
            return
        ack = await self.carry_out_here(call_log_id, name, args)
        reply = json.dumps(
            {"id": command_id, "applied": ack.applied, "detail": ack.detail, "result": dict(ack.result)},
            separators=(",", ":"),
        )
        try:
            await self._pool.execute("SELECT pg_notify($1, $2)", REPLY_CHANNEL, reply)
        except Exception as exc:  # the sender times out and says so
            log.warning("command channel: could not acknowledge %s on call %s (%s)", name, call_log_id, exc)

    async def _still_awaited(self, expires: float) -> bool:
        """Whether the sender of a command that `expires` (the database's clock, in epoch seconds) still waits for
        its acknowledgement; False too when the database cannot tell, as the acknowledgement could not be sent."""
        try:
            waiting: bool = await self._pool.fetchval(f"SELECT {_DATABASE_NOW} < $1", expires)
        except DATABASE_ERRORS as exc:
            log.warning("command channel: could not tell whether a command is still awaited (%s)", exc)
            return False
        return waiting

    def _on_subscribed(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        for subscriber in list(self._subscribers.get(channel, [])):
            try:
                subscriber(str(payload))
            except Exception:
                log.exception("command channel: a subscriber of %s failed", channel)

    def _tell_subscribers(self, payload: str | None) -> None:
        for channel, subscribers in self._subscribers.items():
            for subscriber in list(subscribers):
                try:
                    subscriber(payload)
                except Exception:
                    log.exception("command channel: a subscriber of %s failed", channel)

    def _on_reply(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            message = json.loads(str(payload))
            future = self._waiting.get(str(message["id"]))
            if future is None or future.done():
                return  # another process's command, or one that timed out
            future.set_result(
                Acknowledgement(
                    applied=bool(message["applied"]),
                    detail=str(message.get("detail", "")),
                    result=message.get("result") or {},
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("command channel: ignored a malformed acknowledgement (%s)", exc)


CONTROL = web.AppKey("control_channel", ControlChannel)


def control_channel_context(
    handlers: Callable[[web.Application], Mapping[str, Handler]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running this process's command channel under CONTROL, with `handlers(app)`'s commands."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        db = app[DATABASE]
        timeout = app[SETTINGS].db_connect_timeout

        async def connect() -> DirectConnection:
            return await connect_direct(db.url, timeout=timeout, application_name="dialtone-control-channel")

        channel = ControlChannel(connect, db.pool, node_id=app[NODE_ID], handlers=handlers(app))
        app[CONTROL] = channel
        await channel.start(timeout=timeout)
        try:
            yield
        finally:
            await channel.stop()

    return context
