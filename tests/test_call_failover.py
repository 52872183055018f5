"""A provider failing in the middle of a call: the next one of its chain takes over and the caller hears an apology
instead of silence; only with nothing left does the call end FAILED, naming what failed. A speech-to-speech agent
whose model is lost for good goes on through the pipeline it lists as its fallback."""

from __future__ import annotations

import asyncio

import asyncpg

from engine.call.driver import DEFAULT_APOLOGY
from engine.call.realtime_connection import RECONNECTS_PER_WINDOW
from storage.call_turns import CallTurn
from storage.end_reasons import EndReason
from storage.enums import CallStatus
from tests.speech import spoken_frames
from tests.test_call_drivers import PIPELINE, Rig, call_on
from tests.test_realtime_session import speech, until

TWO_MODELS = [{"provider": "openai", "model": "gpt-4o-mini"}, {"provider": "openai", "model": "gpt-4.1-mini"}]
DEEPGRAM_THEN_SPHINX = [{"provider": "deepgram", "endpointing": 300}, {"provider": "sphinx"}]
QUICK_SILENT_SOCKET = {"deepgram_silent_socket_timeout": 0.3}
"""Deepgram's socket counts as dead 0.3 s after the caller's speech goes unanswered (5 s by default)."""


async def test_a_model_failing_mid_reply_hands_over_to_the_next_with_an_apology(pool: asyncpg.Pool) -> None:
    async with call_on("pipeline", pool, llm=TWO_MODELS) as rig:
        rig.openai.error_mid_stream = True
        rig.reply("Let me look that up for you. One moment please.")
        rig.caller_says("Do you have anything on Tuesday?")
        turns = await rig.wait_for_turns(2)
        rig.openai.error_mid_stream = False
        rig.reply("Tuesday at ten is free.")
        await until(lambda: rig.line.playback.queued_bytes == 0, timeout=15)
        await asyncio.sleep(0.5)
        rig.caller_says("Great, book it")
        turns = await rig.wait_for_turns(4)
    outcome = await rig.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.COMPLETED, EndReason.CALLER_HANGUP)
    spoken = [(t.speaker, t.text) for t in turns]
    assert ("agent", DEFAULT_APOLOGY) in spoken
    assert spoken[-1] == ("agent", "Tuesday at ten is free.")
    models = [request["model"] for request in rig.openai.requests]
    assert models == ["gpt-4o-mini", "gpt-4.1-mini"]  # the second model kept the call after the first failed


async def test_a_model_failing_mid_reply_with_no_other_ends_the_call_failed_naming_it(pool: asyncpg.Pool) -> None:
    async with call_on("pipeline", pool) as rig:
        rig.openai.error_mid_stream = True
        rig.reply("Let me look that up for you. One moment please.")
        rig.caller_says("Do you have anything on Tuesday?")
        outcome = await rig.outcome()
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, EndReason.LLM_FAILED)
    assert outcome.end_detail


async def the_pipeline_answers_next(rig: Rig, *, apology_at: int) -> list[CallTurn]:
    """Once the pipeline's apology (turn `apology_at`) has played, the caller speaks and the pipeline's model answers:
    the turns up to that answer."""
    await rig.wait_for_turns(apology_at + 1)  # the apology, spoken by the pipeline's synthesizer
    await until(lambda: rig.line.agent_bytes_received > 0 and rig.line.playback.queued_bytes == 0, timeout=15)
    rig.openai.replies.append("Tuesday at ten is free.")  # the pipeline's model answers from now on
    await asyncio.sleep(0.5)
    rig.deepgram.transcripts.append("Tuesday please")
    rig.line.say(speech(600))
    return await rig.wait_for_turns(apology_at + 3, timeout=20)


async def test_a_realtime_agent_whose_model_is_lost_goes_on_through_its_fallback_pipeline(pool: asyncpg.Pool) -> None:
    async with call_on("realtime", pool, **PIPELINE) as rig:
        rig.reply("Sure, what day works for you?")
        rig.caller_says("I need an appointment")
        await rig.wait_for_turns(2)
        rig.realtime.api_key = "sk-rotated"  # the model cannot be reached again
        await rig.realtime.drop_all()
        turns = await the_pipeline_answers_next(rig, apology_at=2)
    spoken = [(t.speaker, t.text) for t in turns]
    assert spoken[2] == ("agent", DEFAULT_APOLOGY)
    assert spoken[3][0] == "caller"
    assert spoken[4] == ("agent", "Tuesday at ten is free.")
    # The pipeline's model was given the conversation so far.
    assert "I need an appointment" in str(rig.openai.requests[-1]["messages"])


async def test_a_realtime_agent_whose_model_fails_its_responses_goes_on_through_its_fallback_pipeline(
    pool: asyncpg.Pool,
) -> None:
    async with call_on("realtime", pool, **PIPELINE) as rig:
        for _ in range(RECONNECTS_PER_WINDOW + 1):  # in the first session and in each one reopened
            rig.realtime.reply_fails("rate_limit_exceeded", "Rate limit reached for gpt-realtime.")
        rig.caller_says("I need an appointment")
        turns = await the_pipeline_answers_next(rig, apology_at=1)
    spoken = [(t.speaker, t.text) for t in turns]
    assert spoken[1] == ("agent", DEFAULT_APOLOGY)
    assert spoken[2:] == [("caller", "Tuesday please"), ("agent", "Tuesday at ten is free.")]
    assert len(rig.realtime.models) == RECONNECTS_PER_WINDOW + 1


async def test_a_realtime_agent_whose_model_cannot_be_reached_at_all_runs_on_its_fallback_pipeline(
    pool: asyncpg.Pool,
) -> None:
    async with call_on("realtime", pool, **PIPELINE) as rig:
        rig.realtime.api_key = "sk-rotated"  # refused from the first connection
        rig.openai.replies.append("Sure, what day works for you?")
        await asyncio.sleep(0.5)
        rig.deepgram.transcripts.append("I need an appointment")
        rig.line.say(speech(600))
        turns = await rig.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns] == [
        ("caller", "I need an appointment"),
        ("agent", "Sure, what day works for you?"),  # no apology: nobody had heard the agent
    ]


async def deepgram_goes_mute_after_its_first_answer(rig: Rig) -> None:
    """The caller's first turn is answered; then Deepgram's sockets stay open, take the audio and say nothing."""
    rig.reply("Sure.")
    rig.caller_says("I need an appointment")
    await rig.wait_for_turns(2)
    await until(lambda: rig.line.playback.queued_bytes == 0, timeout=15)
    rig.deepgram.mute = True


async def test_a_deepgram_socket_gone_silent_hands_over_to_the_next_recognizer_which_answers_the_caller(
    pool: asyncpg.Pool,
) -> None:
    async with call_on("pipeline", pool, stt=DEEPGRAM_THEN_SPHINX, engine_settings=QUICK_SILENT_SOCKET) as rig:
        await deepgram_goes_mute_after_its_first_answer(rig)
        rig.reply("Tuesday at ten is free.")
        rig.line.say(b"".join(await spoken_frames("I would like tuesday at ten in the morning please")))
        turns = await rig.wait_for_turns(4, timeout=20)
    spoken = [(t.speaker, t.text) for t in turns]
    assert spoken[2][0] == "caller" and spoken[2][1]  # heard by PocketSphinx, from the replay of the turn
    assert spoken[3] == ("agent", "Tuesday at ten is free.")
    assert rig.deepgram.connections > 1  # the silent socket was first replaced, like a dropped one


async def test_a_deepgram_socket_gone_silent_with_no_other_recognizer_ends_the_call_failed_stt(
    pool: asyncpg.Pool,
) -> None:
    async with call_on("pipeline", pool, engine_settings=QUICK_SILENT_SOCKET) as rig:
        await deepgram_goes_mute_after_its_first_answer(rig)
        rig.line.say(speech(1500))
        outcome = await rig.outcome(timeout=15)  # well before the agent's silence limit (30 s)
    assert (outcome.status, outcome.end_reason) == (CallStatus.FAILED, EndReason.STT_FAILED)
    assert outcome.end_detail and "sent nothing" in outcome.end_detail


async def test_a_realtime_agent_whose_session_the_model_refuses_runs_on_its_fallback_pipeline(
    pool: asyncpg.Pool,
) -> None:
    refused = {"provider": "openai", "voice": "nonesuch", "transcription_model": "whisper-1"}
    async with call_on("realtime", pool, realtime=refused, **PIPELINE) as rig:
        rig.openai.replies.append("Sure, what day works for you?")
        await asyncio.sleep(0.5)
        rig.deepgram.transcripts.append("I need an appointment")
        rig.line.say(speech(600))
        turns = await rig.wait_for_turns(2)
    assert [(t.speaker, t.text) for t in turns] == [
        ("caller", "I need an appointment"),
        ("agent", "Sure, what day works for you?"),  # the pipeline's, in the agent's configured voice
    ]
    assert not rig.realtime.of_type("input_audio_buffer.append")  # the refused session never heard the caller
