"""FrameSplitter: exact 20 ms frames from chunks of any size."""

from __future__ import annotations

import numpy as np

from media.framing import FrameSplitter
from media.g711 import FRAME_BYTES, FRAME_MS, ULAW_SILENCE

STREAM = np.random.default_rng(7).integers(0, 256, FRAME_BYTES * 25 + 37, dtype=np.uint8).tobytes()


def split(chunks: list[bytes]) -> tuple[list[bytes], bytes | None]:
    splitter = FrameSplitter()
    frames = [frame for chunk in chunks for frame in splitter.push(chunk)]
    return frames, splitter.flush()


def chunk_randomly(data: bytes, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    chunks, start = [], 0
    while start < len(data):
        size = int(rng.choice([1, 3, 159, 160, 161, 500, 2000]))
        chunks.append(data[start : start + size])
        start += size
    return chunks


def test_frame_constants_describe_20_ms_of_8khz_ulaw() -> None:
    assert FRAME_MS == 20
    assert FRAME_BYTES == 8 * FRAME_MS


def test_arbitrary_chunkings_give_identical_frames() -> None:
    reference = split([STREAM])
    for seed in range(20):
        assert split(chunk_randomly(STREAM, seed)) == reference


def test_every_frame_is_exactly_160_bytes_in_stream_order() -> None:
    frames, tail = split([STREAM])
    assert all(len(frame) == FRAME_BYTES for frame in frames)
    assert b"".join(frames) + (tail or b"")[:37] == STREAM


def test_remainder_is_kept_until_the_next_chunk_completes_a_frame() -> None:
    splitter = FrameSplitter()
    assert splitter.push(b"\x01" * 100) == []
    assert splitter.pending_bytes == 100
    assert splitter.push(b"\x02" * 60) == [b"\x01" * 100 + b"\x02" * 60]
    assert splitter.pending_bytes == 0


def test_flush_pads_the_last_partial_frame_with_ulaw_silence() -> None:
    splitter = FrameSplitter()
    splitter.push(b"\x10" * 37)
    assert splitter.flush() == b"\x10" * 37 + bytes([ULAW_SILENCE]) * (FRAME_BYTES - 37)


def test_flush_without_padding_returns_the_raw_remainder() -> None:
    splitter = FrameSplitter()
    splitter.push(b"\x10" * 37)
    assert splitter.flush(pad=False) == b"\x10" * 37


def test_flush_leaves_the_splitter_empty() -> None:
    splitter = FrameSplitter()
    splitter.push(b"\x10" * 37)
    splitter.flush()
    assert splitter.flush() is None
    assert splitter.pending_bytes == 0


def test_empty_input_yields_nothing() -> None:
    splitter = FrameSplitter()
    assert splitter.push(b"") == []
    assert splitter.flush() is None
