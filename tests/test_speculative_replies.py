"""Speculative replies and the mid-sentence pause, through real pipeline calls: a CallSession on a scripted Twilio
line in real time, the fake Deepgram (with its endpointing decisions held back, as a real server's take time), the
fake OpenAI and eSpeak NG, the CallLog in the test database. Assertions are on the order of events, never on speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from engine.server.metrics import REGISTRY
from media.g711 import BYTES_PER_MS, ULAW_SILENCE
from tests.test_call_drivers import Rig, call_on
from tests.test_realtime_session import speech, until

SPECULATED = "Sorry, nobody may ever hear this reply, which was thrown away."


def silence(ms: int) -> bytes:
    """`ms` of caller silence (digital μ-law silence)."""
    return bytes([ULAW_SILENCE]) * (ms * BYTES_PER_MS)


def last_caller_message(request: dict[str, Any]) -> str:
    """The text of the last user message the model was sent."""
    return str([message for message in request["messages"] if message["role"] == "user"][-1]["content"])


def speech_final_sent(rig: Rig) -> bool:
    """Whether the fake Deepgram has sent any final result with `speech_final` (the recognizer's end of turn)."""
    return any(message.get("speech_final") for listen in rig.deepgram.listens for message in listen.sent)


@contextmanager
def speculations() -> Iterator[dict[str, float]]:
    """The speculative-reply counters' increase over the block, by event (started, used, discarded)."""
    events = ("started", "used", "discarded")

    def now() -> dict[str, float]:
        return {e: REGISTRY.get_sample_value("dialtone_speculative_replies_total", {"event": e}) or 0.0 for e in events}

    before, change = now(), {e: 0.0 for e in events}
    try:
        yield change
    finally:
        after = now()
        change.update({e: after[e] - before[e] for e in events})


async def test_a_speculative_reply_starts_before_the_end_of_turn_and_is_used(pool: asyncpg.Pool) -> None:
    with speculations() as counted:
        async with call_on("pipeline", pool) as rig:
            rig.deepgram.final_delay_ms = 1500  # the endpoint's final leaves well after the speculation
            seen_before_end: list[bool] = []

            def answer(_: str) -> str:
                seen_before_end.append(not speech_final_sent(rig))
                return "A table for two, certainly."

            rig.openai.default_reply = answer
            rig.caller_says("I need a table for two tonight.", 600)
            turns = await rig.wait_for_turns(2)
            assert seen_before_end == [True]  # the model was asked before the recognizer's end of turn was sent
            assert "Finalize" in rig.deepgram.listens[0].controls
            assert [(t.speaker, t.text) for t in turns] == [
                ("caller", "I need a table for two tonight."),
                ("agent", "A table for two, certainly."),
            ]
            assert turns[1].latency is not None and turns[1].latency["speculative"] == 1
            assert turns[1].latency["sttEndOfTurn"] <= turns[1].latency["firstFrameSent"]
            assert len(rig.openai.requests) == 1
    assert counted == {"started": 1, "used": 1, "discarded": 0}


async def test_the_caller_speaking_on_discards_the_speculation_unheard(pool: asyncpg.Pool) -> None:
    with speculations() as counted:
        async with call_on("pipeline", pool) as rig:
            rig.openai.first_token_delay_ms = 400  # the first stream is still open when the caller goes on
            rig.openai.replies.extend([SPECULATED, "Four people, certainly."])
            rig.deepgram.transcripts.append("I want a table. | For four people, please.")
            rig.line.say(speech(600) + silence(260) + speech(600))
            turns = await rig.wait_for_turns(2)
            await asyncio.wait_for(rig.openai.stream_aborted.wait(), 10)
            assert [last_caller_message(request) for request in rig.openai.requests] == [
                "I want a table.",
                "I want a table. For four people, please.",
            ]
            assert [(t.speaker, t.text) for t in turns] == [
                ("caller", "I want a table. For four people, please."),
                ("agent", "Four people, certainly."),
            ]
            history = rig.openai.requests[1]["messages"]
            assert not any(SPECULATED in str(message.get("content")) for message in history)
            assert rig.line.clears == []  # nothing of the discarded reply reached Twilio, so nothing was cleared
    assert counted == {"started": 2, "used": 1, "discarded": 1}


async def test_a_turn_with_other_words_discards_the_speculation(pool: asyncpg.Pool) -> None:
    with speculations() as counted:
        async with call_on("pipeline", pool) as rig:
            rig.deepgram.final_delay_ms = 1500
            rig.openai.first_token_delay_ms = 300
            rig.openai.replies.append(SPECULATED)
            rig.caller_says("I want a table.", 600)
            await until(lambda: len(rig.openai.requests) == 1)
            rig.line.press("5")  # the turn the agent confirms is the key, not the words it speculated on
            await asyncio.wait_for(rig.openai.stream_aborted.wait(), 10)
            turns = await rig.wait_for_turns(3)
            # The key is the turn; the words, confirmed later, are one of their own (cutting the reply to the key).
            assert [(t.speaker, t.text) for t in turns if t.speaker == "caller"][:2] == [
                ("caller", "[DTMF 5]"),
                ("caller", "I want a table."),
            ]
            assert last_caller_message(rig.openai.requests[1]) == "[DTMF 5]"
            assert not any(SPECULATED in (t.text or "") for t in await rig.turns())
    assert counted["started"] == 1 and counted["discarded"] == 1


async def test_no_reply_in_a_pause_inside_a_sentence(pool: asyncpg.Pool) -> None:
    async with call_on("pipeline", pool) as rig:
        rig.deepgram.final_delay_ms = 200  # speech_final ~500 ms into the pause, as real Deepgram's endpointing 300
        rig.deepgram.transcripts.append("I would like to | book a table for two.")
        rig.openai.replies.append("Of course, for what time?")
        rig.line.say(speech(600) + silence(550) + speech(700))
        turns = await rig.wait_for_turns(2)
        sent = [m for listen in rig.deepgram.listens for m in listen.sent if m.get("speech_final")]
        assert len(sent) == 2  # the recognizer did end a turn in the pause: the agent did not take it
        assert [(t.speaker, t.text) for t in turns] == [
            ("caller", "I would like to book a table for two."),
            ("agent", "Of course, for what time?"),
        ]
        assert [last_caller_message(request) for request in rig.openai.requests] == [
            "I would like to book a table for two."
        ]


async def test_unfinished_words_end_the_turn_after_the_longer_silence(pool: asyncpg.Pool) -> None:
    async with call_on("pipeline", pool, endpointing={"incompleteSilenceMs": 600}) as rig:
        rig.deepgram.transcripts.append("I would like to")
        rig.openai.replies.append("Like to what?")
        rig.line.say(speech(600))
        turns = await rig.wait_for_turns(2)
        assert [(t.speaker, t.text) for t in turns] == [("caller", "I would like to"), ("agent", "Like to what?")]
