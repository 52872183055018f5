"""Listening in to calls through the real server: a simulated call, a listener on a real WebSocket, and the audio
it hears compared with what the caller sent, what the caller heard and the call's recording, on the process that
holds the call and on another; a slow listener dropped while the call goes on; who may listen (not a VIEWER)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np
import numpy.typing as npt
import pytest
import websockets

from config.settings import load_settings
from engine.api import key_watch
from engine.api.resources.live_call_listen import KEY_LOST
from engine.call.audio_tap import CALL_ENDED, CHUNK_BYTES, LISTENER_TOO_SLOW
from engine.call.listen_relay import LISTEN_AUDIO_CHANNEL
from engine.simulator import CallResult, HangUp, Pause, PlayWav
from engine.simulator.audio import read_wav, synthesize_speech
from media.g711 import BYTES_PER_MS, FRAME_BYTES, SAMPLE_RATE, ULAW_SILENCE, ulaw_to_pcm16
from storage import api_keys
from storage.call_turns import list_turns
from storage.recordings import recording_path
from storage.records import new_id
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_calls_e2e import TOKEN, call, call_log, make_line
from tests.test_repo_call_logs import open_call


@dataclass(frozen=True, slots=True)
class Engines:
    """Two engine processes on one database; calls are placed on `holder`, whose state folder is `state`."""

    holder: str
    other: str
    state: Path


@pytest.fixture(scope="module")
async def engines(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engines]:
    state = tmp_path_factory.mktemp("holder")
    async with (
        running_engine(db_url, twilio_auth_token=TOKEN, state_dir=state, listen_buffer_ms=500) as holder,
        running_engine(db_url, twilio_auth_token=TOKEN, listen_buffer_ms=500) as other,
    ):
        yield Engines(holder, other, state)


@pytest.fixture(scope="module")
async def caller_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the caller says, as a WAV file the simulated caller plays."""
    path = tmp_path_factory.mktemp("caller") / "booking.wav"
    speech = ulaw_to_pcm16(await synthesize_speech("I would like to book an appointment", "en-us"))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(speech.astype("<i2").tobytes())
    return path


@dataclass(slots=True)
class Listened:
    """What a listener got: the start message, the audio of every binary message, and the stop message."""

    start: dict[str, Any]
    protocol: str | None
    messages: int = 0
    audio: bytearray = field(default_factory=bytearray)
    stop: dict[str, Any] | None = None


def url_of(base: str, call_log_id: str, query: str = "") -> str:
    """The listen WebSocket of a call."""
    return f"{base}/v1/live-calls/{call_log_id}/listen{query}"


def key_protocol(key: str) -> str:
    """The subprotocol carrying an API key, as a browser offers it."""
    return "dialtone.key." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


async def listen(ws: aiohttp.ClientWebSocketResponse, listened: Listened | None = None) -> Listened:
    """Read a listen socket to its end."""
    if listened is None:
        start = await ws.receive_json(timeout=10)
        listened = Listened(start, ws.protocol)
    async for message in ws:
        if message.type is aiohttp.WSMsgType.BINARY:
            listened.messages += 1
            listened.audio += message.data
        elif message.type is aiohttp.WSMsgType.TEXT:
            listened.stop = message.json()
    return listened


async def running_here(api: Api, key: str) -> str:
    """The id of the organization's call once the engine `api` speaks to runs it."""
    for _ in range(300):
        _, page = await api.call("GET", "/live-calls", key)
        if page["data"] and page["data"][0]["runsHere"]:
            return str(page["data"][0]["id"])
        await asyncio.sleep(0.05)
    raise AssertionError("the call never ran on that engine")


def recording_of(state: Path, db_url: str, tenant: Tenant, call_log_id: str) -> npt.NDArray[np.int16]:
    """The stereo recording of a call held by the engine whose state folder is `state`, as (samples, 2) PCM16."""
    settings = load_settings(database_url=db_url, state_dir=state)
    with wave.open(str(recording_path(settings, tenant.organization_id, call_log_id)), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, SAMPLE_RATE)
        frames = wav.readframes(wav.getnframes())
    return np.frombuffer(frames, dtype="<i2").reshape(-1, 2)


def offsets_matching(heard: npt.NDArray[np.int16], expected: npt.NDArray[np.int16]) -> list[int]:
    """The chunk-aligned offsets in `expected` (the recording's timeline) where `heard` matches sample for sample,
    from its first chunk: a listener joining as the agent speaks hears the audio already sent ahead of playback."""
    matches = []
    for offset in range(0, len(expected) - len(heard) + 1, CHUNK_BYTES):
        if np.array_equal(heard, expected[offset : offset + len(heard)]):
            matches.append(offset)
    return matches


def without_silence(ulaw: bytes | bytearray) -> bytes:
    """μ-law audio with its zero samples taken out: what is left is the order of the sounds."""
    return bytes(ulaw).replace(bytes([ULAW_SILENCE]), b"")


@dataclass(frozen=True, slots=True)
class ListenedCall:
    """A call the caller played `caller_wav` on, listened to from its start: its ids, the listener's audio and what
    the simulated caller saw."""

    tenant: Tenant
    call_log_id: str
    listened: Listened
    result: CallResult


async def listened_call(
    pool: asyncpg.Pool,
    engine: str,
    listener_engine: str,
    caller_wav: Path,
    query: str = "",
    *,
    browser: bool,
    first_sentence: str = "Hello from the listening line. Tell me what you need today.",
    barge_in_after_ms: int | None = None,
) -> ListenedCall:
    """A call to a new offline agent whose first sentence is `first_sentence`, listened to (see `listen_to_call`)."""
    tenant = await make_tenant(pool, "Listened")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence=first_sentence)
    return await listen_to_call(
        pool,
        tenant,
        number,
        caller_wav,
        engine=engine,
        listener_engine=listener_engine,
        query=query,
        browser=browser,
        barge_in_after_ms=barge_in_after_ms,
    )


async def listen_to_call(
    pool: asyncpg.Pool,
    tenant: Tenant,
    number: str,
    caller_wav: Path,
    *,
    engine: str,
    listener_engine: str,
    query: str = "",
    browser: bool,
    barge_in_after_ms: int | None = None,
) -> ListenedCall:
    """Call `tenant`'s `number` on `engine` and listen to it through `listener_engine` until it ends, with the key in
    the Authorization header, or as a `browser` offers it: a subprotocol. The caller plays `caller_wav` once the agent's
    first utterance is over, or `barge_in_after_ms` into it."""
    connect: dict[str, Any] = (
        {"protocols": ("dialtone.listen", key_protocol(tenant.owner_key))}
        if browser
        else {"headers": {"Authorization": f"Bearer {tenant.owner_key}"}}
    )
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(call(engine, number, PlayWav(caller_wav, barge_in_after_ms=barge_in_after_ms)))
        call_log_id = await running_here(Api(session, engine), tenant.owner_key)
        async with session.ws_connect(url_of(listener_engine, call_log_id, query), **connect) as ws:
            listened = await listen(ws)
        result = await running
    await call_log(pool, result)
    return ListenedCall(tenant, call_log_id, listened, result)


def assert_silent_from_the_barge_in(heard_call: ListenedCall, recording: npt.NDArray[np.int16]) -> int:
    """Check a call whose caller cut the agent's first utterance: the agent's channel of its `recording`, and of what
    its listener (who joined before the barge-in) heard, is silent from where the caller stopped hearing the agent
    until the agent's next utterance. Returns where they stopped hearing it, in samples from the call's start."""
    result = heard_call.result
    interrupted, reply = result.utterances[0], result.utterances[-1]
    assert interrupted.cleared and result.clears and not reply.cleared
    # What the caller heard is on the call's timeline (a frame every 20 ms from 0): the clear reached them where
    # the utterance they heard ends, and the agent spoke next where its reply begins.
    caller_heard = bytes(result.heard)
    tail = bytes(interrupted.audio[-200 * BYTES_PER_MS :])
    cut = caller_heard.rindex(tail) + len(tail)
    answer = caller_heard.index(bytes(reply.audio[: 200 * BYTES_PER_MS]))
    assert answer - cut > 500 * BYTES_PER_MS
    # The engine places the agent's audio where it expects the caller to hear it, a little before they do; it cut
    # at the caller's last frame, at most where they stopped hearing.
    unheard = slice(cut + FRAME_BYTES, answer - 100 * BYTES_PER_MS)

    agent = recording[:, 1]
    assert agent[cut - 300 * BYTES_PER_MS : cut - FRAME_BYTES].any()  # the agent, up to the barge-in
    assert not agent[unheard].any()  # then nothing the caller did not hear
    listened = ulaw_to_pcm16(bytes(heard_call.listened.audio)).reshape(-1, 2)
    (joined,) = offsets_matching(listened[:, :1], recording[:, :1])  # placed on the timeline by the caller's side
    assert joined < cut - 300 * BYTES_PER_MS  # listening before the barge-in
    assert not listened[unheard.start - joined : unheard.stop - joined, 1].any()
    assert np.array_equal(listened, recording[joined : joined + len(listened)])
    return cut


async def test_a_listener_hears_the_caller_left_and_the_agent_right_as_the_recording_holds_them(
    engines: Engines, db_url: str, pool: asyncpg.Pool, caller_wav: Path
) -> None:
    heard_call = await listened_call(pool, engines.holder, engines.holder, caller_wav, browser=True)
    listened, result = heard_call.listened, heard_call.result

    assert listened.protocol == "dialtone.listen"
    assert listened.start == {
        "event": "start",
        "callLogId": heard_call.call_log_id,
        "sampleRate": 8000,
        "channels": 2,
        "encoding": "mulaw",
    }
    assert listened.stop == {"event": "stop", "reason": CALL_ENDED}
    assert len(listened.audio) == listened.messages * 2 * CHUNK_BYTES  # 100 ms a message
    frames = np.frombuffer(bytes(listened.audio), dtype=np.uint8).reshape(-1, 2)
    left, right = frames[:, 0].tobytes(), frames[:, 1].tobytes()
    assert read_wav(caller_wav) in left  # what the caller sent, sample for sample
    reply = result.utterances[-1]
    assert len(result.utterances) >= 2 and not reply.cleared
    assert without_silence(reply.audio) in without_silence(right)  # what the caller heard of the reply
    heard = ulaw_to_pcm16(bytes(listened.audio)).reshape(-1, 2)
    recording = recording_of(engines.state, db_url, heard_call.tenant, heard_call.call_log_id)
    assert len(offsets_matching(heard, recording)) == 1


async def test_a_listener_on_another_engine_process_hears_the_call_mixed_as_pcm16(
    engines: Engines, db_url: str, pool: asyncpg.Pool, caller_wav: Path
) -> None:
    query = "?channels=mixed&encoding=pcm16"
    heard_call = await listened_call(pool, engines.holder, engines.other, caller_wav, query, browser=False)
    listened = heard_call.listened

    assert listened.start["channels"] == 1 and listened.start["encoding"] == "pcm16"
    assert listened.stop == {"event": "stop", "reason": CALL_ENDED}
    heard = np.frombuffer(bytes(listened.audio), dtype="<i2")
    assert len(heard) == listened.messages * CHUNK_BYTES
    recording = recording_of(engines.state, db_url, heard_call.tenant, heard_call.call_log_id).astype(np.int32)
    mixed = np.clip(recording[:, 0] + recording[:, 1], -32768, 32767).astype(np.int16)
    assert len(offsets_matching(heard, mixed)) == 1
    caller = ulaw_to_pcm16(read_wav(caller_wav)).astype(np.int32)
    assert np.abs(heard).max() > 1000 and len(heard) > len(caller)  # the caller's speech and the agent's, both


async def test_the_agent_audio_a_barge_in_threw_away_is_neither_recorded_nor_heard_by_a_listener(
    engines: Engines, db_url: str, pool: asyncpg.Pool, caller_wav: Path
) -> None:
    opening = (
        "Welcome to the listening line. This opening is long on purpose, so that the caller has plenty of time to "
        "interrupt it before it ends."
    )
    heard_call = await listened_call(
        pool, engines.holder, engines.holder, caller_wav, browser=False, first_sentence=opening, barge_in_after_ms=1500
    )
    recording = recording_of(engines.state, db_url, heard_call.tenant, heard_call.call_log_id)
    cut = assert_silent_from_the_barge_in(heard_call, recording)
    # The agent's cut turn keeps what the recording kept of the opening: it ends where the agent's channel goes
    # silent (give or take the rounding of each chunk's place to the millisecond), and so do its words.
    turns = await list_turns(
        pool, organization_id=heard_call.tenant.organization_id, call_log_id=heard_call.call_log_id
    )
    agent_turn = turns[0]
    assert agent_turn.speaker == "agent" and agent_turn.interrupted
    end = agent_turn.end_ms * BYTES_PER_MS
    agent = recording[:, 1]
    assert not agent[end + FRAME_BYTES : cut].any()  # nothing the turn leaves out was recorded
    assert agent[end - 400 * BYTES_PER_MS : end - FRAME_BYTES].any()  # it ends within a word of the last recorded
    heard, said = agent_turn.text.split(), opening.split()
    assert 0 < len(heard) < len(said) and heard == said[: len(heard)]


async def not_reading(url: str, key: str) -> websockets.ClientConnection:
    """A listen socket that takes little from the network until it is read: a small receive buffer, one message
    queued."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await websockets.connect(
        url.replace("http://", "ws://"),
        sock=sock,
        additional_headers={"Authorization": f"Bearer {key}"},
        max_queue=1,
    )


async def test_a_slow_listener_is_dropped_while_the_call_and_another_listener_go_on(
    engines: Engines, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Slow")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the slow line.")
    headers = {"Authorization": f"Bearer {tenant.owner_key}"}
    url_query = "?encoding=pcm16"  # 32 kB a second: a listener that does not read falls behind fast
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(call(engines.holder, number, Pause(8000), HangUp()))
        call_log_id = await running_here(Api(session, engines.holder), tenant.owner_key)
        slow_ws = await not_reading(url_of(engines.holder, call_log_id, url_query), tenant.owner_key)
        async with session.ws_connect(url_of(engines.holder, call_log_id, url_query), headers=headers) as fast_ws:
            fast = Listened(await fast_ws.receive_json(timeout=10), fast_ws.protocol)
            following = asyncio.create_task(listen(fast_ws, fast))
            await asyncio.sleep(5)  # the slow listener reads nothing meanwhile (it falls behind after about 4 s)
            slow_messages, slow_stop = 0, None
            async for message in slow_ws:
                if isinstance(message, bytes):
                    slow_messages += 1
                else:
                    slow_stop = json.loads(message)
            assert slow_stop == {"event": "stop", "reason": LISTENER_TOO_SLOW}
            assert not following.done()  # the call, and the other listener, go on
            await following
        result = await running
    log = await call_log(pool, result)
    assert (log["status"], log["metadata"]["endReason"]) == ("COMPLETED", "caller_hangup")
    assert fast.stop == {"event": "stop", "reason": CALL_ENDED}
    assert 0 < slow_messages < fast.messages
    assert fast.messages >= 65  # the call's 8 s, less the moment it took to join


async def test_nobody_listening_costs_no_published_audio(engines: Engines, db_url: str, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Quiet")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Nobody listens to this line.")
    published: list[str] = []
    conn = await asyncpg.connect(db_url)
    try:
        await conn.add_listener(LISTEN_AUDIO_CHANNEL, lambda *args: published.append(args[3]))
        result = await call(engines.holder, number, Pause(2000), HangUp())
        await call_log(pool, result)
        await conn.execute("SELECT 1")  # NOTIFYs sent before this have reached the connection
    finally:
        await conn.close()
    # Audio flowed both ways (how many caller frames depends on the machine: the simulator keeps real time, skipping
    # frames when its loop stalls), and none of it was published.
    assert result.media_frames_sent > 0 and result.utterances, "no audio flowed"
    assert published == []


# ------------------------------------------------------------------------------------------ who may listen


async def refusal(
    base: str,
    call_log_id: str,
    query: str = "",
    *,
    key: str | None = None,
    protocols: tuple[str, ...] | None = None,
) -> tuple[int, str]:
    """The HTTP status and error message a listen socket is refused with (the key as a header, or in `protocols`)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else None
    url = url_of(base, call_log_id, query).replace("http://", "ws://")
    subprotocols = [websockets.Subprotocol(protocol) for protocol in protocols or ()]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers, subprotocols=subprotocols or None)
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}")["error"]["message"]


async def test_the_key_may_come_as_a_subprotocol_and_a_bad_one_is_refused(engines: Engines, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Keys")
    log = await open_call(pool, tenant.organization_id)  # in progress, held by no engine yet
    status, _ = await refusal(engines.holder, log.id, protocols=("dialtone.listen", key_protocol(tenant.owner_key)))
    assert status == 409  # past the key: the call has no process to listen from yet
    for protocols in [("dialtone.listen", key_protocol("sk_live_unknown")), ("dialtone.listen", "dialtone.key.%%")]:
        status, _ = await refusal(engines.holder, log.id, protocols=protocols)
        assert status == 401
    status, message = await refusal(engines.holder, log.id)
    assert status == 401 and "dialtone.key." in message


async def test_another_organizations_key_cannot_listen(engines: Engines, pool: asyncpg.Pool) -> None:
    owner, stranger = await make_tenant(pool, "Owner"), await make_tenant(pool, "Stranger")
    log = await open_call(pool, owner.organization_id, metadata={"engineNode": new_id()})
    status, _ = await refusal(engines.other, log.id, protocols=("dialtone.listen", key_protocol(stranger.owner_key)))
    assert status == 404
    status, _ = await refusal(engines.other, log.id, key=stranger.owner_key)
    assert status == 404


async def test_a_viewers_key_cannot_listen_as_it_cannot_say_or_hang_up(engines: Engines, pool: asyncpg.Pool) -> None:
    tenant = await make_tenant(pool, "Viewers")
    log = await open_call(pool, tenant.organization_id, metadata={"engineNode": new_id()})
    as_header = await refusal(engines.holder, log.id, key=tenant.viewer_key)
    as_browser = await refusal(engines.holder, log.id, protocols=("dialtone.listen", key_protocol(tenant.viewer_key)))
    refused = (
        403,
        "this API key's user is a VIEWER of the organization and can only read: listening to a call needs an "
        "OWNER's or ADMIN's key",
    )
    assert as_header == refused and as_browser == refused
    async with aiohttp.ClientSession() as session:
        status, body = await Api(session, engines.holder).call(
            "POST", f"/live-calls/{log.id}/hangup", tenant.viewer_key
        )
    assert status == 403 and body["error"]["code"] == "forbidden"  # the same rule as the controls
    status, _ = await refusal(engines.holder, log.id, key=tenant.owner_key)
    assert status == 409  # past the role: the call's engine process is not alive


async def _revoke(pool: asyncpg.Pool, tenant: Tenant) -> None:
    await api_keys.revoke_api_key(pool, organization_id=tenant.organization_id, key_id=tenant.owner_key_id)


async def _make_viewer(pool: asyncpg.Pool, tenant: Tenant) -> None:
    await pool.execute(
        """UPDATE "UserOrganization" SET "role" = 'VIEWER' WHERE "userId" = $1 AND "organizationId" = $2""",
        tenant.owner_id,
        tenant.organization_id,
    )


@pytest.mark.parametrize("take_away", [_revoke, _make_viewer], ids=["revoked", "made-viewer"])
async def test_a_listener_whose_key_loses_the_right_to_listen_is_stopped_while_the_call_goes_on(
    engines: Engines,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    take_away: Callable[[asyncpg.Pool, Tenant], Awaitable[None]],
) -> None:
    monkeypatch.setattr(key_watch, "KEY_RECHECK_SECONDS", 0.2)
    tenant = await make_tenant(pool, "Refused")
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the line.")
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(call(engines.holder, number, Pause(6000), HangUp()))
        call_log_id = await running_here(Api(session, engines.holder), tenant.owner_key)
        headers = {"Authorization": f"Bearer {tenant.owner_key}"}
        async with session.ws_connect(url_of(engines.holder, call_log_id), headers=headers) as ws:
            listened = Listened(await ws.receive_json(timeout=10), ws.protocol)
            await take_away(pool, tenant)
            await listen(ws, listened)
            assert not running.done()  # the listener was stopped, not the call
        result = await running
    assert listened.stop == {"event": "stop", "reason": KEY_LOST}
    assert (await call_log(pool, result))["metadata"]["endReason"] == "caller_hangup"


async def test_a_call_not_in_progress_a_plain_get_and_bad_parameters_are_refused_clearly(
    engines: Engines, pool: asyncpg.Pool
) -> None:
    tenant = await make_tenant(pool, "Refusals")
    key, headers = tenant.owner_key, {"Authorization": f"Bearer {tenant.owner_key}"}
    ended = await open_call(pool, tenant.organization_id)
    await pool.execute('UPDATE "CallLog" SET "status" = \'COMPLETED\' WHERE "id" = $1', ended.id)
    status, message = await refusal(engines.holder, ended.id, key=key)
    assert status == 409 and "not in progress" in message
    live = await open_call(pool, tenant.organization_id, metadata={"engineNode": new_id()})
    status, message = await refusal(engines.holder, live.id, "?channels=quad", key=key)
    assert status == 422 and "channels" in message
    status, message = await refusal(engines.holder, live.id, "?volume=11", key=key)
    assert status == 422 and "volume" in message
    status, message = await refusal(engines.holder, live.id, key=key)
    assert status == 409 and "stopped" in message  # its engine process is not alive
    async with (
        aiohttp.ClientSession() as session,
        session.get(url_of(engines.holder, live.id), headers=headers) as plain,
    ):
        assert plain.status == 400
        assert "WebSocket" in (await plain.json())["error"]["message"]


async def test_the_openapi_document_describes_the_listen_socket(engines: Engines) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{engines.holder}/v1/openapi.json") as response:
        document = await response.json()
    operation = document["paths"]["/v1/live-calls/{callLogId}/listen"]["get"]
    assert "101" in operation["responses"] and {"400", "401", "403", "404", "409", "422"} <= set(operation["responses"])
    assert {parameter["name"] for parameter in operation["parameters"]} == {"callLogId", "channels", "encoding"}
    assert "dialtone.key." in operation["description"]
