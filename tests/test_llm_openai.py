"""Specifications of the OpenAI chat model: the real AsyncOpenAI client against a local fake Chat Completions server."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from config.agent import OpenAILLMConfig, parse_agent_configuration
from pipelines.clients import ProviderClients
from pipelines.conversation.transfer_rules import TransferRules
from pipelines.llm import openai_chat
from pipelines.llm.base import (
    ConversationTurn,
    EndCall,
    LanguageModel,
    LLMError,
    LLMEvent,
    SendDtmf,
    TextDelta,
    TransferCall,
)
from pipelines.llm.openai_chat import MAX_TOOL_ROUNDS, OpenAIChatLLM
from pipelines.tools import ToolRunner, agent_functions
from tests.fakes.openai_chat import FakeOpenAI, ToolCall, token_deltas
from tests.fakes.server import serve

KEY = "sk-test-4f9a1c"
INSTRUCTIONS = "You are the front desk of Acme Dental. Be brief."
LOOKUP_ORDER = {
    "name": "lookup_order",
    "description": "Find an order by its number.",
    "parameters": {"type": "object", "properties": {"order": {"type": "integer"}}, "required": ["order"]},
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    """A fresh fake OpenAI accepting KEY."""
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    """A real AsyncOpenAI pointed at the fake, without retries."""
    client = AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
    yield client
    await client.close()


@dataclass
class Webhook:
    """A tiny Tool webhook on 127.0.0.1: records what it receives and answers with `reply`."""

    url: str
    reply: str
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    """The organization's order service, answering every lookup the same way."""
    hook = Webhook(url="", reply="Order 7 ships on Tuesday.")

    async def answer(request: web.Request) -> web.Response:
        hook.received.append(await request.json())
        return web.Response(text=hook.reply)

    app = web.Application()
    app.router.add_post("/orders", answer)
    async with serve(app) as base_url:
        hook.url = f"{base_url}/orders"
        yield hook


@pytest.fixture
async def tools(webhook: Webhook) -> AsyncIterator[ToolRunner]:
    """A ToolRunner serving `lookup_order` through the webhook."""

    @dataclass
    class ToolRow:
        id: str
        name: str
        configuration: dict[str, Any]

    row = ToolRow("tool_1", "Orders", {"function": LOOKUP_ORDER, "webhook": {"url": webhook.url}})
    async with aiohttp.ClientSession() as session:
        yield ToolRunner(agent_functions([row]), call={"call_id": "call_42"}, allow_private=True, session=session)


TRANSFERS = parse_agent_configuration(
    {"transfer": {"destinations": [{"pattern": "+1415555****", "label": "Front office"}]}}
).transfer


def model(client: AsyncOpenAI, tools: ToolRunner | None = None, **config: Any) -> OpenAIChatLLM:
    """The model under test, on gpt-4o-mini unless `config` says otherwise, allowed to transfer to +1 415 555."""
    return OpenAIChatLLM(
        OpenAILLMConfig(**config),
        client=client,
        instructions=INSTRUCTIONS,
        tools=tools,
        default_region="US",
        transfer=TransferRules.from_config(TRANSFERS),
    )


async def respond(llm: LanguageModel, *turns: ConversationTurn) -> list[LLMEvent]:
    """Everything the model yields for the conversation."""
    return [event async for event in llm.respond(list(turns))]


def caller(text: str) -> ConversationTurn:
    return ConversationTurn("caller", text)


def agent(text: str) -> ConversationTurn:
    return ConversationTurn("agent", text)


def spoken(events: Sequence[LLMEvent]) -> str:
    """What the caller would hear."""
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def said(text: str) -> list[LLMEvent]:
    """The TextDeltas the fake streams for `text`."""
    return [TextDelta(token) for token in token_deltas(text)]


# --------------------------------------------------------------------------------------------------- text


async def test_text_is_yielded_delta_by_delta_in_order(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append("Sure, we're open nine to five. Anything else?")
    events = await respond(model(client), caller("When are you open?"))
    assert len(events) > 5
    assert events == said("Sure, we're open nine to five. Anything else?")


async def test_an_emoji_split_between_two_deltas_is_yielded_whole_with_the_second(
    fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    fake.replies.append(["Booked \ud83d", "\ude00 for two."])  # the halves in two deltas, as JSON escapes
    events = await respond(model(client), caller("A table for two?"))
    assert events == [TextDelta("Booked"), TextDelta(" "), TextDelta("\U0001f600"), *said(" for two.")]


async def test_half_an_emoji_ending_the_stream_is_said_as_a_replacement_character(
    fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    fake.replies.append("Booked \ud83d")
    events = await respond(model(client), caller("A table for two?"))
    assert spoken(events) == "Booked \ufffd"


async def test_the_request_carries_instructions_conversation_tools_and_settings(
    fake: FakeOpenAI, client: AsyncOpenAI, tools: ToolRunner
) -> None:
    llm = model(client, tools, model="gpt-4.1-mini", temperature=0.3, max_tokens=200, top_p=0.9)
    await respond(llm, caller("Hi"), agent("Hello! How can I help?"), caller("Where is my order?"))
    [request] = fake.requests
    assert request["model"] == "gpt-4.1-mini"
    assert request["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Where is my order?"},
    ]
    assert [tool["function"]["name"] for tool in request["tools"]] == [
        "end_call",
        "transfer_call",
        "send_dtmf",
        "opt_out",
        "lookup_order",
    ]
    assert request["tools"][4] == {"type": "function", "function": LOOKUP_ORDER}
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert (request["temperature"], request["max_completion_tokens"], request["top_p"]) == (0.3, 200, 0.9)


async def test_settings_left_unset_are_not_sent(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    await respond(model(client), caller("Hi"))
    [request] = fake.requests
    assert "top_p" not in request
    assert "max_completion_tokens" not in request
    assert "max_tokens" not in request
    assert "tool_choice" not in request
    assert [tool["function"]["name"] for tool in request["tools"]] == [
        "end_call",
        "transfer_call",
        "send_dtmf",
        "opt_out",
    ]


async def test_token_usage_is_summed_over_completions(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.extend([[ToolCall("send_dtmf", {"digits": "1"})], "Done."])
    llm = model(client)
    await respond(llm, caller("Press one"))
    assert llm.usage.completions == 2
    assert llm.usage.prompt_tokens > 0
    assert llm.usage.completion_tokens > 0
    assert llm.usage.total_tokens == llm.usage.prompt_tokens + llm.usage.completion_tokens


# --------------------------------------------------------------------------------------------------- call controls


async def test_end_call_ends_the_reply_after_what_was_said(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append(["Thanks for calling, goodbye!", ToolCall("end_call", {"reason": "caller is done"})])
    events = await respond(model(client), caller("That's all, bye"))
    assert events == [*said("Thanks for calling, goodbye!"), EndCall("caller is done")]
    assert len(fake.requests) == 1


async def test_transfer_to_a_valid_number_is_a_transfer_in_e164(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append([ToolCall("transfer_call", {"phone_number": "+1 (415) 555-2671", "reason": "billing"})])
    events = await respond(model(client), caller("Put me through to billing"))
    asked = {"phone_number": "+1 (415) 555-2671", "reason": "billing"}
    assert events == [TransferCall("+14155552671", "billing", asked=asked)]
    assert len(fake.requests) == 1


async def test_a_national_number_is_read_in_the_default_region(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append([ToolCall("transfer_call", {"phone_number": "(415) 555-2671"})])
    events = await respond(model(client), caller("Transfer me"))
    assert events == [
        TransferCall("+14155552671", "the agent transferred the call", asked={"phone_number": "(415) 555-2671"})
    ]


async def test_an_invalid_transfer_number_goes_back_to_the_model(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.extend([[ToolCall("transfer_call", {"phone_number": "12"})], "Could you give me the full number?"])
    events = await respond(model(client), caller("Transfer me to twelve"))
    assert events == said("Could you give me the full number?")
    assistant, result = fake.requests[1]["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "transfer_call"
    assert result["role"] == "tool"
    assert result["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert result["content"].startswith("error: '12' is not a valid phone number")


async def test_send_dtmf_plays_the_tones_and_the_model_continues(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.extend([["Pressing one.", ToolCall("send_dtmf", {"digits": "1w#"})], " Now waiting."])
    events = await respond(model(client), caller("For sales press one"))
    assert events == [*said("Pressing one."), SendDtmf("1w#"), *said(" Now waiting.")]
    assistant, result = fake.requests[1]["messages"][-2:]
    assert assistant["content"] == "Pressing one."
    assert result == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "sent"}


async def test_digits_that_cannot_be_dialled_are_refused(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.extend([[ToolCall("send_dtmf", {"digits": "call sales"})], "Sorry, which key?"])
    events = await respond(model(client), caller("Press the sales key"))
    assert events == said("Sorry, which key?")
    assert fake.requests[1]["messages"][-1]["content"].startswith("error: 'callsales' cannot be dialled")


async def test_several_calls_in_one_response_are_carried_out_in_order(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append([ToolCall("send_dtmf", {"digits": "2"}), ToolCall("end_call", {"reason": "menu done"})])
    events = await respond(model(client), caller("Press two then hang up"))
    assert events == [SendDtmf("2"), EndCall("menu done")]
    assert len(fake.requests) == 1


async def test_function_rounds_per_reply_are_capped(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.extend([[ToolCall("send_dtmf", {"digits": "1"})]] * (MAX_TOOL_ROUNDS + 3))
    events = await respond(model(client), caller("Keep pressing one"))
    assert events == [SendDtmf("1")] * MAX_TOOL_ROUNDS
    assert len(fake.requests) == MAX_TOOL_ROUNDS + 1
    assert fake.requests[-1]["tool_choice"] == "none"


# --------------------------------------------------------------------------------------------------- agent functions


async def test_an_agent_function_calls_the_webhook_and_the_model_speaks_its_answer(
    fake: FakeOpenAI, client: AsyncOpenAI, tools: ToolRunner, webhook: Webhook
) -> None:
    fake.replies.extend([["Let me check.", ToolCall("lookup_order", {"order": 7})], " It ships on Tuesday."])
    events = await respond(model(client, tools), caller("Where is order seven?"))
    assert events == said("Let me check. It ships on Tuesday.")
    assert webhook.received == [{"function": "lookup_order", "arguments": {"order": 7}, "call": {"call_id": "call_42"}}]
    assistant, result = fake.requests[1]["messages"][-2:]
    assert assistant["content"] == "Let me check."
    assert assistant["tool_calls"][0]["function"] == {"name": "lookup_order", "arguments": '{"order": 7}'}
    assert result == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": webhook.reply}


async def test_the_next_reply_sees_the_function_exchange_where_it_happened(
    fake: FakeOpenAI, client: AsyncOpenAI, tools: ToolRunner
) -> None:
    fake.replies.extend([["Let me check.", ToolCall("lookup_order", {"order": 7})], " It ships on Tuesday.", "Bye!"])
    llm = model(client, tools)
    first = [caller("Where is order seven?")]
    await respond(llm, *first)
    await respond(llm, *first, agent("Let me check. It ships on Tuesday."), caller("Thanks"))
    exchange = fake.requests[1]["messages"][-2:]
    call_id = exchange[0]["tool_calls"][0]["id"]
    assert fake.requests[2]["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": "Where is order seven?"},
        {"role": "assistant", "content": None, "tool_calls": exchange[0]["tool_calls"]},
        {"role": "tool", "tool_call_id": call_id, "content": "Order 7 ships on Tuesday."},
        {"role": "assistant", "content": "Let me check. It ships on Tuesday."},
        {"role": "user", "content": "Thanks"},
    ]


async def test_arguments_that_are_not_json_go_back_to_the_model(
    fake: FakeOpenAI, client: AsyncOpenAI, tools: ToolRunner, webhook: Webhook
) -> None:
    fake.replies.extend([[ToolCall("lookup_order", '{"order": 7')], "Which order was it?"])
    events = await respond(model(client, tools), caller("Order seven"))
    assert events == said("Which order was it?")
    assert webhook.received == []
    assert fake.requests[1]["messages"][-1]["content"].startswith("error: the arguments were not a JSON object")


async def test_a_function_the_agent_does_not_have_is_an_error_for_the_model(
    fake: FakeOpenAI, client: AsyncOpenAI
) -> None:
    fake.replies.extend([[ToolCall("lookup_order", {"order": 7})], "I can't look that up."])
    events = await respond(model(client), caller("Where is order seven?"))
    assert events == said("I can't look that up.")
    assert fake.requests[1]["messages"][-1]["content"] == "error: there is no function named 'lookup_order'"


# --------------------------------------------------------------------------------------------------- failures


async def test_a_wrong_key_is_an_llm_error_that_does_not_show_the_key(fake: FakeOpenAI) -> None:
    wrong = "sk-wrong-77c2e1d0"
    client = AsyncOpenAI(api_key=wrong, base_url=fake.base_url, max_retries=0)
    try:
        with pytest.raises(LLMError, match="openai refused the API key") as caught:
            await respond(model(client), caller("Hi"))
    finally:
        await client.close()
    assert wrong not in str(caught.value)
    assert wrong[-4:] not in str(caught.value)
    assert caught.value.__cause__ is None


async def test_a_server_error_is_an_llm_error(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.fail_next = 1
    with pytest.raises(LLMError, match=r"openai answered HTTP 500 for 'gpt-4o-mini': The server had an error"):
        await respond(model(client), caller("Hi"))


async def test_an_error_in_the_middle_of_the_stream_is_an_llm_error(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append("This sentence will not finish.")
    fake.error_mid_stream = True
    events: list[LLMEvent] = []
    with pytest.raises(LLMError, match="The model stopped unexpectedly"):
        async for event in model(client).respond([caller("Hi")]):
            events.append(event)
    assert events == [TextDelta("This")]


async def test_a_stream_that_breaks_is_an_llm_error(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.replies.append("This sentence will not finish.")
    fake.break_mid_stream = True
    events: list[LLMEvent] = []
    with pytest.raises(LLMError, match=r"openai stream for 'gpt-4o-mini' broke: "):
        async for event in model(client).respond([caller("Hi")]):
            events.append(event)
    assert events == [TextDelta("This")]


async def test_an_unreachable_server_is_an_llm_error() -> None:
    async with FakeOpenAI(api_key=KEY) as gone:
        pass
    client = AsyncOpenAI(api_key=KEY, base_url=gone.base_url, max_retries=0)
    try:
        with pytest.raises(LLMError, match=r"openai could not be reached at http://127\.0\.0\.1"):
            await respond(model(client), caller("Hi"))
    finally:
        await client.close()


# --------------------------------------------------------------------------------------------------- barge-in


async def wait_for_abort(fake: FakeOpenAI) -> None:
    """Until the fake notices its client went away."""
    async with asyncio.timeout(5):
        await fake.stream_aborted.wait()


async def test_cancelling_a_reply_closes_its_stream(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.token_interval_ms = 20
    fake.replies.append("word " * 500)
    first_delta = asyncio.Event()

    async def listen() -> None:
        async for _ in model(client).respond([caller("Tell me a long story")]):
            first_delta.set()

    task = asyncio.create_task(listen())
    await first_delta.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await wait_for_abort(fake)
    assert fake.aborted_streams == 1


async def test_closing_a_reply_early_closes_its_stream(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake.token_interval_ms = 20
    fake.replies.append("word " * 500)
    async with contextlib.aclosing(model(client).respond([caller("Tell me a long story")])) as reply:
        async for event in reply:
            assert event == TextDelta("word")
            break
    await wait_for_abort(fake)


# --------------------------------------------------------------------------------------------------- clients


async def test_replies_one_after_another_reuse_one_connection(
    fake: FakeOpenAI, provider_clients: ProviderClients
) -> None:
    # Each stream is read to its end after [DONE], so HTTP/1.1 keeps the connection for the next reply, even when
    # the end of the body comes a moment after [DONE].
    fake.eof_delay_ms = 30
    shared = provider_clients.openai(KEY, fake.base_url)  # the engine's kind of client (aiohttp)
    for reply in ("One.", "Two.", "Three."):
        fake.replies.append(reply)
        await respond(model(shared), caller("Hi"))
    assert len(fake.peers) == 3
    assert len(set(fake.peers)) == 1


async def test_the_engines_clients_keep_one_openai_client_per_key_and_url(fake: FakeOpenAI) -> None:
    clients = ProviderClients()
    try:
        client = clients.openai(KEY, fake.base_url)
        assert clients.openai(KEY, fake.base_url + "/") is client
        assert clients.openai("sk-other", fake.base_url) is not client
        assert client.max_retries == 1
        fake.replies.append("Hello.")
        assert spoken(await respond(model(client), caller("Hi"))) == "Hello."
    finally:
        await clients.aclose()


async def test_the_fakes_default_reply_can_answer_the_last_caller_turn() -> None:
    async with FakeOpenAI(api_key=KEY, default_reply=lambda heard: f"You said: {heard}") as echo:
        echo_client = AsyncOpenAI(api_key=KEY, base_url=echo.base_url, max_retries=0)
        try:
            events = await respond(model(echo_client), caller("first"), agent("ok"), caller("second"))
        finally:
            await echo_client.close()
    assert spoken(events) == "You said: second"


@pytest.mark.parametrize("seed", range(20))
async def test_stream_lines_are_split_alike_however_the_bytes_arrive(seed: int) -> None:
    # SSE lines end in "\r\n", "\n" or "\r"; a "\r\n" split between two reads is still one line end.
    rng = random.Random(seed)  # noqa: S311 - a reproducible test input, not a secret
    ends = ["\r\n", "\n", "\r"]
    lines = [rng.choice(["", "data: {}", 'data: {"é": 1}', "event: x", ": keep-alive"]) for _ in range(30)]
    text, end = "", ""
    for line in lines:
        # After "\r", an empty line ended by "\n" would make "\r\n": one line end, not two.
        end = rng.choice(["\r\n", "\r"] if end == "\r" and not line else ends)
        text += line + end
    body = text.encode()
    if seed % 2:
        body += b"data: [DONE]"  # a last line with no end
        lines.append("data: [DONE]")
    cuts = sorted(rng.sample(range(1, len(body)), k=min(len(body) - 1, rng.randint(1, 40))))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]

    async def arriving() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    assert [line async for line in openai_chat._lines(arriving())] == [line.encode() for line in lines]


async def test_a_crlf_split_across_reads_and_empty_reads_end_one_line() -> None:
    async def arriving() -> AsyncIterator[bytes]:
        for piece in [b"data: 1\r", b"\n", b"", b"\n", b"data: 2\r", b"\r\n"]:
            yield piece

    assert [line async for line in openai_chat._lines(arriving())] == [b"data: 1", b"", b"data: 2", b""]
