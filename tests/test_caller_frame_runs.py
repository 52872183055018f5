"""A read of several Twilio frames goes through the call in runs of caller audio back to back: each frame to the
driver, each run to the recording in place, and the messages between them in their turn."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import asyncpg
import numpy as np

from bench.bench_caller_frames import STREAM_SID, FrameClock, caller_frames, session
from media.g711 import FRAME_BYTES, ulaw_to_pcm16
from tests.test_media_recording import read_wav


def media_frame(sequence: int, chunk: int, at_ms: int, payload: bytes, track: str = "inbound") -> str:
    encoded = base64.b64encode(payload).decode()
    return (
        f'{{"event":"media","sequenceNumber":"{sequence}","streamSid":"{STREAM_SID}","media":{{"track":"{track}",'
        f'"chunk":"{chunk}","timestamp":"{at_ms}","payload":"{encoded}"}}}}'
    )


async def test_a_read_of_frames_is_recorded_in_place_around_other_messages_and_another_track_is_not_the_caller(
    tmp_path: Path,
) -> None:
    pool = await asyncpg.create_pool("postgresql://127.0.0.1:9/none", min_size=0)  # never connects
    try:
        clock = FrameClock()
        call = session(pool, clock, tmp_path, 0)
        heard: list[int] = []  # the timestamps of the frames the driver was given as the caller's
        take = call._driver.on_caller_audio

        def on_caller_audio(payload: bytes, at_ms: int) -> None:
            heard.append(at_ms)
            take(payload, at_ms)

        call._driver.on_caller_audio = on_caller_audio  # type: ignore[method-assign]
        frames = caller_frames(12)  # inbound chunks 1-12, 20 ms apart from 0 ms, speech-like
        mark = json.dumps({"event": "mark", "sequenceNumber": "90", "streamSid": STREAM_SID, "mark": {"name": "x"}})
        # Twilio's outbound track (a stream of both tracks): what it plays to the caller, not the caller.
        loud = bytes([0x00]) * FRAME_BYTES
        other = [media_frame(91 + n, 1 + n, 1000 + 20 * n, loud, "outbound") for n in range(2)]
        clock.now = 0.1
        call.receive_frames([*frames[:5], other[0]])
        clock.now = 0.24
        call.receive_frames([*frames[5:7], mark, *frames[7:9], other[1], *frames[9:12]])

        recorder = call._recorder
        assert recorder is not None
        info = recorder.close()
    finally:
        await pool.close()
    assert heard == [20 * n for n in range(12)]
    payloads = b"".join(base64.b64decode(json.loads(text)["media"]["payload"]) for text in frames)
    _, samples = read_wav(info.path)
    caller = samples.reshape(-1, 2)[:, 0]
    assert np.array_equal(caller[:1920], ulaw_to_pcm16(payloads))  # 0-240 ms: the twelve frames in place
    assert not caller[1920:].any()  # the outbound track's loud frames are not in the caller's channel
