"""Whole calls through the real server on the cloud pipelines: Deepgram, OpenAI and ElevenLabs through their real
SDKs (and our own ElevenLabs WebSocket client), each pointed at a local fake speaking the vendor's wire protocol;
Twilio's side played by the simulator; real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from config.agent import parse_agent_configuration
from engine.simulator import CallResult, Pause, Say, simulate_call
from media.g711 import BYTES_PER_MS, FRAME_MS
from storage import agents, organizations, phone_numbers, tools
from storage.enums import AgentStatus, CallerType
from tests.engine_server import running_engine
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.openai_chat import FakeOpenAI, ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.fakes.server import serve
from tests.fakes.twilio import call_updates, dialed_number
from tests.test_calls_e2e import call_log as finished_log
from tests.test_calls_e2e import turns
from tests.test_realtime_session import until

TOKEN = "cloud-auth-token-0123456789abcdef"
CALLER = "+14155550123"
DG_KEY, OPENAI_KEY, EL_KEY = "dg-key-e2e", "sk-key-e2e", "el-key-e2e"
_numbers = itertools.count(300)

CLOUD = {
    "stt": {"provider": "deepgram", "endpointing": 300},
    "llm": {"provider": "openai", "model": "gpt-4o-mini", "temperature": 0.4},
    "tts": {"provider": "elevenlabs", "voice": "june"},
}


class Fakes:
    """The three vendors' fakes of one test module."""

    def __init__(self, deepgram: FakeDeepgram, openai: FakeOpenAI, elevenlabs: FakeElevenLabs) -> None:
        self.deepgram, self.openai, self.elevenlabs = deepgram, openai, elevenlabs

    def settings(self) -> dict[str, Any]:
        return {
            "deepgram_api_key": DG_KEY,
            "openai_api_key": OPENAI_KEY,
            "elevenlabs_api_key": EL_KEY,
            "deepgram_url": self.deepgram.url,
            "openai_base_url": self.openai.base_url,
            "elevenlabs_url": self.elevenlabs.url,
            "allow_private_tool_urls": True,  # the tools' webhooks below listen on 127.0.0.1
        }


@asynccontextmanager
async def running_fakes() -> AsyncIterator[Fakes]:
    """The three vendors' fakes, accepting this module's keys."""
    async with (
        FakeDeepgram(api_key=DG_KEY) as deepgram,
        FakeOpenAI(api_key=OPENAI_KEY) as openai,
        FakeElevenLabs(api_key=EL_KEY, ms_per_char=40) as elevenlabs,
    ):
        yield Fakes(deepgram, openai, elevenlabs)


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[Fakes]:
    async with running_fakes() as running:
        yield running


@pytest.fixture(scope="module")
async def engine(db_url: str, fakes: Fakes) -> AsyncIterator[str]:
    async with running_engine(db_url, twilio_auth_token=TOKEN, **fakes.settings()) as base:
        yield base


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    org = await organizations.create_organization(pool, name="Cloud", slug="cloud-e2e", credits=500)
    return org.id


async def make_line(pool: asyncpg.Pool, organization_id: str, **configuration: Any) -> tuple[str, str]:
    """A number answered by a new agent with the cloud pipeline (overridable); returns (number, agent id)."""
    number = await phone_numbers.create_phone_number(
        pool, organization_id=organization_id, phone_number=f"+1555556{next(_numbers):04d}"
    )
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name=f"cloud agent {number.phone_number}",
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration=parse_agent_configuration({**CLOUD, **configuration}).to_json(),
    )
    return number.phone_number, agent.id


async def link_calendar(pool: asyncpg.Pool, organization_id: str, agent_id: str, url: str) -> None:
    """Give the agent the connected Tool `check_availability` (its `day`), answered by the webhook at `url`."""
    tool = await tools.create_tool(
        pool,
        organization_id=organization_id,
        name="Calendar",
        is_connected=True,
        configuration={
            "function": {
                "name": "check_availability",
                "description": "Free appointment slots.",
                "parameters": {"type": "object", "properties": {"day": {"type": "string"}}},
            },
            "webhook": {"url": url},
        },
    )
    await agents.link_tool(pool, organization_id=organization_id, agent_id=agent_id, tool_id=tool.id)


async def call(engine: str, number: str, *steps: Any, timeout_s: float = 60) -> CallResult:
    return await simulate_call(engine, to=number, from_=CALLER, script=steps, auth_token=TOKEN, timeout_s=timeout_s)


async def test_a_call_through_deepgram_openai_and_elevenlabs(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(
        pool,
        organization_id,
        firstSentence="Hello, this is the clinic.",
        prompt="You book appointments. The caller's number is {{customer.number}}.",
    )
    fakes.deepgram.transcripts.extend(["I need to reschedule my appointment."])
    fakes.openai.replies.extend(["Of course. Which day works best for you?"])
    result = await call(engine, number, Say("I need to reschedule my appointment"), Pause(300))
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    rows = await turns(pool, log["id"])
    assert [(r["speaker"], r["text"]) for r in rows] == [
        ("agent", "Hello, this is the clinic."),
        ("caller", "I need to reschedule my appointment."),
        ("agent", "Of course. Which day works best for you?"),
    ]
    # The model saw the filled-in prompt and the conversation in its roles.
    request = fakes.openai.requests[-1]
    assert request["messages"][0] == {
        "role": "system",
        "content": f"You book appointments. The caller's number is {CALLER}.",
    }
    assert request["messages"][1:] == [
        {"role": "assistant", "content": "Hello, this is the clinic."},
        {"role": "user", "content": "I need to reschedule my appointment."},
    ]
    # An agent without transfer rules is not offered transfer_call at all.
    assert {tool["function"]["name"] for tool in request["tools"]} == {"end_call", "send_dtmf", "opt_out"}
    # Deepgram got μ-law 8 kHz straight from Twilio, configured as the agent says.
    query = fakes.deepgram.queries[-1]
    assert (query["encoding"], query["sample_rate"], query["endpointing"]) == ("mulaw", "8000", "300")
    assert fakes.elevenlabs.queries[-1]["output_format"] == "ulaw_8000"
    # Every stage of the answer's latency is stored, in order, and exported.
    breakdown = dict(rows[2]["latency"])
    speculative = breakdown.pop("speculative", 0)  # a speculative reply is underway before the end of turn
    stages = ["sttEndOfTurn", "llmFirstToken", "firstSentence", "ttsFirstByte", "firstFrameSent", "firstMarkEchoed"]
    assert set(breakdown) == set(stages), breakdown
    ordered = stages[1:] if speculative else stages
    assert [breakdown[s] for s in ordered] == sorted(breakdown[s] for s in ordered)
    assert breakdown["sttEndOfTurn"] <= breakdown["firstFrameSent"]  # no audio before the turn was confirmed
    assert rows[2]["latencyMs"] == breakdown["firstFrameSent"]
    async with aiohttp.ClientSession() as http, http.get(f"{engine}/metrics") as response:
        text = await response.text()
    assert 'dialtone_turn_stage_seconds_count{stage="llmFirstToken"}' in text
    assert "dialtone_turn_latency_seconds_count" in text


@pytest.mark.parametrize(
    ("heard", "stored"),
    [
        ("A table for two\x00 please.", "A table for two\ufffd please."),  # which PostgreSQL text cannot hold
        ("A table for two \ud83d please.", "A table for two \ufffd please."),  # half an emoji: no UTF-8 body can
    ],
    ids=["nul", "lone surrogate"],
)
async def test_what_was_said_that_no_text_can_hold_costs_no_turn(  # noqa: PLR0917 (fixtures and parameters)
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str, heard: str, stored: str
) -> None:
    # The recognizer's JSON or the model's can carry a NUL ("\\u0000") or a lone surrogate ("\\ud83d"): neither may
    # reach the model's next request, the live events and webhooks, or the stored turns.
    number, _ = await make_line(pool, organization_id, firstSentence="Hello, this is the clinic.")
    fakes.deepgram.transcripts.extend([heard])
    fakes.openai.replies.extend(["Booked for two\x00."])
    result = await call(engine, number, Say("a table for two please"), Pause(300))
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert fakes.openai.requests[-1]["messages"][-1] == {"role": "user", "content": stored}
    rows = await turns(pool, log["id"])
    assert [(r["speaker"], r["text"]) for r in rows] == [
        ("agent", "Hello, this is the clinic."),
        ("caller", stored),
        ("agent", "Booked for two\ufffd."),
    ]
    assert log["transcript"].splitlines()[1:] == [f"Caller: {stored}", "Agent: Booked for two\ufffd."]
    assert "lostTurns" not in log["metadata"]


async def test_a_model_reply_holding_half_an_emoji_is_spoken_stored_and_sent_back_as_a_replacement_character(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    # The model's JSON carries "\\ud83d" (a lone surrogate): the voice's request, the stored turn and the model's
    # next request (which holds the reply) could not encode it, and the call ended FAILED.
    number, _ = await make_line(pool, organization_id, firstSentence="Hello, this is the clinic.")
    fakes.deepgram.transcripts.extend(["A table for two please.", "By the window."])
    fakes.openai.replies.extend(["Booked for two \ud83d.", "Done."])
    result = await call(engine, number, Say("a table for two please"), Pause(1500), Say("by the window"), Pause(300))
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert [(r["speaker"], r["text"]) for r in await turns(pool, log["id"])] == [
        ("agent", "Hello, this is the clinic."),
        ("caller", "A table for two please."),
        ("agent", "Booked for two \ufffd."),
        ("caller", "By the window."),
        ("agent", "Done."),
    ]
    assert fakes.openai.requests[-1]["messages"][-2] == {"role": "assistant", "content": "Booked for two \ufffd."}


async def test_an_emoji_whose_halves_come_in_two_deltas_of_the_models_stream_is_spoken_and_stored_whole(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    # A server slicing its text by UTF-16 units sends "\\ud83d" at the end of one delta and "\\ude00" at the start of
    # the next: each half alone is no character, together they are one.
    number, _ = await make_line(pool, organization_id, firstSentence="Hello, this is the clinic.")
    fakes.deepgram.transcripts.extend(["A table for two please."])
    fakes.openai.replies.append(["Booked for two \ud83d", "\ude00 at noon."])
    result = await call(engine, number, Say("a table for two please"), Pause(300))
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    said = "Booked for two \U0001f600 at noon."
    assert [(r["speaker"], r["text"]) for r in await turns(pool, log["id"])][-1] == ("agent", said)
    assert [spoken.text.strip() for spoken in fakes.elevenlabs.texts][-1] == said


async def test_an_agent_stored_with_a_variable_named_like_a_built_in_still_calls_the_built_in_filling_it(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Saved before the API refused such names: the call runs, the built-ins fill their placeholders, and the log
    # names the variables left out.
    variables = {"today": "whenever", "customer": "VIP", "plan": "gold"}
    number, _ = await make_line(
        pool,
        organization_id,
        variables=variables,
        firstSentence="Hello, today is {{today}}.",
        prompt="The caller on {{customer.number}} has the {{plan}} plan; today is {{today}}.",
    )
    fakes.deepgram.transcripts.extend(["Is my plan active?"])
    fakes.openai.replies.extend(["It is."])
    with caplog.at_level(logging.WARNING, logger="engine.call.setup"):
        result = await call(engine, number, Say("is my plan active"), Pause(300))
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    system = fakes.openai.requests[-1]["messages"][0]["content"]
    assert system.startswith(f"The caller on {CALLER} has the gold plan; today is ") and "whenever" not in system
    greeting = (await turns(pool, log["id"]))[0]["text"]
    assert greeting.startswith("Hello, today is ") and "whenever" not in greeting
    warnings = [r.getMessage() for r in caplog.records if "named like built-in prompt variables" in r.getMessage()]
    assert warnings == [
        f"call {result.call_sid}: variables named like built-in prompt variables are left out (the "
        "built-ins fill them; rename them): today, customer"
    ]


async def test_barge_in_mid_sentence_cuts_the_agent_turn_at_the_words_heard(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id, firstSentence="Hi.")
    long_reply = (
        "We are open every weekday from eight in the morning until six in the evening, and on Saturdays "
        "from nine until one, except on public holidays when the whole clinic stays closed all day long."
    )
    fakes.deepgram.transcripts.extend(["What are your hours?", "Thanks, that's all."])
    fakes.openai.replies.extend([long_reply, "You're welcome."])
    result = await call(
        engine, number, Say("What are your hours"), Say("thanks that is all", barge_in_after_ms=2500), Pause(300)
    )
    log = await finished_log(pool, result)
    rows = await turns(pool, log["id"])
    interrupted = [r for r in rows if r["speaker"] == "agent" and r["interrupted"]]
    assert len(interrupted) == 1, [(r["speaker"], r["text"], r["interrupted"]) for r in rows]
    heard = interrupted[0]["text"]
    assert heard and long_reply.startswith(heard) and len(heard) < len(long_reply) // 2
    assert long_reply[len(heard)] == " "  # cut between words, by ElevenLabs' alignment
    assert result.clears and result.marks_flushed
    # The turn lasts as long as the caller heard the reply before the clear (its words are cut there).
    (cut,) = [utterance for utterance in result.utterances if utterance.cleared]
    turn_ms = interrupted[0]["endMs"] - interrupted[0]["startMs"]
    assert abs(turn_ms - len(cut.audio) // BYTES_PER_MS) <= 3 * FRAME_MS
    # The fake speaks each character for ms_per_char: the turn ends in the first word left out (a character either
    # way for where the sentences were split).
    next_word = long_reply[len(heard) :].split(maxsplit=1)[0]
    ms_per_char = fakes.elevenlabs.ms_per_char
    assert (len(heard) - 1) * ms_per_char <= turn_ms <= (len(heard) + 1 + len(next_word) + 1) * ms_per_char
    # No stale audio: the caller heard nothing of the long reply after the clear but the next answer.
    assert rows[-1]["speaker"] == "agent" and rows[-1]["text"] == "You're welcome."


async def test_the_first_sentence_is_synthesized_on_the_first_call_and_said_from_memory_on_the_next(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    greeting = "Good morning, you have reached the harbour office."
    number, _ = await make_line(pool, organization_id, firstSentence=greeting)
    heard: list[bytes] = []
    for reply in ("The ferry leaves at noon.", "The next ferry is at two."):
        fakes.deepgram.transcripts.append("When does the ferry leave?")
        fakes.openai.replies.append(reply)
        result = await call(engine, number, Say("When does the ferry leave"), Pause(300))
        log = await finished_log(pool, result)
        rows = await turns(pool, log["id"])
        assert [(r["speaker"], r["text"]) for r in rows] == [
            ("agent", greeting),
            ("caller", "When does the ferry leave?"),
            ("agent", reply),
        ]
        heard.append(bytes(result.utterances[0].audio))
    # ElevenLabs said the greeting once; both callers heard all of it, the same; the model's replies were each
    # synthesized.
    spoken = [said.text for said in fakes.elevenlabs.texts]
    assert spoken.count(greeting) == 1
    assert {"The ferry leaves at noon.", "The next ferry is at two."} <= set(spoken)
    assert heard[0] == heard[1] == fakes.elevenlabs.audio_for(greeting)


@pytest.fixture
async def fake_twilio_rest() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Twilio's REST API for call updates: records each update's form."""
    async with call_updates() as rest:
        yield rest


async def test_end_call_and_transfer_tools_control_the_call_through_twilio(
    db_url: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str, fake_twilio_rest: Any
) -> None:
    api_base, updates = fake_twilio_rest
    account = "AC" + "1" * 32
    async with running_engine(
        db_url, twilio_auth_token=TOKEN, twilio_account_sid=account, twilio_api_base=api_base, **fakes.settings()
    ) as base:
        billing = {"number": "+14155550199", "label": "Billing"}
        number, _ = await make_line(pool, organization_id, firstSentence="Hi.", transfer={"destinations": [billing]})
        fakes.deepgram.transcripts.extend(["That's all, bye."])
        fakes.openai.replies.extend([["Goodbye!", ToolCall("end_call", {"reason": "caller is done"})]])
        ended = await call(base, number, Say("that is all bye"), Pause(4000))

        fakes.deepgram.transcripts.extend(["Put me through to billing."])
        fakes.openai.replies.extend(
            [
                [
                    "Transferring you now.",
                    ToolCall("transfer_call", {"phone_number": "+14155550199", "reason": "billing"}),
                ]
            ]
        )
        transferred = await call(base, number, Say("put me through to billing"), Pause(4000))

    log = await finished_log(pool, ended)
    assert (log["status"], log["metadata"]["endReason"], log["metadata"]["endDetail"]) == (
        "COMPLETED",
        "agent_hangup",
        "caller is done",
    )
    assert (await turns(pool, log["id"]))[-1]["text"] == "Goodbye!"
    log = await finished_log(pool, transferred)
    assert log["status"] == "COMPLETED"
    assert (log["metadata"]["endReason"], log["metadata"]["endDetail"]) == ("transferred", "billing")
    assert updates[0] == {"sid": ended.call_sid, "Status": "completed"}
    assert updates[1]["sid"] == transferred.call_sid
    assert dialed_number(updates[1]["Twiml"]) == "+14155550199"


SLOTS = b'{"slots": ["Tuesday 10:00"]}'
TUESDAY = {"day": "Tuesday"}


@pytest.mark.parametrize(
    ("arguments", "sent", "content_type", "answer", "told"),
    [
        (TUESDAY, TUESDAY, "application/json", SLOTS, SLOTS.decode()),
        # A charset that decodes to half an emoji, which no request body to the model can carry.
        (TUESDAY, TUESDAY, "text/plain; charset=utf-7", b"Tuesday 10:00 +2D0-", "Tuesday 10:00 \ufffd"),
        # Half an emoji in the model's arguments: in their text (the model's next request, which echoes them,
        # could not be encoded), or escaped in a value (which a path's variables could not store).
        ('{"day": "Tuesday \ud83d"}', {"day": "Tuesday \ufffd"}, "application/json", SLOTS, SLOTS.decode()),
        ({"day": "Tuesday \ud83d"}, {"day": "Tuesday \ufffd"}, "application/json", SLOTS, SLOTS.decode()),
        # An emoji whose halves come in two of the stream's fragments (a server slicing its text by UTF-16 units).
        ('{"day": "Tuesda\ud83d\ude00"}', {"day": "Tuesda\U0001f600"}, "application/json", SLOTS, SLOTS.decode()),
    ],
    ids=[
        "json",
        "utf-7 with a lone surrogate",
        "arguments with a lone surrogate",
        "arguments with an escaped one",
        "arguments with an emoji split between fragments",
    ],
)
async def test_an_agent_function_calls_the_organizations_webhook(  # noqa: PLR0917 (fixtures and parameters)
    engine: str,
    fakes: Fakes,
    pool: asyncpg.Pool,
    organization_id: str,
    arguments: str | dict[str, str],
    sent: dict[str, str],
    content_type: str,
    answer: bytes,
    told: str,
) -> None:
    received: list[dict[str, Any]] = []

    async def availability(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(body=answer, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post("/availability", availability)
    async with serve(app) as hook:
        number, agent_id = await make_line(pool, organization_id, firstSentence="Hi.")
        await link_calendar(pool, organization_id, agent_id, f"{hook}/availability")
        fakes.deepgram.transcripts.extend(["Is Tuesday free?"])
        fakes.openai.replies.extend([[ToolCall("check_availability", arguments)], "Tuesday at ten is free."])
        result = await call(engine, number, Say("is tuesday free"), Pause(300))
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    assert received and received[0]["arguments"] == sent
    assert received[0]["call"]["callLogId"] == log["id"]
    assert [r["text"] for r in await turns(pool, log["id"])][-1] == "Tuesday at ten is free."
    tool_messages = [m for m in fakes.openai.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_messages and tool_messages[0]["content"] == told


async def test_deepgram_dropping_mid_call_reconnects_then_falls_back_without_losing_a_turn(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(
        pool,
        organization_id,
        firstSentence="Hi.",
        stt=[{"provider": "deepgram", "endpointing": 300}, {"provider": "sphinx"}],
    )
    fakes.deepgram.transcripts.extend(["First question."])
    fakes.openai.default_reply = "I heard you."
    answers_before = len(fakes.openai.requests)  # the fakes serve the whole module
    running = asyncio.create_task(
        call(engine, number, Say("first question"), Say("second question"), Say("third question"), Pause(300))
    )
    # Wait for the first answer, then drop Deepgram's socket: the engine reconnects and goes on.
    for _ in range(200):
        if len(fakes.openai.requests) > answers_before:
            break
        await asyncio.sleep(0.05)
    assert len(fakes.openai.requests) > answers_before, "the agent did not answer the first question"
    connections = fakes.deepgram.connections
    await fakes.deepgram.drop_all()
    for _ in range(100):
        if fakes.deepgram.connections > connections:
            break
        await asyncio.sleep(0.05)
    assert fakes.deepgram.connections > connections, "the engine did not reconnect to Deepgram"

    # It goes on over the new socket, answering the caller's next words; then it goes away for good, in the middle
    # of them: the call falls back to PocketSphinx, which hears them replayed.
    def answered() -> bool:
        return any(message["type"] == "Results" for message in fakes.deepgram.listens[-1].sent)

    for _ in range(200):
        if answered():
            break
        await asyncio.sleep(0.05)
    assert answered(), "Deepgram transcribed nothing over the new socket"
    fakes.deepgram.refuse = True
    await fakes.deepgram.drop_all()
    result = await running
    fakes.deepgram.refuse = False
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    rows = await turns(pool, log["id"])
    callers = [r for r in rows if r["speaker"] == "caller"]
    agents_ = [r for r in rows if r["speaker"] == "agent"]
    assert len(callers) == 3, [(r["speaker"], r["text"]) for r in rows]
    assert [r["text"] for r in agents_] == ["Hi."] + ["I heard you."] * 3


async def deepgram_then_sphinx_line(pool: asyncpg.Pool, organization_id: str, *keyphrases: str) -> tuple[str, str]:
    """A line whose agent listens with Deepgram, then PocketSphinx favouring `keyphrases`; (number, agent id).

    Deepgram with neither endpointing nor UtteranceEnd never ends a turn: the engine's silence takes each one."""
    return await make_line(
        pool,
        organization_id,
        firstSentence="Hi.",
        stt=[
            {"provider": "deepgram", "endpointing": False, "interim_results": False},
            {"provider": "sphinx", "keyphrases": list(keyphrases)},
        ],
    )


async def deepgram_lost_for_good(fakes: Fakes, running: asyncio.Task[CallResult]) -> CallResult:
    """Drop every Deepgram socket and refuse new ones (PocketSphinx takes over) until the `running` call ends."""
    fakes.deepgram.refuse = True
    try:
        await fakes.deepgram.drop_all()
        return await running
    finally:
        fakes.deepgram.refuse = False


async def test_a_turn_the_engine_took_on_its_own_silence_is_not_taken_again_from_the_fallback_recognizer(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, agent_id = await deepgram_then_sphinx_line(pool, organization_id, "first question", "second question")
    fakes.deepgram.transcripts.extend(["First question."])
    fakes.openai.default_reply = "I heard you."
    running = asyncio.create_task(call(engine, number, Say("first question"), Say("second question"), Pause(300)))
    await caller_turns_taken(pool, agent_id, 1)
    # Deepgram is lost for good: PocketSphinx takes over, hearing the caller's turn in progress replayed.
    result = await deepgram_lost_for_good(fakes, running)
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    rows = [(r["speaker"], r["text"]) for r in await turns(pool, log["id"])]
    # Answered once each: the first from Deepgram, the second from PocketSphinx, which never heard the first.
    assert [text for speaker, text in rows if speaker == "caller"] == ["First question.", "second question"], rows
    assert [text for speaker, text in rows if speaker == "agent"] == ["Hi.", "I heard you.", "I heard you."], rows


async def caller_turns_taken(pool: asyncpg.Pool, agent_id: str, count: int) -> None:
    """Wait until the call of `agent_id` has `count` caller turns written."""
    for _ in range(200):
        taken = await pool.fetchval(
            'SELECT count(*) FROM "CallTurn" t JOIN "CallLog" c ON c."id" = t."callLogId"'
            ' WHERE c."agentId" = $1 AND t."speaker" = \'caller\'',
            agent_id,
        )
        if taken >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine took no more than {taken} caller turn(s), not {count}")


async def test_a_missing_key_refuses_the_call_politely_and_logs_which_key(
    db_url: str, pool: asyncpg.Pool, organization_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:  # no provider keys
        number, _ = await make_line(pool, organization_id)
        with caplog.at_level(logging.ERROR):
            result = await call(base, number)
    assert result.refusal is not None and "not set up correctly" in result.refusal
    assert "DEEPGRAM_API_KEY, which is not set" in caplog.text
    log = await pool.fetchrow('SELECT * FROM "CallLog" WHERE "callId" = $1', result.call_sid)
    assert log is not None, "the refused call is not in the call history"
    assert (log["status"], log["metadata"]["endReason"]) == ("FAILED", "pipeline_unavailable")  # in the history too
    assert "DEEPGRAM_API_KEY, which is not set" in log["metadata"]["endDetail"]


async def test_a_realtime_agent_answers_speech_to_speech_with_both_sides_in_the_call_log(
    db_url: str, pool: asyncpg.Pool, organization_id: str
) -> None:
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.caller_says("What time do you open?")
        realtime.reply("We open at nine.")
        settings: dict[str, Any] = {"openai_api_key": OPENAI_KEY, "openai_base_url": realtime.base_url}
        async with running_engine(db_url, twilio_auth_token=TOKEN, **settings) as base:
            number = await phone_numbers.create_phone_number(
                pool, organization_id=organization_id, phone_number=f"+1555556{next(_numbers):04d}"
            )
            await agents.create_agent(
                pool,
                organization_id=organization_id,
                name="realtime agent",
                status=AgentStatus.ACTIVE,
                caller_type=CallerType.INBOUND,
                phone_number_id=number.id,
                configuration=parse_agent_configuration(
                    {
                        "realtime": {"provider": "openai", "transcription_model": "gpt-4o-mini-transcribe"},
                        "prompt": "You answer for the bakery on {{today}}.",
                    }
                ).to_json(),
            )
            result = await call(base, number.phone_number, Say("what time do you open"), Pause(300))
        updates = realtime.of_type("session.update")
    log = await finished_log(pool, result)
    assert log["status"] == "COMPLETED", log["metadata"]
    rows = await turns(pool, log["id"])
    assert [(r["speaker"], r["text"]) for r in rows] == [
        ("caller", "What time do you open?"),
        ("agent", "We open at nine."),
    ]
    session = updates[0]["session"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert session["instructions"].startswith("You answer for the bakery on ")
    assert rows[1]["latencyMs"] is not None and result.utterances


async def test_a_fallback_recognizer_taking_over_a_long_turn_hears_it_from_its_first_word(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    # Without the recognizer's end of turn, the caller's long turn stays unconfirmed until the engine's silence.
    number, agent_id = await deepgram_then_sphinx_line(pool, organization_id, "my name is alice")
    fakes.deepgram.transcripts.extend(["Hello."])
    fakes.openai.default_reply = "I heard you."
    long_turn = "my name is alice " + "one two three four five six seven eight nine ten eleven twelve " * 5
    script = [Say("hello"), Pause(7000), Say(long_turn + "thank you"), Pause(1500)]  # 18.6 s of words, no pause
    running = asyncio.create_task(call(engine, number, *script))
    await caller_turns_taken(pool, agent_id, 1)
    # Deepgram is lost for good 20.5 s after its final "Hello." (13.5 s into the long turn): after its three reconnect
    # attempts (1.4 s), PocketSphinx takes over while the caller still speaks, over 20 s after the last turn taken.
    listen = fakes.deepgram.listens[-1]
    hello = next(m for m in listen.sent if m["type"] == "Results" and m["is_final"])
    lost_at_ms = round((hello["start"] + hello["duration"]) * 1000) + 20_500
    await until(lambda: listen.bytes_received >= lost_at_ms * BYTES_PER_MS, timeout=60)
    log = await finished_log(pool, await deepgram_lost_for_good(fakes, running))
    assert log["status"] == "COMPLETED", log["metadata"]
    callers = [r["text"] for r in await turns(pool, log["id"]) if r["speaker"] == "caller"]
    assert callers[0] == "Hello.", callers
    # One turn, heard by PocketSphinx from its first words: the replay held the whole turn, not its last seconds.
    assert len(callers) == 2 and callers[1].startswith("my name is alice"), callers
