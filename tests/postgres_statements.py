"""A loopback proxy in front of PostgreSQL that counts the statements its clients execute, read off the wire.

What pg_stat_statements would tell (the embedded server has not got it): every simple Query, and every Execute of
an extended-protocol statement, counted under its SQL text. For tests and benches that show how many queries an
engine makes, whatever it makes them through.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

_PROTOCOL_3 = 196608
"""A StartupMessage's version (3.0); the untyped messages before it are SSL, GSS or cancel requests."""


class StatementCountingProxy:
    """Listens on 127.0.0.1 and passes every byte to the server of `server_url`, counting what is executed."""

    def __init__(self, server_url: str) -> None:
        """Forward to the server `server_url` points at (its Unix socket, when it names one)."""
        parts = urlsplit(server_url)
        self._server_url = parts
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        self._unix_path: str | None = None
        if socket_dir:
            sockets = [p for p in Path(socket_dir).glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
            self._unix_path = str(sockets[0])
        self.executed: Counter[str] = Counter()
        """How many times each SQL text was executed, since the proxy started."""
        self._server: asyncio.Server | None = None
        self.port = 0

    def url(self, database: str) -> str:
        """A URL for `database` through the proxy, with the server's credentials."""
        credentials = self._server_url.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit((self._server_url.scheme, netloc, f"/{database}", "", ""))

    def count(self, *fragments: str) -> int:
        """Executions of the statements whose SQL contains every one of `fragments`."""
        return sum(n for sql, n in self.executed.items() if all(fragment in sql for fragment in fragments))

    def total(self) -> int:
        """Every statement executed through the proxy."""
        return sum(self.executed.values())

    async def __aenter__(self) -> StatementCountingProxy:
        """Start listening, on a port the OS picks."""
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop listening (connections still open end with their clients)."""
        assert self._server is not None
        self._server.close()

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._unix_path is not None:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._unix_path)
        else:
            host, port = self._server_url.hostname, self._server_url.port or 5432
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frontend: bool) -> None:
            try:
                if frontend:
                    await self._read_frontend(reader, writer)
                else:
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, upstream_writer, True), pipe(upstream_reader, client_writer, False))

    async def _read_frontend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pass the client's messages on one by one, counting its Query and Execute messages."""
        started = False
        prepared: dict[bytes, str] = {}  # statement name -> SQL, as Parse gave them on this connection
        portals: dict[bytes, str] = {}  # portal name -> SQL, as Bind gave them
        while True:
            if not started:  # untyped: Int32 length, Int32 code, ...
                head = await reader.readexactly(8)
                length, code = struct.unpack("!II", head)
                body = await reader.readexactly(length - 8)
                started = code == _PROTOCOL_3
                writer.write(head + body)
            else:
                head = await reader.readexactly(5)
                kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                body = await reader.readexactly(length - 4)
                if kind == b"Q":
                    self.executed[body.split(b"\0", 1)[0].decode()] += 1
                elif kind == b"P":
                    name, query, _ = body.split(b"\0", 2)
                    prepared[name] = query.decode()
                elif kind == b"B":
                    portal, statement, _ = body.split(b"\0", 2)
                    portals[portal] = prepared.get(statement, "")
                elif kind == b"E":
                    self.executed[portals.get(body.split(b"\0", 1)[0], "")] += 1
                writer.write(head + body)
            await writer.drain()
