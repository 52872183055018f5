"""Cut a stream of mu-law bytes of any chunk size into the 20 ms frames Twilio plays."""

from __future__ import annotations

from media.g711 import FRAME_BYTES, ULAW_SILENCE


class FrameSplitter:
    """Accumulate mu-law chunks and return exact 160-byte frames, keeping the remainder."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        """Create a splitter producing frames of `frame_bytes` bytes."""
        if frame_bytes <= 0:
            raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
        self._frame_bytes = frame_bytes
        self._pending = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Number of bytes held back, waiting to complete a frame."""
        return len(self._pending)

    def push(self, chunk: bytes | bytearray | memoryview) -> list[bytes]:
        """Add a chunk and return every frame it completes, in order."""
        self._pending += chunk
        size = self._frame_bytes
        whole = len(self._pending) - len(self._pending) % size
        if whole == 0:
            return []
        with memoryview(self._pending) as view:
            frames = [bytes(view[start : start + size]) for start in range(0, whole, size)]
        del self._pending[:whole]
        return frames

    def flush(self, pad: bool = True) -> bytes | None:
        """Return the last partial frame, padded with mu-law silence unless `pad` is false."""
        if not self._pending:
            return None
        tail = bytes(self._pending)
        self._pending.clear()
        if pad:
            tail += bytes([ULAW_SILENCE]) * (self._frame_bytes - len(tail))
        return tail
