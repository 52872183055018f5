"""The PostgreSQL server Dialtone runs itself when no DATABASE_URL is set (the `pgserver` wheel).

Its data lives in the state folder and outlives the engine. It listens on a Unix socket inside that
folder only, never on a network address. Several engine processes may start at once: they take a file
lock in turn, the first starts the server and the others join it; the last one to exit stops it.
"""

from __future__ import annotations

import fcntl
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

PGDATA_DIRNAME = "pgdata"
LOCK_FILENAME = "embedded-postgres.lock"


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    """A running embedded server: where its data is and how to reach it."""

    pgdata: Path
    socket_dir: Path
    started_in: float

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for one of the server's databases, through its socket."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"


def start_embedded(state_dir: Path, *, stop_at_exit: bool = True) -> EmbeddedServer:
    """Start (or join) the embedded server whose data is under `state_dir`; blocking, so run it in a thread.

    With `stop_at_exit`, the server stops when the last process using it exits; otherwise it keeps running.
    """
    began = time.perf_counter()
    state_dir = state_dir.expanduser().resolve()
    pgdata = state_dir / PGDATA_DIRNAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        pgdata.mkdir(exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(f"embedded PostgreSQL: cannot create {pgdata} ({exc.strerror})") from None
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp: fine here.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    with (state_dir / LOCK_FILENAME).open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            server = get_server(pgdata, cleanup_mode="stop" if stop_at_exit else None)
        except Exception as exc:
            log_tail = _log_tail(pgdata / "log")
            raise DatabaseUnavailable(
                f"embedded PostgreSQL in {pgdata} did not start ({type(exc).__name__}: {exc}){log_tail}"
            ) from None
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    info = server.get_postmaster_info()
    socket_dir = Path(info.socket_dir) if info.socket_dir else pgdata
    elapsed = time.perf_counter() - began
    log.info("embedded PostgreSQL ready in %.2fs (data in %s)", elapsed, pgdata)
    return EmbeddedServer(pgdata=pgdata, socket_dir=socket_dir, started_in=elapsed)


def _log_tail(log_path: Path, lines: int = 5) -> str:
    try:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "; server log: " + " | ".join(tail) if tail else ""
