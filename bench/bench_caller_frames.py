"""CPU per caller frame in the engine's own code: Twilio media frames through `CallSession.receive_frames`.

    .venv/bin/python -m bench.bench_caller_frames [--calls 100] [--seconds 30] [--runs 5] [--batch 5]

The path each of the 50 frames a second of every call takes (the Twilio stream's fast path, the recording's
caller channel, the VAD, the hand-off to Deepgram, turn-taking), on real sessions of the cloud pipeline's
default agent with recording on: nothing connects (Deepgram's recognizer only queues what it is given, the
CallLog writer's pool is never opened) and time is a clock the loop moves 20 ms a frame. `--calls` sessions take
their frames in turn, `--batch` at a time (default: as many as a call reads at once while nothing is decided on
the next frame, engine/call/caller_reads.py; 1: each as it lands), as an engine's calls do. Each caller speaks
1.6 s (tones with noise, which the VAD hears as speech) then is silent 4.4 s, over and over. Prints the process
time per frame, best of `--runs`; asserts nothing. What a whole call costs lives in bench/bench_cloud.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import numpy as np

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.call.call_log_writer import CallLogWriter
from engine.call.caller_reads import BATCH_FRAMES
from engine.call.cascade import pipeline_driver
from engine.call.phases import CallPhase
from engine.call.session import CallContext, CallSession
from media.g711 import FRAME_BYTES, ULAW_SILENCE
from media.recording import StereoWavRecorder
from media.twilio_stream import TwilioStream
from pipelines.clients import ProviderClients
from pipelines.registry import ProviderContext, ProviderKeys, build_pipeline

NOWHERE = "http://127.0.0.1:9"
"""Where the providers would be: never reached, as nothing connects."""
STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "0" * 32
SPEECH_FRAMES, CYCLE_FRAMES = 80, 300
"""1.6 s of speech in every 6 s."""


class FrameClock:
    """The sessions' time: moved on by the loop, 20 ms a frame."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def caller_frames(count: int) -> list[str]:
    """Twilio media frames as Twilio spells them: 1.6 s of speech-like audio, then silence, over and over."""
    rng = np.random.default_rng(1)
    t = np.arange(FRAME_BYTES)
    voiced = [
        np.clip(128 + 90 * np.sin(t / (2 + k % 5)) + rng.normal(0, 8, FRAME_BYTES), 0, 255).astype(np.uint8).tobytes()
        for k in range(SPEECH_FRAMES)
    ]
    silence = bytes([ULAW_SILENCE]) * FRAME_BYTES
    frames = []
    for i in range(count):
        payload = voiced[i % SPEECH_FRAMES] if i % CYCLE_FRAMES < SPEECH_FRAMES else silence
        encoded = base64.b64encode(payload).decode()
        frames.append(
            f'{{"event":"media","sequenceNumber":"{i + 2}","streamSid":"{STREAM_SID}","media":{{"track":"inbound",'
            f'"chunk":"{i + 1}","timestamp":"{i * 20}","payload":"{encoded}"}}}}'
        )
    return frames


def started_stream(clock: FrameClock) -> TwilioStream:
    """A Twilio stream past its `connected` and `start`."""
    stream = TwilioStream(clock=clock)
    stream.receive_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    start = {
        "streamSid": STREAM_SID,
        "accountSid": "AC" + "0" * 32,
        "callSid": CALL_SID,
        "tracks": ["inbound"],
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    stream.receive_text(json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": STREAM_SID}))
    return stream


def session(pool: asyncpg.Pool, clock: FrameClock, folder: Path, index: int) -> CallSession:
    """A call on the cloud pipeline's default agent, recording on, whose stream has started."""
    settings = load_settings(
        deepgram_api_key="dg",
        openai_api_key="sk",
        elevenlabs_api_key="el",
        deepgram_url=NOWHERE,
        openai_base_url=f"{NOWHERE}/v1",
        elevenlabs_url=NOWHERE,
    )
    config = parse_agent_configuration(
        {
            "stt": {"provider": "deepgram"},
            "llm": {"provider": "openai"},
            "tts": {"provider": "elevenlabs", "voice": "21m00Tcm4TlvDq8ikWAM"},
            "recording": True,
        }
    )
    pipeline = build_pipeline(
        config, context=ProviderContext(keys=ProviderKeys(settings, organization_id=None), clients=ProviderClients())
    )
    stream = started_stream(clock)
    recorder = StereoWavRecorder(folder / f"call-{index}.wav", elapsed_ms=stream.elapsed_ms)
    writer = CallLogWriter(pool, organization_id="org", call_log_id=f"call-{index}", agent_id="agent", node_id="bench")

    async def send(text: str) -> None:
        """The agent says nothing here."""

    call = CallSession(
        context=CallContext(f"call-{index}", "org", "agent", CALL_SID),
        config=config,
        driver=pipeline_driver(pipeline, first_sentence=None),
        stream=stream,
        send=send,
        writer=writer,
        recorder=recorder,
        clock=clock,
    )
    return call


async def one_run(calls: int, frames: Sequence[str], batch: int) -> float:
    """Process seconds per frame for `calls` sessions taking `frames` in turn, `batch` at a time."""
    pool = await asyncpg.create_pool(f"postgresql://{NOWHERE.removeprefix('http://')}/none", min_size=0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            clock = FrameClock()
            sessions = [session(pool, clock, Path(folder), i) for i in range(calls)]
            began = time.process_time()
            for i in range(0, len(frames), batch):
                clock.now = (i + batch - 1) * 0.02  # a batch is read as its last frame lands
                texts = list(frames[i : i + batch])
                for call in sessions:
                    call.receive_frames(texts)  # the recordings' thread writing files is not timed here
            spent = time.process_time() - began
            if any(call.phase is CallPhase.ENDED for call in sessions):
                raise RuntimeError("a call ended: the figure would not be the frame path's")
    finally:
        await pool.close()
    return spent / (len(frames) * calls)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the process time a caller frame takes through the session, best of `--runs`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100, help="sessions taking their frames in turn")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per call")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=BATCH_FRAMES, help="frames a call reads at once")
    args = parser.parse_args(argv)
    frames = caller_frames(round(args.seconds * 50))
    best = min(asyncio.run(one_run(args.calls, frames, args.batch)) for _ in range(args.runs))
    print(
        f"{best * 1e6:.2f} µs of process time per caller frame through CallSession.receive_frames "
        f"({args.calls} calls x {args.seconds:g} s, {args.batch} frames a read, recording on, best of {args.runs})"
    )


if __name__ == "__main__":
    main()
