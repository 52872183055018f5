"""A call heard by PocketSphinx: what the caller experiences of its turn-taking on the pipeline driver."""

from __future__ import annotations

import asyncpg

from pipelines.stt.sphinx import MAX_UTTERANCE_MS
from tests.speech import spoken_frames
from tests.test_call_drivers import call_on

MONOLOGUE = "hello, " + ", ".join(["yes please, thank you, okay"] * 14) + ", goodbye"
"""About 25 s of speech with no pause as long as the end of a turn's silence, its words finished-sounding
wherever it is cut (no "and", "to" for the engine to wait on)."""


async def test_a_caller_talking_on_past_sphinxs_longest_utterance_is_answered_once_they_stop(
    pool: asyncpg.Pool,
) -> None:
    # Without speculation nothing asks PocketSphinx for its words at the caller's short pauses: the whole
    # monologue is one utterance to it, cut at MAX_UTTERANCE_MS.
    speech = b"".join(await spoken_frames(MONOLOGUE))
    speech_ms = len(speech) // 8
    assert speech_ms > MAX_UTTERANCE_MS + 2000
    async with call_on("pipeline", pool, stt={"provider": "sphinx"}, endpointing={"speculate": False}) as rig:
        rig.line.say(speech)
        await rig.wait_for_turns(2, timeout=speech_ms / 1000 + 15)
        await rig.finish()
    turns = await rig.turns()
    assert [t.speaker for t in turns] == ["caller", "agent"], [(t.speaker, t.text) for t in turns]
    caller, agent = turns
    assert caller.text.startswith("hello") and caller.text.endswith("goodbye"), caller.text  # all of it, in one turn
    assert caller.end_ms is not None and caller.end_ms >= speech_ms - 1000
    assert agent.start_ms is not None and agent.start_ms >= caller.end_ms  # not while the caller still spoke
