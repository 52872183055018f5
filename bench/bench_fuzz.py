"""Engine memory across storms of malformed media frames and hostile webhooks, on loopback.

Starts `dialtone serve` as its own process on an embedded PostgreSQL with the demo seeded, then, each round,
sends malformed frames on media sockets (before `start`, and after it on calls the voice webhook answered) and
signed webhooks with fields Twilio never sends. Prints the engine's RSS after every round: memory that keeps
growing round after round is kept per rejected socket, frame or request. Asserts nothing.

Usage: python -m bench.bench_fuzz [rounds] [sockets per round]   (default: 5 400)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import sys
from collections import Counter

import aiohttp
import psutil
from twilio.request_validator import RequestValidator

from bench.bench_calls import dialtone_serve
from storage.demo import DEMO_PHONE_NUMBER

TOKEN = secrets.token_hex(16)
CONCURRENCY = 20
CALL_EVERY = int(os.environ.get("FUZZ_CALL_EVERY", "8"))
"""One socket in this many runs a call before its malformed frame (FUZZ_CALL_EVERY; 0: none)."""
CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
_STREAM_SID = "MZ" + "7" * 32


def _media(timestamp: str, payload: str = "//8=") -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "2",
            "streamSid": _STREAM_SID,
            "media": {"track": "inbound", "chunk": "1", "timestamp": timestamp, "payload": payload},
        }
    )


MALFORMED = [
    "[" * 3000,
    _media("9" * 5000),
    _media("140400000"),  # 39 hours on
    _media("0", "%%%"),
    "{not json",
    json.dumps({"event": "teleport"}),
    json.dumps({"event": "media", "padding": "x" * 200_000}),
    json.dumps({"event": "media", "padding": "x" * 1_100_000}),
]
"""Frames the fuzz run found defects with, and the ordinary malformed ones."""


def _hostile_forms(number: str) -> list[tuple[str, dict[str, str]]]:
    sid = "CA" + secrets.token_hex(16)
    ring = {"CallSid": sid, "AccountSid": "AC" + "1" * 32, "From": "+15005550006", "To": number}
    return [
        ("/twilio/voice", {**ring, "CallSid": sid[:-1] + "\x00"}),
        ("/twilio/voice", {**ring, "From": "+1" + "5" * 5000}),
        ("/twilio/voice", {**ring, "CallerName": "x\x00y"}),
        ("/twilio/status", {"CallSid": sid, "CallStatus": "completed", "CallDuration": "9" * 5000}),
        ("/twilio/status", {"CallSid": sid, "CallStatus": "completed", "CallDuration": "²"}),
        ("/twilio/amd", {"CallSid": sid, "AnsweredBy": "machine_start", "MachineDetectionDuration": "²"}),
    ]


async def _signed_post(http: aiohttp.ClientSession, base: str, path: str, form: dict[str, str]) -> int:
    signature = RequestValidator(TOKEN).compute_signature(f"{base}{path}", form)
    async with http.post(f"{base}{path}", data=form, headers={"X-Twilio-Signature": signature}) as response:
        await response.read()
        return response.status


async def _answer(http: aiohttp.ClientSession, base: str) -> tuple[str, str, str]:
    """Ring the demo line; (CallSid, CallLog id, media URL)."""
    call_sid = "CA" + secrets.token_hex(16)
    form = {"CallSid": call_sid, "AccountSid": "AC" + "1" * 32, "From": "+15005550006", "To": DEMO_PHONE_NUMBER}
    signature = RequestValidator(TOKEN).compute_signature(f"{base}/twilio/voice", form)
    async with http.post(f"{base}/twilio/voice", data=form, headers={"X-Twilio-Signature": signature}) as response:
        twiml = await response.text()
    return call_sid, twiml.split('name="callLogId" value="')[1].split('"')[0], twiml.split('url="')[1].split('"')[0]


def _start(call_sid: str, call_log_id: str) -> str:
    start = {
        "streamSid": _STREAM_SID,
        "accountSid": "AC" + "1" * 32,
        "callSid": call_sid,
        "tracks": ["inbound"],
        "customParameters": {"callLogId": call_log_id},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": _STREAM_SID, "start": start})


async def _socket(http: aiohttp.ClientSession, base: str, frame: str, *, started: bool) -> str:
    """One media socket carrying one malformed frame; how it ended."""
    media_url = base.replace("http://", "ws://") + "/twilio/media"
    opening = [CONNECTED]
    if started:
        call_sid, call_log_id, media_url = await _answer(http, base)
        opening.append(_start(call_sid, call_log_id))
    try:
        # Signed as Twilio signs the upgrade: an unsigned one is refused before any frame is read.
        signature = RequestValidator(TOKEN).compute_signature(media_url, {})
        async with http.ws_connect(media_url, headers={"X-Twilio-Signature": signature}) as ws:
            for text in [*opening, frame]:
                await ws.send_str(text)
            while (await ws.receive(timeout=30)).type not in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                pass
            return f"closed {ws.close_code}"
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:  # the engine may close before the last send
        return type(exc).__name__


async def _round(base: str, sockets: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(CONCURRENCY)
    frames = itertools.cycle(MALFORMED)

    async def one(index: int) -> None:
        async with gate:
            started = CALL_EVERY > 0 and index % CALL_EVERY == 0  # a CallLog and a pipeline each
            outcomes[await _socket(http, base, next(frames), started=started)] += 1
            for path, form in _hostile_forms(DEMO_PHONE_NUMBER) if index % 2 == 0 else []:
                outcomes[f"{path} {await _signed_post(http, base, path, form)}"] += 1
            async with http.post(f"{base}/twilio/voice", data=b"CallSid=\xff\xfe") as response:
                outcomes[f"non-UTF-8 body {response.status}"] += 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(index) for index in range(sockets)))
    return outcomes


async def main(rounds: int, sockets: int) -> None:
    async with dialtone_serve(TWILIO_AUTH_TOKEN=TOKEN, DIALTONE_LOG_LEVEL="ERROR") as (base, _, pid):
        engine = psutil.Process(pid)
        await _round(base, 16)  # warm-up: models, caches, connections
        print(f"fuzz storms against `dialtone serve` (pid {pid}), {sockets} sockets a round:")
        print(f"  before:   {engine.memory_info().rss / 2**20:6.1f} MB")
        for number in range(1, rounds + 1):
            outcomes = await _round(base, sockets)
            await asyncio.sleep(2)  # let calls finish their wrap-up
            rss = engine.memory_info().rss / 2**20
            print(f"  round {number}:  {rss:6.1f} MB   {dict(sorted(outcomes.items()))}")


if __name__ == "__main__":
    arguments = [int(argument) for argument in sys.argv[1:]]
    asyncio.run(main(*(arguments + [5, 400][len(arguments) :])))
