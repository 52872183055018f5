"""The offline pipeline speculates too: PocketSphinx finishes the utterance in progress on request, and a
conversation path rewinds a reply the caller never heard."""

from __future__ import annotations

from pipelines.fallback import FallbackLLM
from pipelines.llm.base import ConversationTurn, TextDelta
from pipelines.llm.conversation_path import ConversationPathLLM
from pipelines.offline_workers import INLINE
from pipelines.stt.base import EndOfTurn, TranscriptUpdate
from pipelines.stt.sphinx import SphinxSTT
from tests.speech import silent_frames, spoken_frames

KEYPHRASES = ["book an appointment", "opening hours", "yes"]


async def test_sphinx_finalizes_the_speech_so_far_and_ends_the_turn_with_it_later() -> None:
    stt = SphinxSTT(keyphrases=KEYPHRASES, work=INLINE)
    await stt.start()
    assert not stt.punctuates
    for frame in silent_frames(400) + await spoken_frames("book an appointment") + silent_frames(200):
        stt.send_audio(frame)
    stt.finalize_now()
    for frame in silent_frames(1000):
        stt.send_audio(frame)
    await stt.close()
    events = [event async for event in stt.events() if isinstance(event, TranscriptUpdate | EndOfTurn)]
    finalized = [e for e in events if isinstance(e, TranscriptUpdate) and e.finalized]
    ends = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(finalized) == 1 and "appointment" in finalized[0].text.split()
    assert [end.text for end in ends] == [finalized[0].text]  # the same words end the turn, decoded once
    assert events.index(finalized[0]) < events.index(ends[0])


async def test_sphinx_words_said_after_the_finalize_join_the_same_turn() -> None:
    stt = SphinxSTT(keyphrases=KEYPHRASES, work=INLINE)
    await stt.start()
    frames = silent_frames(400) + await spoken_frames("book an appointment") + silent_frames(200)
    for frame in frames:
        stt.send_audio(frame)
    stt.finalize_now()
    for frame in silent_frames(100) + await spoken_frames("yes") + silent_frames(1000):
        stt.send_audio(frame)
    await stt.close()
    [end] = [event async for event in stt.events() if isinstance(event, EndOfTurn)]
    assert "appointment" in end.text.split() and end.text.split()[-1] == "yes"


PATH_NODES = [
    {"id": "start", "type": "input", "data": {"text": "Do you want an appointment?"}},
    {"id": "booked", "type": "output", "data": {"text": "Booked."}},
]
PATH_EDGES = [{"id": "e1", "source": "start", "target": "booked", "data": {"keywords": ["yes"]}}]


async def test_a_conversation_path_rewinds_a_reply_nobody_heard_also_behind_a_fallback_chain() -> None:
    path = ConversationPathLLM(nodes=PATH_NODES, edges=PATH_EDGES)
    model = FallbackLLM([("conversation_path", path)])
    checkpoint = model.checkpoint()
    said = [event async for event in model.respond([ConversationTurn(role="caller", text="yes")])]
    assert said[0] == TextDelta("Booked.")
    model.rewind(checkpoint)  # the speculative reply was discarded: the path is back at its start
    # (without the rewind the path would now be at its end node, and end the call instead)
    again = [event async for event in model.respond([ConversationTurn(role="caller", text="yes")])]
    assert again[0] == TextDelta("Booked.")
