"""Reading a caller's media socket a few frames at a time while nothing is decided on the next frame.

Twilio sends each call's audio as fifty small frames a second. Reading each one as it lands costs a wake-up of the
event loop, a `read` system call and a pass through aiohttp's protocol: about half of the ~15 µs a frame costs
before the call sees it (measured with 100 loopback sockets at Twilio's pace: 15.5 µs a frame read one by one,
7.6 µs read three at a time). Most frames are not urgent: while the caller speaks, or long after they stopped,
nothing is decided on the next 80 ms. So while the call's driver is not `listening_closely`, the socket's receive
low-water mark (`SO_RCVLOWAT`) makes the kernel report it readable only once `BATCH_FRAMES` frames have come; while
it is (the silence after the caller's speech, where the turn is decided frame by frame, and the caller's speech over
the agent, counted toward a barge-in), the mark is one byte and every frame is read as it lands. The first silent
frames after speech, and the first voiced one over the agent, can come up to `BATCH_FRAMES - 1` frames late, which
is why the driver's earliest decision on either must come later than that (`LATEST_FRAME_MS`).

A peer that stops sending in the middle of a batch (a last mark, a close, a test's scripted frames) would leave
bytes waiting below the mark: a sweep every `SWEEP_SECONDS` puts a socket that has read nothing for `STALL_SECONDS`
back to one byte, for `STALL_HOLD_SECONDS` (lowering the mark wakes the reader at once if bytes wait).

Linux only (elsewhere every frame is read as it lands); a socket whose options cannot be set reads frame by frame.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import Protocol

from engine.call.per_loop import PerLoop

log = logging.getLogger(__name__)

BATCH_FRAMES = 5
"""Frames a relaxed socket wakes the engine for at once."""
TWILIO_FRAME_WIRE_BYTES = 390
"""A Twilio media frame on the wire: the JSON around 160 bytes of μ-law in base64, and the WebSocket header (about
380-400 bytes as its counters grow)."""
RELAXED_LOW_WATER = int((BATCH_FRAMES - 0.5) * TWILIO_FRAME_WIRE_BYTES)
"""More than `BATCH_FRAMES - 1` frames and fewer than `BATCH_FRAMES`, whatever their counters' digits."""
LATEST_FRAME_MS = (BATCH_FRAMES - 1) * 20
"""How late a frame read in a batch can be handled, at most."""
SWEEP_SECONDS = 0.125
STALL_SECONDS = 2.5 * BATCH_FRAMES * 0.02
"""Two and a half batches' time (250 ms): a relaxed socket reading nothing this long has stalled; a healthy one
whose batch comes a little late (the peer's or the network's jitter) has not."""
STALL_HOLD_SECONDS = 1.0
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_RCVLOWAT")


class _Socket(Protocol):
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


class CallerReads:
    """How promptly one call's media socket is read: `listen(closely=...)` as the driver's needs change."""

    def __init__(
        self, sock: _Socket | None, progress: Callable[[], object], *, loop: asyncio.AbstractEventLoop
    ) -> None:
        """`sock`: the call's socket (None: nothing to pace); `progress`: a value that changes with every frame the
        call takes (Twilio's sequence number), for the stall sweep."""
        self._sock = sock if SUPPORTED else None
        self._progress = progress
        self._loop = loop
        self._closely = True
        self._relaxed = False  # the mark in force
        self._held_until = 0.0
        self._seen: object = None
        self._seen_at = 0.0
        self._closed = False

    @property
    def relaxed(self) -> bool:
        """Whether the socket wakes the engine only once a batch of frames has come."""
        return self._relaxed

    def listen(self, *, closely: bool) -> None:
        """Read every frame as it lands (`closely`), or a batch at a time."""
        self._closely = closely
        self._apply()

    def close(self) -> None:
        """The call is over: read whatever comes (a close handshake) as it lands."""
        self._closed = True
        self._apply()

    def _apply(self) -> None:
        relax = not (self._closely or self._closed) and self._loop.time() >= self._held_until
        if relax is self._relaxed or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RELAXED_LOW_WATER if relax else 1)
        except (OSError, ValueError) as exc:  # a closed socket, or one that takes no such option
            log.debug("SO_RCVLOWAT not set (%s): reading frame by frame", exc)
            self._sock = None
            self._relaxed = False
            return
        self._relaxed = relax
        sweep = _SWEEPS.of(self._loop)
        if relax:
            self._seen, self._seen_at = self._progress(), self._loop.time()
            sweep.watch(self)
        else:
            sweep.forget(self)

    def _check(self, now: float) -> bool:
        """One sweep: False (and the socket put back to one byte for a while) when nothing was read for
        `STALL_SECONDS`; True while it is still relaxed and reading."""
        progress = self._progress()
        if progress != self._seen:
            self._seen, self._seen_at = progress, now
            return True
        if now - self._seen_at < STALL_SECONDS:
            return True
        self._held_until = now + STALL_HOLD_SECONDS
        self._apply()
        self._loop.call_at(self._held_until, self._apply)
        return False


class _Sweep:
    """Every `SWEEP_SECONDS` while any socket is relaxed: the stalled ones go back to frame by frame."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: set[CallerReads] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, reads: CallerReads) -> None:
        self._watched.add(reads)
        if self._timer is None:
            self._timer = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def forget(self, reads: CallerReads) -> None:
        self._watched.discard(reads)

    def _sweep(self) -> None:
        now = self._loop.time()
        for reads in list(self._watched):
            if not reads._check(now):
                self._watched.discard(reads)
        self._timer = self._loop.call_later(SWEEP_SECONDS, self._sweep) if self._watched else None


_SWEEPS = PerLoop(_Sweep)
