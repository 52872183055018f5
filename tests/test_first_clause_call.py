"""Through the engine over real HTTP and WebSockets with the fake Deepgram, OpenAI and ElevenLabs: the first text
ElevenLabs is given for a reply is its first clause, before the first sentence's end has streamed."""

from __future__ import annotations

import asyncpg

from engine.simulator import Pause, Say
from tests.test_calls_e2e import call_log as finished_log
from tests.test_calls_e2e import turns
from tests.test_cloud_calls_e2e import Fakes, call, engine, fakes, make_line, organization_id

__all__ = ["engine", "fakes", "organization_id"]  # that module's fixtures: one engine on the three fakes

ANSWER = "We are open every weekday, from nine in the morning to five in the evening. Anything else?"


async def test_elevenlabs_speaks_the_first_clause_first(
    engine: str, fakes: Fakes, pool: asyncpg.Pool, organization_id: str
) -> None:
    number, _ = await make_line(pool, organization_id, firstClause={"minWords": 4})
    fakes.deepgram.transcripts.append("What are your opening hours?")
    fakes.openai.replies.append(ANSWER)
    fakes.openai.token_interval_ms = 20  # the sentence streams in over time, as a model's does
    before = len(fakes.elevenlabs.texts)
    result = await call(engine, number, Say("What are your opening hours"), Pause(2500))
    log = await finished_log(pool, result)
    spoken = [spoken.text.strip() for spoken in fakes.elevenlabs.texts[before:]]
    assert spoken[:3] == [
        "We are open every weekday,",
        "from nine in the morning to five in the evening.",
        "Anything else?",
    ]
    rows = await turns(pool, log["id"])
    assert [(r["speaker"], r["text"]) for r in rows] == [("caller", "What are your opening hours?"), ("agent", ANSWER)]
