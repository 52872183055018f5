"""Messages added to a chat model's context from outside the conversation (the live-call API's /message): every later
request carries them after the turns they came after, and a discarded speculative reply's rewind keeps them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from config.agent import OpenAILLMConfig
from pipelines.llm.base import ConversationTurn
from pipelines.llm.openai_chat import OpenAIChatLLM
from tests.fakes.openai_chat import FakeOpenAI, ToolCall

KEY = "sk-test-added-messages"
INSTRUCTIONS = "You answer the phone for the clinic."


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def llm(fake: FakeOpenAI) -> AsyncIterator[OpenAIChatLLM]:
    client = AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
    yield OpenAIChatLLM(OpenAILLMConfig(), client=client, instructions=INSTRUCTIONS)
    await client.close()


async def reply(llm: OpenAIChatLLM, *turns: tuple[str, str]) -> None:
    conversation = [ConversationTurn("caller" if who == "caller" else "agent", text) for who, text in turns]
    async for _ in llm.respond(conversation):
        pass


async def test_an_added_message_is_in_every_later_request_after_the_turns_it_came_after(
    fake: FakeOpenAI, llm: OpenAIChatLLM
) -> None:
    fake.default_reply = "Sure."
    first = [("caller", "Hi there."), ("agent", "Hello, how can I help?")]
    assert llm.add_message("system", "The caller is a returning patient.", after_turns=2)
    assert llm.add_message("user", "Operator: offer Tuesday first.", after_turns=2)
    await reply(llm, *first, ("caller", "I need an appointment."))
    await reply(llm, *first, ("caller", "I need an appointment."), ("agent", "Sure."), ("caller", "Tuesday?"))
    for request in fake.requests:
        assert request["messages"][:6] == [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "system", "content": "The caller is a returning patient."},
            {"role": "user", "content": "Operator: offer Tuesday first."},
            {"role": "user", "content": "I need an appointment."},
        ]


async def test_a_message_added_while_a_speculative_reply_ran_survives_its_rewind(
    fake: FakeOpenAI, llm: OpenAIChatLLM
) -> None:
    fake.replies.extend([[ToolCall("send_dtmf", {"digits": "1"})], "Pressed.", "Of course."])
    checkpoint = llm.checkpoint()
    await reply(llm, ("caller", "Press one for me."))  # the speculative reply: it remembers a function exchange
    llm.add_message("system", "Speak slowly.", after_turns=0)
    llm.rewind(checkpoint)  # the caller spoke on: the reply is discarded
    await reply(llm, ("caller", "Press one for me, please."))
    assert fake.requests[-1]["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "system", "content": "Speak slowly."},
        {"role": "user", "content": "Press one for me, please."},
    ]
