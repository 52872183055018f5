"""Calls through the real server where the caller asks what only the agent's knowledge base knows.

The offline pipeline (PocketSphinx, the conversation path, eSpeak NG) answers from the best passage; the cloud
pipeline's model (a fake OpenAI that reads its function results, as a model would) calls search_knowledge_base.
Either way the answer is in the CallLog, and the organization's documents are what was searched. The engine has
vector search on (the fake OpenAI's embeddings), so a passage can be found that full-text search alone misses.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from engine.simulator import CallResult, Pause, Say, simulate_call
from storage import agents, conversation_paths, knowledge_bases, organizations, phone_numbers
from storage.enums import AgentStatus, CallerType, DocumentType
from storage.knowledge_search import search_passages
from tests.databases import TestDatabases
from tests.engine_server import running_engine
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.openai_chat import FakeOpenAI, Step, ToolCall
from tests.fakes.openai_realtime import FakeRealtime
from tests.test_calls_e2e import call_log as finished_log
from tests.test_calls_e2e import turns

TOKEN = "test-auth-token-0123456789abcdef"
CALLER = "+15005550006"
DG_KEY, OPENAI_KEY, EL_KEY = "dg-test-key", "sk-test-openai", "el-test-key"
_numbers = itertools.count(700)

OFFLINE = {"stt": {"provider": "sphinx"}, "llm": {"provider": "conversation_path"}, "tts": {"provider": "espeak"}}
CLOUD = {
    "stt": {"provider": "deepgram", "endpointing": 300},
    "llm": {"provider": "openai", "model": "gpt-4o-mini"},
    "tts": {"provider": "elevenlabs", "voice": "june"},
}
PATH_NODES = [
    {"id": "start", "data": {"text": "Do you want sales or support?", "isStart": True}},
    {"id": "sales", "data": {"text": "Sales will call you back. Goodbye.", "endCall": True}},
]
PATH_EDGES = [{"id": "to-sales", "source": "start", "target": "sales", "data": {"keywords": ["sales"]}}]


class ReadingOpenAI(FakeOpenAI):
    """A fake model that, after a function call, answers with the sentence of the function's result that shares
    most words with the caller's question, as a model reading its tool result would."""

    def _next_reply(self, messages: Sequence[Mapping[str, Any]]) -> list[Step]:
        if messages and messages[-1].get("role") == "tool":
            asked = set(next(m for m in reversed(messages) if m["role"] == "user")["content"].lower().split())
            sentences = re.split(r"(?<=\.)\s+|\n+", str(messages[-1]["content"]))
            best = max(sentences, key=lambda sentence: len(asked & set(sentence.lower().split())))
            return ["From our documents: " + re.sub(r"^\[\d+\] ", "", best)]
        return super()._next_reply(messages)


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[tuple[FakeDeepgram, ReadingOpenAI, FakeElevenLabs]]:
    async with (
        FakeDeepgram(api_key=DG_KEY) as deepgram,
        ReadingOpenAI(api_key=OPENAI_KEY) as openai,
        FakeElevenLabs(api_key=EL_KEY, ms_per_char=5) as elevenlabs,
    ):
        yield deepgram, openai, elevenlabs


@pytest.fixture(scope="module")
async def engine(db_url: str, fakes: tuple[FakeDeepgram, ReadingOpenAI, FakeElevenLabs]) -> AsyncIterator[str]:
    deepgram, openai, elevenlabs = fakes
    async with running_engine(
        db_url,
        twilio_auth_token=TOKEN,
        deepgram_api_key=DG_KEY,
        openai_api_key=OPENAI_KEY,
        elevenlabs_api_key=EL_KEY,
        deepgram_url=deepgram.url,
        openai_base_url=openai.base_url,
        elevenlabs_url=elevenlabs.url,
        kb_ingest_poll_interval=0.05,
        kb_embedding_model="text-embedding-3-small",
        kb_embedding_dimensions=256,
    ) as base:
        yield base


async def line_with_knowledge(
    pool: asyncpg.Pool,
    configuration: dict[str, Any],
    facts: str,
    *,
    name: str,
    with_path: bool = True,
    embedded: bool = True,
) -> tuple[str, str, str]:
    """A new organization's number answered by an agent linked to a knowledge base holding `facts` (ingested), and
    (`with_path`) to the offline model's conversation path, which a cloud model would follow too. `embedded`: wait
    for its passages' embeddings too (an engine with an embedding model must be running).

    Returns (number, organization id, document id).
    """
    n = next(_numbers)
    org = (await organizations.create_organization(pool, name=name, slug=f"kb-calls-{n}", credits=100)).id
    number = await phone_numbers.create_phone_number(pool, organization_id=org, phone_number=f"+1555557{n:04d}")
    agent = await agents.create_agent(
        pool,
        organization_id=org,
        name=name,
        status=AgentStatus.ACTIVE,
        caller_type=CallerType.INBOUND,
        phone_number_id=number.id,
        configuration=parse_agent_configuration(configuration).to_json(),
    )
    if with_path:
        path = await conversation_paths.create_conversation_path(
            pool, organization_id=org, name="path", nodes=PATH_NODES, edges=PATH_EDGES
        )
        await agents.link_conversation_path(pool, organization_id=org, agent_id=agent.id, conversation_path_id=path.id)
    return number.phone_number, org, await give_knowledge(pool, org, agent.id, facts, embedded=embedded)


async def give_knowledge(
    pool: asyncpg.Pool, organization_id: str, agent_id: str, facts: str, *, embedded: bool = True
) -> str:
    """Link the agent to a new knowledge base holding `facts`, once a running engine has ingested it (and embedded
    its passages, unless `embedded` is False: an engine with no embedding model); the document's id."""
    kb = await knowledge_bases.create_knowledge_base(pool, organization_id=organization_id, name="Price list")
    document = await knowledge_bases.add_document(
        pool,
        organization_id=organization_id,
        knowledge_base_id=kb.id,
        name="Prices",
        type=DocumentType.TEXT,
        content=facts,
    )
    await agents.link_knowledge_base(pool, organization_id=organization_id, agent_id=agent_id, knowledge_base_id=kb.id)
    done = "embedded" if embedded else "ingested"
    for _ in range(200):  # the engine's ingestion worker indexes and embeds it
        row = await pool.fetchrow(
            """
            SELECT d."status", bool_and(c."embeddingModel" IS NOT NULL)
            FROM "KnowledgeBaseDocument" d LEFT JOIN "KnowledgeBaseChunk" c ON c."documentId" = d."id"
            WHERE d."id" = $1 GROUP BY d."status"
            """,
            document.id,
        )
        assert row is not None
        status, vectors = row
        if status == "READY" and (vectors or not embedded):
            return document.id
        await asyncio.sleep(0.05)
    raise AssertionError(f"document {document.id} was never {done} ({status})")


async def call(engine: str, number: str, *steps: Any) -> CallResult:
    return await simulate_call(engine, to=number, from_=CALLER, script=steps, auth_token=TOKEN, timeout_s=90)


PRICES = (
    "Welcome to the Acme price list. "
    "The premium plan costs forty nine dollars a month. "
    "The basic plan is free for one user."
)


async def test_the_offline_agent_answers_from_its_knowledge_base(engine: str, pool: asyncpg.Pool) -> None:
    number, _, document_id = await line_with_knowledge(
        pool, {**OFFLINE, "firstSentence": "Hello."}, PRICES, name="Offline"
    )
    result = await call(engine, number, Say("how much does the premium plan cost"), Pause(2500))
    log = await finished_log(pool, result)
    rows = await turns(pool, log["id"])
    said = [(r["speaker"], r["text"]) for r in rows]
    assert ("agent", "The premium plan costs forty nine dollars a month.") in said, said
    assert "The premium plan costs forty nine dollars a month." in log["transcript"]
    # The answering turn says where it came from; the greeting, made before any search, says nothing.
    answer = next(r for r in rows if r["text"].startswith("The premium plan"))
    (retrieval,) = answer["knowledge"]["retrievals"]
    assert retrieval["passages"][0]["documentId"] == document_id
    assert rows[0]["knowledge"] is None


async def test_the_offline_agent_without_a_conversation_path_answers_from_its_knowledge_base(
    engine: str, pool: asyncpg.Pool
) -> None:
    # With no path, the offline model's fixed rules answered every question "I'm not able to answer it on this
    # line", never looking in the knowledge base linked to the agent.
    number, _, document_id = await line_with_knowledge(
        pool, {**OFFLINE, "firstSentence": "Hello."}, PRICES, name="Offline, no path", with_path=False
    )
    result = await call(engine, number, Say("how much does the premium plan cost"), Pause(2500))
    rows = await turns(pool, (await finished_log(pool, result))["id"])
    said = [(r["speaker"], r["text"]) for r in rows]
    assert ("agent", "The premium plan costs forty nine dollars a month.") in said, said
    answer = next(r for r in rows if r["text"].startswith("The premium plan"))
    assert answer["knowledge"]["retrievals"][0]["passages"][0]["documentId"] == document_id


async def test_the_cloud_agent_calls_search_knowledge_base(
    engine: str, pool: asyncpg.Pool, fakes: tuple[FakeDeepgram, ReadingOpenAI, FakeElevenLabs]
) -> None:
    deepgram, openai, _ = fakes
    number, _, document_id = await line_with_knowledge(pool, {**CLOUD, "firstSentence": "Hi."}, PRICES, name="Cloud")
    # Another organization states another price for the same plan: it must never be what this call finds.
    await line_with_knowledge(pool, CLOUD, "The premium plan costs nine hundred dollars.", name="Other")
    deepgram.transcripts.extend(["How much is the premium plan?"])
    openai.replies.extend([[ToolCall("search_knowledge_base", {"query": "premium plan price"})]])
    result = await call(engine, number, Say("how much is the premium plan"), Pause(600))
    log = await finished_log(pool, result)
    answer = "From our documents: The premium plan costs forty nine dollars a month."
    last = (await turns(pool, log["id"]))[-1]
    assert last["text"] == answer
    assert answer in log["transcript"]
    (retrieval,) = last["knowledge"]["retrievals"]
    assert retrieval["query"] == "premium plan price"
    assert {p["documentId"] for p in retrieval["passages"]} == {document_id}
    request = openai.requests[-1]
    assert "search_knowledge_base" in {tool["function"]["name"] for tool in request["tools"]}
    results = [m["content"] for m in request["messages"] if m["role"] == "tool"]
    assert results and "forty nine dollars" in results[0] and "nine hundred" not in results[0]


async def test_the_cloud_agent_answers_from_a_passage_only_vector_search_finds(
    engine: str, pool: asyncpg.Pool, fakes: tuple[FakeDeepgram, ReadingOpenAI, FakeElevenLabs]
) -> None:
    deepgram, openai, _ = fakes
    parking = "Parking: the car park behind the hotel costs twelve dollars a night."
    number, org, document_id = await line_with_knowledge(pool, {**CLOUD, "firstSentence": "Hi."}, parking, name="Car")
    kb = await pool.fetchval('SELECT "knowledgeBaseId" FROM "KnowledgeBaseDocument" WHERE "id" = $1', document_id)
    # "carpark" is no word of the passage: full-text search alone finds nothing.
    assert not await search_passages(pool, organization_id=org, knowledge_base_ids=[kb], query="carpark", limit=3)
    deepgram.transcripts.extend(["What does the carpark cost?"])
    openai.replies.extend([[ToolCall("search_knowledge_base", {"query": "carpark"})]])
    result = await call(engine, number, Say("what does the carpark cost"), Pause(600))
    log = await finished_log(pool, result)
    answer = f"From our documents: {parking}"
    last = (await turns(pool, log["id"]))[-1]
    assert last["text"] == answer and answer in log["transcript"]
    (retrieval,) = last["knowledge"]["retrievals"]
    assert retrieval["query"] == "carpark"
    assert [p["documentId"] for p in retrieval["passages"]] == [document_id]
    assert "carpark" in [request["input"][0] for request in openai.embedding_requests]


async def test_passages_can_go_to_the_model_with_each_caller_turn(
    engine: str, pool: asyncpg.Pool, fakes: tuple[FakeDeepgram, ReadingOpenAI, FakeElevenLabs]
) -> None:
    deepgram, openai, _ = fakes
    llm = {"provider": "openai", "model": "gpt-4o-mini", "knowledge_in_context": True}
    number, _, document_id = await line_with_knowledge(
        pool, {**CLOUD, "llm": llm, "firstSentence": "Hi."}, PRICES, name="In context"
    )
    deepgram.transcripts.extend(["Is the basic plan free?"])
    openai.replies.extend(["Yes, the basic plan is free for one user."])
    result = await call(engine, number, Say("is the basic plan free"), Pause(600))
    log = await finished_log(pool, result)
    messages = openai.requests[-1]["messages"]
    assert messages[-1] == {"role": "user", "content": "Is the basic plan free?"}
    assert messages[-2]["role"] == "system" and "free for one user" in messages[-2]["content"]
    last = (await turns(pool, log["id"]))[-1]
    assert last["text"] == "Yes, the basic plan is free for one user."
    (retrieval,) = last["knowledge"]["retrievals"]
    assert retrieval["query"] == "Is the basic plan free?"
    assert retrieval["passages"][0]["documentId"] == document_id


async def test_a_realtime_agent_calls_search_knowledge_base(db_url: str, pool: asyncpg.Pool) -> None:
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.caller_says("How much is the premium plan?")
        realtime.reply_tool("search_knowledge_base", {"query": "premium plan price"})
        realtime.reply("It is forty nine dollars a month.")
        settings: dict[str, Any] = {"openai_api_key": OPENAI_KEY, "openai_base_url": realtime.base_url}
        async with running_engine(
            db_url, twilio_auth_token=TOKEN, kb_ingest_poll_interval=0.05, **settings
        ) as base:  # its ingestion worker indexes the document
            number, _, document_id = await line_with_knowledge(
                pool,
                {"realtime": {"provider": "openai", "transcription_model": "gpt-4o-mini-transcribe"}},
                PRICES,
                name="Realtime",
                with_path=False,  # the model answers from the knowledge base, not from a path's nodes
                embedded=False,  # this engine has no embedding model: full-text finds the passage
            )
            result = await call(base, number, Say("how much is the premium plan"), Pause(600))
        updates = realtime.of_type("session.update")
        created = realtime.of_type("conversation.item.create")
    log = await finished_log(pool, result)
    assert "search_knowledge_base" in {tool["name"] for tool in updates[0]["session"]["tools"]}
    outputs = [e["item"]["output"] for e in created if e["item"]["type"] == "function_call_output"]
    assert outputs and "forty nine dollars" in outputs[0]
    rows = await turns(pool, log["id"])
    assert rows[-1]["text"] == "It is forty nine dollars a month."
    retrievals = [r["knowledge"] for r in rows if r["knowledge"] is not None]
    assert retrievals and retrievals[0]["retrievals"][0]["passages"][0]["documentId"] == document_id


async def test_a_search_for_words_the_database_cannot_hold_is_still_answered(
    engine: str, pool: asyncpg.Pool, fakes: tuple[FakeDeepgram, ReadingOpenAI, FakeElevenLabs]
) -> None:
    # A model's JSON arguments may carry a NUL ("\u0000") or half an emoji ("\ud83d"), which no PostgreSQL text can
    # hold: the search raised, the reply task died with it, and the caller heard nothing more.
    deepgram, openai, _ = fakes
    number, _, document_id = await line_with_knowledge(pool, {**CLOUD, "firstSentence": "Hi."}, PRICES, name="NUL")
    deepgram.transcripts.extend(["How much is the premium plan?"])
    openai.replies.extend([[ToolCall("search_knowledge_base", {"query": "premium\u0000 plan \ud83d price"})]])
    result = await call(engine, number, Say("how much is the premium plan"), Pause(600))
    log = await finished_log(pool, result)
    last = (await turns(pool, log["id"]))[-1]
    assert last["text"] == "From our documents: The premium plan costs forty nine dollars a month."
    (retrieval,) = last["knowledge"]["retrievals"]
    assert {p["documentId"] for p in retrieval["passages"]} == {document_id}


async def test_while_the_embedding_key_is_refused_calls_stop_sending_questions_and_resume_once_it_works(
    databases: TestDatabases,
) -> None:
    # Every caller turn sent its question to the embedding API, refused like the passages before it: a refused
    # request per turn, in the call's time and on the provider.
    engine_key = "sk-revoked"
    db_url = await databases.migrated()  # no other engine embeds the passage with a key that works
    pool = await databases.pool(db_url)
    try:
        await refused_then_working_key(db_url, pool, engine_key)
    finally:
        await pool.close()


async def refused_then_working_key(db_url: str, pool: asyncpg.Pool, engine_key: str) -> None:
    """Calls to an engine whose embedding key the API refuses, then takes again."""

    def questions_sent(fake: FakeOpenAI) -> list[str]:
        return [r["input"][0] for r in fake.embedding_requests if r["input"] != [PRICES]]

    async with (
        FakeOpenAI(api_key="sk-another") as openai,
        running_engine(
            db_url,
            twilio_auth_token=TOKEN,
            openai_api_key=engine_key,
            openai_base_url=openai.base_url,
            kb_ingest_poll_interval=0.05,
            kb_embedding_model="text-embedding-3-small",
            kb_embedding_dimensions=256,
        ) as base,
    ):
        number, _, document_id = await line_with_knowledge(
            pool, {**OFFLINE, "firstSentence": "Hello."}, PRICES, name="Refused key", embedded=False
        )
        for _ in range(200):  # the ingestion worker's round is refused: the engine knows its key is
            if openai.embedding_requests:
                break
            await asyncio.sleep(0.05)
        result = await call(
            base,
            number,
            Say("how much does the premium plan cost"),
            Pause(1500),
            Say("is the basic plan free"),
            Pause(1500),
            Say("how much does the premium plan cost"),
            Pause(2500),
        )
        assert questions_sent(openai) == []
        said = [(r["speaker"], r["text"]) for r in await turns(pool, (await finished_log(pool, result))["id"])]
        assert ("agent", "The premium plan costs forty nine dollars a month.") in said, said  # by full-text

        openai.api_key = engine_key  # the provider takes the key again: the waiting passage is embedded ...
        for _ in range(400):
            embedded = 'SELECT bool_and("embeddingModel" IS NOT NULL) FROM "KnowledgeBaseChunk" WHERE "documentId" = $1'
            if await pool.fetchval(embedded, document_id):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the passage was never embedded once the key worked")
        # ... and questions are embedded again.
        result = await call(base, number, Say("how much does the premium plan cost"), Pause(2500))
        assert len(questions_sent(openai)) == 1
        said = [(r["speaker"], r["text"]) for r in await turns(pool, (await finished_log(pool, result))["id"])]
        assert ("agent", "The premium plan costs forty nine dollars a month.") in said, said
