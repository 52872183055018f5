"""Stream a call's stereo WAV recording (caller left, agent right, 8 kHz PCM16) to disk as it happens.

`write_caller`/`write_agent` only touch memory and are safe on the event loop: the window keeps the μ-law
bytes as they come, so a write is one copy, and audio is decoded to PCM16 a window-half at a time when it is
written out. `flush` and `close` do blocking file I/O: an asyncio caller runs them with `asyncio.to_thread`,
calling `flush` about once a second so the queue of finished audio stays small.
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from media.g711 import SAMPLE_RATE, ULAW_SILENCE, ulaw_to_pcm16
from media.twilio_stream import MEDIA_LEAD_MS

_SAMPLES_PER_MS = SAMPLE_RATE // 1000
_BYTES_PER_FRAME = 4  # two channels of 16-bit samples
_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
"""The 44-byte header of a PCM WAV file: RIFF, its size, WAVE, the fmt chunk, then data and its size."""
_SILENCE_BLOCK_FRAMES = SAMPLE_RATE  # zeros are written a second at a time
_SILENCE_BLOCK = bytes(_SILENCE_BLOCK_FRAMES * _BYTES_PER_FRAME)
_HOLD_BYTES = 500 * _SAMPLES_PER_MS
"""Contiguous writes to a channel are gathered up to this much (500 ms) before they are placed in the window."""
LEAD_MS = MEDIA_LEAD_MS + 1000
"""How far ahead of the call's elapsed time audio may be placed: the caller's leads by up to `MEDIA_LEAD_MS`, and
the agent's is sent to Twilio (and recorded) less than a second ahead of that. Audio beyond it is dropped, so a
recording never outgrows its call."""


@dataclass(frozen=True, slots=True)
class RecordingInfo:
    """A finished recording: where it is, how long it lasts and its size on disk."""

    path: Path
    duration_ms: int
    bytes: int


class RecorderClosedError(RuntimeError):
    """Raised when audio is written to, or flushed from, a recorder that was closed."""


class StereoWavRecorder:
    """Place caller and agent audio on one timeline and stream it to a stereo WAV file.

    Audio lives in a fixed window of `window_ms`; when a write reaches past the window's end, the oldest
    half is handed to an outbox that `flush` writes to disk. Audio that arrives for a position already
    handed out (more than half a window behind the newest audio) is dropped and counted in `dropped_ms`.
    Overlapping writes to one channel replace what is there: audio is placed by `at_ms`, never appended. Audio
    placed more than `LEAD_MS` past `elapsed_ms()` (the call's real time) is dropped and counted too. The window
    always holds at least its last half before the newest audio, so `drop_agent_from` can silence the agent audio
    Twilio threw away unheard as long as the point it drops from is at most half a window behind the newest audio.
    """

    def __init__(
        self, path: Path | str, window_ms: int = 10_000, *, elapsed_ms: Callable[[], int] | None = None
    ) -> None:
        """Prepare a recording to `path`; no file is touched until the first `flush` or `close`.

        `elapsed_ms` says how long the call has lasted (by default, the time since this recorder was made).
        """
        if window_ms < 40:
            raise ValueError(f"window_ms must be at least 40, got {window_ms}")
        self.path = Path(path)
        self.window_ms = window_ms
        self._elapsed_ms = elapsed_ms if elapsed_ms is not None else _milliseconds_since(time.monotonic())
        self._capacity = window_ms * _SAMPLES_PER_MS
        # Two channels of μ-law, silent where nothing was placed.
        self._buffer: npt.NDArray[np.uint8] = np.full((self._capacity, 2), ULAW_SILENCE, dtype=np.uint8)
        self._start = 0  # timeline sample at buffer row 0
        self._head = 0  # one past the newest sample written on either channel
        # bytes are finished interleaved μ-law frames; an int is that many frames of silence
        self._outbox: deque[bytes | int] = deque()
        self._wav: _WavFile | None = None
        # Per channel, audio written back to back and not yet placed (Twilio's 20 ms frames, 25 at a time), and
        # the timeline sample it starts at.
        self._held: tuple[bytearray, bytearray] = (bytearray(), bytearray())
        self._held_at = [0, 0]
        self._dropped_samples = 0
        # The timeline sample audio may not reach, by the last elapsed_ms() read: a floor of the present limit (the
        # call's time only moves on), so elapsed_ms() is asked only when a write reaches past it.
        self._limit = 0
        self._closed = False

    @property
    def buffered_ms(self) -> int:
        """Milliseconds of timeline held in the in-memory window (never more than `window_ms`)."""
        self._place_held()
        return (self._head - self._start) // _SAMPLES_PER_MS if self._head > self._start else 0

    @property
    def buffer_bytes(self) -> int:
        """Size in bytes of the in-memory window; fixed for the recorder's life."""
        return self._buffer.nbytes

    @property
    def pending_bytes(self) -> int:
        """Bytes of finished audio (as PCM16) waiting for the next `flush` (silence gaps not counted)."""
        return 2 * sum(len(item) for item in self._outbox if isinstance(item, bytes))

    @property
    def dropped_ms(self) -> int:
        """Milliseconds of audio discarded: too late for the window, or too far ahead of the call's real time."""
        self._place_held()
        return self._dropped_samples // _SAMPLES_PER_MS

    def write_caller(self, ulaw: bytes, at_ms: int) -> None:
        """Place caller mu-law audio on the left channel starting at `at_ms` of the call."""
        self._write(0, ulaw, at_ms)

    def write_agent(self, ulaw: bytes, at_ms: int) -> None:
        """Place agent mu-law audio on the right channel starting at `at_ms` of the call."""
        self._write(1, ulaw, at_ms)

    def drop_agent_from(self, at_ms: int) -> int:
        """Silence the agent channel from `at_ms` of the call on: audio placed there was never heard (Twilio threw it
        away at a barge-in's `clear`). Returns how many milliseconds from `at_ms` on were already handed out to the
        file, where they stay: none while `at_ms` is at most half a window behind the newest audio.
        """
        if self._closed:
            raise RecorderClosedError(f"recording {self.path} is closed")
        if at_ms < 0:
            raise ValueError(f"at_ms must not be negative, got {at_ms}")
        position = at_ms * _SAMPLES_PER_MS
        held = self._held[1]
        del held[max(0, position - self._held_at[1]) :]
        begin = max(position, self._start)
        if begin < self._start + self._capacity:
            self._buffer[begin - self._start :, 1] = ULAW_SILENCE
        return max(0, self._start - position) // _SAMPLES_PER_MS

    def _write(self, channel: int, ulaw: bytes, at_ms: int) -> None:
        """Hold audio that continues the channel's held audio; place the rest now.

        Placing held audio later gives the same window as placing it at once, because nothing slides the window
        while audio is held: a write that would slide it first places everything held.
        """
        if self._closed:
            raise RecorderClosedError(f"recording {self.path} is closed")
        if at_ms < 0:
            raise ValueError(f"at_ms must not be negative, got {at_ms}")
        position = at_ms * _SAMPLES_PER_MS
        end = position + len(ulaw)
        if end > self._limit:
            self._limit = (self._elapsed_ms() + LEAD_MS) * _SAMPLES_PER_MS
        if end > self._limit:
            kept = max(0, self._limit - position)
            self._dropped_samples += len(ulaw) - kept
            ulaw = ulaw[:kept]
            if not ulaw:
                return
        held = self._held[channel]
        slides = position + len(ulaw) > self._start + self._capacity
        if slides:
            self._place_held()
        elif held and position == self._held_at[channel] + len(held):
            held += ulaw
            if len(held) >= _HOLD_BYTES:
                self._place(channel, bytes(held), self._held_at[channel])
                held.clear()
            return
        elif held:
            self._place(channel, bytes(held), self._held_at[channel])
            held.clear()
        if slides or len(ulaw) >= _HOLD_BYTES:
            self._place(channel, ulaw, position)
        else:
            self._held_at[channel] = position
            held += ulaw

    def _place_held(self) -> None:
        for channel, held in enumerate(self._held):
            if held:
                self._place(channel, bytes(held), self._held_at[channel])
                held.clear()

    def flush(self) -> None:
        """Write finished audio to the file (blocking I/O; run it with `asyncio.to_thread`).

        A write the disk refuses (full) raises OSError and leaves the file as it was: the audio waiting to be written
        is dropped but its length is kept, written as silence by a later flush, so what follows stays in its place
        on the call's timeline.
        """
        if self._closed:
            raise RecorderClosedError(f"recording {self.path} is closed")
        try:
            wav = self._open()
        except OSError:
            self._keep_as_silence(0)
            raise
        # popleft is atomic, so writes from the event loop may go on while this runs in a thread.
        while self._outbox:
            item = self._outbox.popleft()
            if isinstance(item, int):
                while item > 0:
                    count = min(item, _SILENCE_BLOCK_FRAMES)
                    self._append(wav, _SILENCE_BLOCK[: count * _BYTES_PER_FRAME], item)
                    item -= count
            else:
                self._append(wav, ulaw_to_pcm16(item).tobytes(), len(item) // 2)
        wav.count_data()

    def _append(self, wav: _WavFile, pcm: bytes, unwritten_frames: int) -> None:
        """Append to the file; if it refuses, what was to be written (`unwritten_frames`, the rest of the item being
        written) and the audio queued behind it are kept as that much silence to come."""
        try:
            wav.append(pcm)
        except OSError:
            self._keep_as_silence(unwritten_frames)
            raise

    def _keep_as_silence(self, frames: int) -> None:
        """Replace the queued audio by its length in silence, plus `frames` before it: memory stays bounded while the
        disk refuses writes, and the audio after it keeps its place on the call's timeline."""
        # Only the items queued now: the event loop may be appending more, which come after them.
        for _ in range(len(self._outbox)):
            item = self._outbox.popleft()
            frames += item if isinstance(item, int) else len(item) // 2
        self._outbox.appendleft(frames)

    def close(self) -> RecordingInfo:
        """Write everything left, finalise the WAV header and describe the file (blocking I/O)."""
        if self._closed:
            raise RecorderClosedError(f"recording {self.path} is closed")
        try:
            self._place_held()  # no writes come after close, so this thread may place them
            self.flush()
            wav = self._open()
            if self._head > self._start:
                wav.append(ulaw_to_pcm16(self._buffer[: self._head - self._start].tobytes()).tobytes())
            wav.count_data()
        finally:  # a recording that fails to close still lets its file go
            self._closed = True
            if self._wav is not None:
                self._wav.close()
        return RecordingInfo(
            path=self.path,
            duration_ms=self._head * 1000 // SAMPLE_RATE,
            bytes=self.path.stat().st_size,
        )

    def _place(self, channel: int, ulaw: bytes, position: int) -> None:
        samples = np.frombuffer(ulaw, dtype=np.uint8)
        if position < self._start:
            late = min(self._start - position, samples.size)
            self._dropped_samples += late
            samples = samples[late:]
            position += late
        half = self._capacity // 2
        # A piece of at most half a window always fits once the window has slid to end it.
        for offset in range(0, samples.size, half):
            piece = samples[offset : offset + half]
            begin = position + offset
            end = begin + piece.size
            if end > self._start + self._capacity:
                self._slide_to(end - half)
            self._buffer[begin - self._start : end - self._start, channel] = piece
            self._head = max(self._head, end)

    def _slide_to(self, new_start: int) -> None:
        shift = new_start - self._start
        if shift >= self._capacity:
            self._outbox.append(self._buffer.tobytes())
            if shift > self._capacity:
                self._outbox.append(shift - self._capacity)
            self._buffer[:] = ULAW_SILENCE
        else:
            self._outbox.append(self._buffer[:shift].tobytes())
            self._buffer[: self._capacity - shift] = self._buffer[shift:]
            self._buffer[self._capacity - shift :] = ULAW_SILENCE
        self._start = new_start

    def _open(self) -> _WavFile:
        if self._wav is None:
            self._wav = _WavFile(self.path)
        return self._wav


class _WavFile:
    """A stereo PCM16 WAV file being written. A write the disk refuses leaves the file as it was, and the header
    counts the data written each time `count_data` is called, so a process killed mid-call leaves a valid WAV."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._data_bytes = 0
        self._counted = -1
        try:
            self._write_all(_header(0))
        except OSError:
            self.close()
            raise

    def append(self, pcm: bytes) -> None:
        """Add frames after those written; on OSError the file is cut back to them."""
        try:
            self._write_all(pcm)
        except OSError:
            end = _HEADER.size + self._data_bytes
            os.ftruncate(self._fd, end)
            os.lseek(self._fd, end, os.SEEK_SET)
            raise
        self._data_bytes += len(pcm)

    def count_data(self) -> None:
        """Make the header count every frame written."""
        if self._counted != self._data_bytes:
            os.pwrite(self._fd, _header(self._data_bytes), 0)
            self._counted = self._data_bytes

    def close(self) -> None:
        """Let the file go."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


def _header(data_bytes: int) -> bytes:
    return _HEADER.pack(
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 2, SAMPLE_RATE, SAMPLE_RATE * _BYTES_PER_FRAME,
        _BYTES_PER_FRAME, 16, b"data", data_bytes,
    )  # fmt: skip


def repair_wav_header(path: Path) -> int | None:
    """Make the header of a recording its writer never closed (its process was killed mid-call) cover every whole
    frame the file holds; how many frames that is, or None for a file that is not a recording of ours. Blocking.

    The header counts the audio of the last `flush` that finished: audio a process killed mid-flush had appended is
    not counted, and files written before headers were kept up to date count only their first flush's audio.
    """
    with path.open("r+b") as file:
        header = file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        riff, _, form, fmt, fmt_size, encoding, channels, rate, _, align, bits, data, _ = _HEADER.unpack(header)
        ours = (riff, form, fmt, fmt_size, encoding, channels, rate, align, bits, data) == (
            b"RIFF",
            b"WAVE",
            b"fmt ",
            16,
            1,
            2,
            SAMPLE_RATE,
            _BYTES_PER_FRAME,
            16,
            b"data",
        )
        if not ours:
            return None
        frames = (file.seek(0, 2) - _HEADER.size) // _BYTES_PER_FRAME
        data_bytes = frames * _BYTES_PER_FRAME
        file.truncate(_HEADER.size + data_bytes)  # a frame torn by the kill is not audio
        file.seek(4)
        file.write(struct.pack("<I", 36 + data_bytes))
        file.seek(40)
        file.write(struct.pack("<I", data_bytes))
    return frames


def _milliseconds_since(origin: float) -> Callable[[], int]:
    """A function telling the milliseconds elapsed since the monotonic instant `origin`."""
    return lambda: round((time.monotonic() - origin) * 1000)
