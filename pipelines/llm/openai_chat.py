"""OpenAI streaming Chat Completions as the agent's language model, with the call-control and webhook functions.

Text is yielded as it streams. Function calls are gathered by their `index`; call controls (`end_call`,
`transfer_call`, `send_dtmf`, `opt_out`) become call events, the organization's functions go to the ToolRunner, and the
model continues with their results. Those exchanges are remembered, so later turns see what the tools answered.

With a conversation path (pipelines.paths), the system prompt is the current node's (pipelines.paths.prompts)
and the ways out are offered as `follow_path`: a move yields what the new node says or does, and the model goes
on speaking only where the node asks it to (a prompt, a knowledge answer, a global node's instructions).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

import httpx2
import openai
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionToolUnionParam,
)

from config.agent import OpenAILLMConfig
from config.text import storable_text
from media.dtmf import DIGITS_HELP, InvalidDigits, check_digits
from pipelines.clients import CloseClient
from pipelines.conversation.transfer_rules import NO_TRANSFERS, Refusal, TransferRules, builtin_functions
from pipelines.knowledge import KnowledgeSource, KnowledgeUnavailable, format_passages
from pipelines.llm.base import (
    ConversationTurn,
    EndCall,
    LLMError,
    LLMEvent,
    MessageRole,
    OptOut,
    SendDtmf,
    TextDelta,
    TransferCall,
)
from pipelines.paths.chat import ChatPath, PathMove
from pipelines.paths.engine import PathCheckpoint
from pipelines.paths.prompts import FOLLOW_PATH
from pipelines.tools import (
    CALL_ENDS,
    DTMF_SENT,
    END_CALL,
    OPT_OUT,
    OPT_OUT_DONE,
    SEND_DTMF,
    TRANSFER_CALL,
    ToolRunner,
    chat_tools,
    parse_arguments,
    transferring,
    unreadable_arguments,
)

__all__ = [
    "MAX_TOOL_ROUNDS",
    "OpenAIChatLLM",
    "TokenUsage",
    "new_client",
]

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS: Final = 5
"""Completions per `respond()` that may end in function calls; the one after them is told to just talk."""

# A phone call cannot wait long: fail fast on connect, and give up on a stream that goes quiet.
_TIMEOUT: Final = openai.Timeout(20.0, connect=5.0)
# The SDK's pool forgets an idle connection after 5 s, shorter than a caller's turn, so every reply would pay a new
# TCP+TLS handshake; keep connections for a minute and enough of them for every live call.
_POOL_LIMITS: Final = httpx2.Limits(max_connections=2000, max_keepalive_connections=1000, keepalive_expiry=60.0)
_DRAIN_TIMEOUT_S: Final = 1.0
"""Longest the rest of a completion's body is read after `[DONE]` (it ends at once; if not, the connection goes)."""


def new_client(api_key: str, base_url: str) -> tuple[AsyncOpenAI, CloseClient]:
    """A new `AsyncOpenAI` for this key and base URL, and how to close it (`ProviderClients` keeps one per pair).

    Its HTTP goes through aiohttp (the SDK's `DefaultAioHttpClient`) rather than httpx: a streamed completion
    costs about 1.5 ms of event-loop time instead of 2.1, on the loop every call's audio shares. An aiohttp
    session belongs to one event loop, as the engine's clients do.
    """
    # One retry covers a dropped keep-alive connection; more would leave the caller in silence.
    client = AsyncOpenAI(
        api_key=api_key,
        base_url=base_url,
        max_retries=1,
        timeout=_TIMEOUT,
        http_client=openai.DefaultAioHttpClient(timeout=_TIMEOUT, limits=_POOL_LIMITS),
    )
    return client, client.close


@dataclass(slots=True)
class TokenUsage:
    """Tokens a model has used so far, summed over its completions."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completions: int = 0

    def add(self, usage: Mapping[str, Any]) -> None:
        """Count one completion's usage (the `usage` object of its last chunk)."""
        self.prompt_tokens += _count(usage, "prompt_tokens")
        self.completion_tokens += _count(usage, "completion_tokens")
        self.total_tokens += _count(usage, "total_tokens")
        self.completions += 1


def _count(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) else 0


def _objects(value: Any) -> list[dict[str, Any]]:
    """The JSON objects of a list field of a chunk (anything else in a malformed chunk is skipped)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


@dataclass(slots=True)
class _FunctionCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class _Completion:
    """One streamed completion as it arrives: its text so far and its function calls by index."""

    text: list[str] = field(default_factory=list)
    calls: dict[int, _FunctionCall] = field(default_factory=dict)
    finish_reason: str | None = None
    split_half: str = ""
    """The first half of a surrogate pair that ended the last text delta, waiting for its second in the next."""

    def absorb(self, chunk: Mapping[str, Any]) -> list[str]:
        """Take in one chunk (its JSON as sent); return the text to speak now.

        The text is `storable_text` (the arguments are once complete: `function_calls`): JSON can carry a NUL or a
        lone surrogate ("\\ud83d", half an emoji), which the voice's request, the stored turns and the model's next
        request could not. An emoji whose halves come in two deltas (a server slicing its text by UTF-16 units)
        comes whole, with the second.
        """
        spoken: list[str] = []
        for choice in _objects(chunk.get("choices")):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                # A refusal is what the model says instead of an answer: the caller should hear it too.
                for key in ("content", "refusal"):
                    if (text := _string(delta.get(key))) and (whole := self._whole(text)):
                        spoken.append(whole)
                for fragment in _objects(delta.get("tool_calls")):
                    index = fragment.get("index")
                    call = self.calls.setdefault(index if isinstance(index, int) else 0, _FunctionCall())
                    call.id = _string(fragment.get("id")) or call.id
                    function = fragment.get("function")
                    if isinstance(function, dict):
                        # The name comes whole in a call's first fragment; the arguments come in pieces.
                        call.name = call.name or _string(function.get("name"))
                        call.arguments += _string(function.get("arguments"))
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str):
                self.finish_reason = finish_reason
        self.text.extend(spoken)
        return spoken

    def _whole(self, text: str) -> str:
        """`text` after the half held from the last delta, less a first half it ends with, `storable_text`."""
        text, self.split_half = self.split_half + text, ""
        if "\ud800" <= text[-1] <= "\udbff":
            text, self.split_half = text[:-1], text[-1]
        return storable_text(text)

    def ended(self) -> list[str]:
        """The text still to speak once the stream ended: a held half whose second never came, as U+FFFD."""
        if not self.split_half:
            return []
        self.split_half = ""
        self.text.append("\ufffd")
        return ["\ufffd"]

    def function_calls(self, ids: Iterator[int]) -> list[_FunctionCall]:
        """The complete function calls in index order, each with an id (made up if the server sent none), their
        arguments `storable_text`: made so whole, as an emoji whose halves came in two fragments stays one."""
        calls = [self.calls[index] for index in sorted(self.calls) if self.calls[index].name]
        for call in calls:
            call.id = call.id or f"call_{next(ids)}"
            call.arguments = storable_text(call.arguments)
        return calls


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What carrying out one function call gives: an event for the call, and the result the model gets."""

    event: LLMEvent | None = None
    result: str = ""
    ends_reply: bool = False
    events: tuple[LLMEvent, ...] = ()
    """More events, in order after `event` (what a move along the path says and does)."""

    @property
    def all_events(self) -> tuple[LLMEvent, ...]:
        """`event` and `events`, in order."""
        return (self.event, *self.events) if self.event is not None else self.events


class OpenAIChatLLM:
    """A call's conversation with an OpenAI chat model (or any server speaking Chat Completions).

    `usage` holds the tokens used so far. The client is the engine's (`ProviderClients`), not closed here.
    """

    scripted_opening = False
    """A chat model greets only when asked to (no first sentence)."""

    def __init__(
        self,
        config: OpenAILLMConfig,
        *,
        client: AsyncOpenAI,
        instructions: str,
        tools: ToolRunner | None = None,
        default_region: str | None = None,
        transfer: TransferRules = NO_TRANSFERS,
        path: ChatPath | None = None,
        knowledge: KnowledgeSource | None = None,
    ) -> None:
        """Talk to `config.model` through `client` with `instructions` as the system prompt.

        With `path`, the call follows that conversation path: the prompt adds the path's style and the current
        node, and the model moves with `follow_path`. With `config.knowledge_in_context`, each caller turn is first
        looked up in `knowledge` and the passages found go to the model with it (that request only).

        `tools` runs the agent's own functions; `default_region` (e.g. "US") reads transfer numbers the model
        gives without a country code; with None, only international numbers (+...) are accepted. `transfer` is
        where the model may transfer the call (default: nowhere, and `transfer_call` is not offered).
        """
        self._config = config
        self._client = client
        self._instructions = instructions
        self._tools = tools
        self._default_region = default_region
        self._transfer_rules = transfer
        self._path = path
        self.scripted_opening = path is not None  # a path's start node is the opening
        self._knowledge = knowledge if config.knowledge_in_context else None
        self._specs = [*builtin_functions(transfer), *(tools.specs if tools is not None else ())]
        self._tool_params = cast(list[ChatCompletionToolUnionParam], chat_tools(self._specs))
        # Function-call exchanges of this call, each with the number of conversation turns it came after.
        self._exchanges: list[tuple[int, list[ChatCompletionMessageParam]]] = []
        # Messages added from outside the conversation, each with the number of turns it came after: apart from
        # the exchanges, so that rewinding a discarded reply never drops one.
        self._added: list[tuple[int, ChatCompletionMessageParam]] = []
        self._call_ids = itertools.count(1)
        self._controls: dict[str, Callable[[Mapping[str, Any]], _Outcome]] = {
            END_CALL: self._end,
            TRANSFER_CALL: self._transfer,
            SEND_DTMF: self._dtmf,
            OPT_OUT: self._opt_out,
        }
        self.usage = TokenUsage()

    async def _stream(self, messages: list[ChatCompletionMessageParam], *, last_round: bool) -> httpx2.Response:
        """POST the streamed completion through the SDK's client; the response's body is still unread.

        `chat.completions.create` would walk every message of the conversation through the SDK's TypedDict
        transformer first: 3-4 ms of event-loop time per reply at a few turns, growing with the call, that every
        other call on the core waits for. Our messages are plain JSON already, so the request is the same. The
        SDK still sends it (auth, headers, retries, its errors for a refused request); the server-sent events
        are read by `_chunks`, as the JSON objects they arrive as: the SDK's stream would build a model for every
        token, and its decoder and draining cost as much again, for three fields we read.
        """
        body = _present(
            {
                "model": self._config.model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
                "tools": self._functions_now(),
                "tool_choice": "none" if last_round else None,
                "temperature": self._config.temperature,
                "max_completion_tokens": self._config.max_tokens,
                "top_p": self._config.top_p,
            }
        )
        return await self._client.post(
            "/chat/completions",
            body=body,
            options={"security": {"bearer_auth": True}},
            cast_to=httpx2.Response,
            stream=True,
        )

    async def _completion_text(
        self, messages: list[ChatCompletionMessageParam], completion: _Completion, *, last_round: bool
    ) -> AsyncGenerator[str, None]:
        """Stream one completion into `completion`, yielding its text as it comes; any failure is an LLMError."""
        try:
            response = await self._stream(messages, last_round=last_round)
            try:
                async with contextlib.aclosing(_chunks(response)) as chunks:
                    async for chunk in chunks:
                        if isinstance(error := chunk.get("error"), dict | str):
                            raise LLMError(
                                f"openai stream for {self._config.model!r} failed: {self._detail(error)}",
                                provider="openai",
                            )
                        if isinstance(usage := chunk.get("usage"), dict):
                            self.usage.add(usage)
                        for text in completion.absorb(chunk):
                            yield text
                    for text in completion.ended():
                        yield text
            finally:
                # However the stream is left (end, error, barge-in cancellation), its HTTP response is closed.
                await response.aclose()
        except openai.APIError as exc:
            raise self._error(exc) from (None if isinstance(exc, openai.AuthenticationError) else exc)
        except httpx2.HTTPError as exc:
            raise LLMError(
                f"openai stream for {self._config.model!r} broke: {type(exc).__name__}: {exc}", provider="openai"
            ) from None
        except ValueError as exc:  # json.JSONDecodeError, or a body that is not UTF-8
            raise LLMError(f"openai sent a malformed stream ({exc})", provider="openai") from None

    async def respond(self, conversation: Sequence[ConversationTurn]) -> AsyncGenerator[LLMEvent, None]:
        """Stream the reply: text as it comes, call controls as events, agent functions run in between."""
        anchor = len(conversation)
        prelude = await self._path.before_model(conversation) if self._path is not None else PathMove()
        for event in prelude.events:
            yield event
        if not prelude.model_speaks:
            return
        await self._hear_cut_short(anchor)
        messages = await self._with_knowledge(self._messages(conversation), conversation)
        spoken_tail = ""  # the last text said, so rounds of one reply join with a space
        for round_number in range(MAX_TOOL_ROUNDS + 1):
            last_round = round_number == MAX_TOOL_ROUNDS
            # "...is free." then, after a tool round, " Tuesday works.": rounds join with a space.
            separator = " " if spoken_tail and not spoken_tail[-1].isspace() else ""
            completion = _Completion()
            texts = self._completion_text(messages, completion, last_round=last_round)
            async with contextlib.aclosing(texts):
                async for text in texts:
                    delta = separator + text if not text[:1].isspace() else text
                    separator, spoken_tail = "", delta
                    yield TextDelta(delta)
            if completion.finish_reason in {"length", "content_filter"}:
                log.warning("openai %s stopped early: finish_reason=%s", self._config.model, completion.finish_reason)

            calls = completion.function_calls(self._call_ids)
            if not calls:
                return
            if last_round:
                log.warning("openai %s kept calling functions after %d rounds", self._config.model, MAX_TOOL_ROUNDS)
                return
            results: list[ChatCompletionMessageParam] = []
            for call in calls:
                outcome = await self._carry_out(call)
                for event in outcome.all_events:
                    yield event
                if outcome.ends_reply:
                    return
                results.append(_tool_result(call, outcome.result))
            # Later turns get the exchange without its text: the agent turn that follows holds what was heard.
            self._exchanges.append((anchor, [_assistant_calls(None, calls), *results]))
            messages = [*messages, _assistant_calls("".join(completion.text) or None, calls), *results]
            if self._path is not None:
                messages[0] = {"role": "system", "content": self._system_prompt()}  # the node may have changed

    async def _hear_cut_short(self, anchor: int) -> None:
        """Give the model what the webhooks of a reply cut while they ran answered (they may have acted), before the
        caller's last turn, in every later request: kept apart from the exchanges, which a discarded reply rewinds."""
        for name, arguments, result in await self._tools.cut_short() if self._tools is not None else ():
            call = _FunctionCall(f"call_{next(self._call_ids)}", name, json.dumps(arguments))
            after = max(anchor - 1, 0)
            self._added += [(after, _assistant_calls(None, [call])), (after, _tool_result(call, result))]

    def checkpoint(self) -> object:
        """The exchanges remembered and the place on the path (if any) now, for `rewind`."""
        return (len(self._exchanges), self._path.engine.checkpoint() if self._path is not None else None)

    def rewind(self, checkpoint: object) -> None:
        """Forget what a reply the caller never heard (a discarded speculation) remembered or moved on the path."""
        remembered, place = cast(tuple[int, PathCheckpoint | None], checkpoint)
        del self._exchanges[remembered:]
        if self._path is not None and place is not None:
            self._path.engine.rewind(place)

    def add_message(self, role: MessageRole, content: str, *, after_turns: int) -> bool:
        """Put a system or user message in every later request, after the conversation's first `after_turns` turns."""
        message: ChatCompletionMessageParam = (
            {"role": "system", "content": content} if role == "system" else {"role": "user", "content": content}
        )
        self._added.append((after_turns, message))
        return True

    async def close(self) -> None:
        """Nothing to release: the client is the engine's, shared by every call."""

    # ------------------------------------------------------------------------------------------- messages

    def _messages(self, conversation: Sequence[ConversationTurn]) -> list[ChatCompletionMessageParam]:
        exchanges_at: dict[int, list[ChatCompletionMessageParam]] = {}
        for anchor, exchange in self._exchanges:
            exchanges_at.setdefault(min(anchor, len(conversation)), []).extend(exchange)
        for anchor, message in self._added:
            exchanges_at.setdefault(min(anchor, len(conversation)), []).append(message)
        messages: list[ChatCompletionMessageParam] = []
        if system := self._system_prompt():
            messages.append({"role": "system", "content": system})
        for index, turn in enumerate(conversation):
            messages.extend(exchanges_at.get(index, ()))
            if not turn.text:
                continue
            if turn.role == "caller":
                messages.append({"role": "user", "content": turn.text})
            else:
                messages.append({"role": "assistant", "content": turn.text})
        messages.extend(exchanges_at.get(len(conversation), ()))
        return messages

    def _system_prompt(self) -> str:
        return self._path.system_prompt(self._instructions) if self._path is not None else self._instructions

    def _functions_now(self) -> list[ChatCompletionToolUnionParam]:
        """The functions offered: the call's, and `follow_path` with the ways out of the current node."""
        if self._path is None:
            return self._tool_params
        return cast(list[ChatCompletionToolUnionParam], chat_tools(self._path.functions(self._specs)))

    async def _follow(self, arguments: Mapping[str, Any]) -> _Outcome:
        if self._path is None:
            return _Outcome(result=f"error: there is no function named {FOLLOW_PATH!r}")
        move = await self._path.follow(arguments)
        return _Outcome(result=move.result, events=move.events, ends_reply=not move.model_speaks)

    async def _with_knowledge(
        self, messages: list[ChatCompletionMessageParam], conversation: Sequence[ConversationTurn]
    ) -> list[ChatCompletionMessageParam]:
        """The messages with the passages that match the caller's last words placed before them, if any match."""
        if self._knowledge is None or not conversation or conversation[-1].role != "caller":
            return messages
        try:
            passages = await self._knowledge.search(conversation[-1].text) if conversation[-1].text else []
        except KnowledgeUnavailable:
            passages = []  # the reply goes on without them (the lookup has logged why)
        if not passages:
            return messages
        note: ChatCompletionMessageParam = {
            "role": "system",
            "content": "Passages from your knowledge base that may answer the caller:\n\n" + format_passages(passages),
        }
        return [*messages[:-1], note, messages[-1]]

    # ------------------------------------------------------------------------------------------- functions

    async def _carry_out(self, call: _FunctionCall) -> _Outcome:
        arguments = parse_arguments(call.arguments)
        log.info("openai %s called %s", self._config.model, call.name)
        control = self._controls.get(call.name)
        if control is not None:
            outcome = control(arguments)
            if self._tools is not None:  # the call's live events hear of it (the ToolRunner tells them)
                await self._tools.carried_out(call.name, arguments, outcome.result)
            return outcome
        if call.name == FOLLOW_PATH:
            return await self._follow(arguments)
        if (unreadable := unreadable_arguments(call.name, call.arguments, arguments)) is not None:
            return _Outcome(result=unreadable)
        if self._tools is None:
            return _Outcome(result=f"error: there is no function named {call.name!r}")
        return _Outcome(result=await self._tools.run(call.name, arguments))

    def _end(self, arguments: Mapping[str, Any]) -> _Outcome:
        reason = _text(arguments.get("reason")) or "the agent ended the call"
        return _Outcome(EndCall(reason), CALL_ENDS, ends_reply=True)

    def _opt_out(self, arguments: Mapping[str, Any]) -> _Outcome:
        reason = _text(arguments.get("reason")) or "the callee asked not to be called again"
        return _Outcome(OptOut(reason), OPT_OUT_DONE, ends_reply=True)

    def _transfer(self, arguments: Mapping[str, Any]) -> _Outcome:
        reason = _text(arguments.get("reason")) or "the agent transferred the call"
        verdict = self._transfer_rules.check(_text(arguments.get("phone_number")), region=self._default_region)
        if isinstance(verdict, Refusal):
            log.warning("openai %s: a transfer to %r refused: %s", self._config.model, verdict.given, verdict.message)
            return _Outcome(result=verdict.message)
        return _Outcome(
            TransferCall(verdict.number, reason, asked=arguments), transferring(verdict.number), ends_reply=True
        )

    def _dtmf(self, arguments: Mapping[str, Any]) -> _Outcome:
        digits = _text(arguments.get("digits")).replace(" ", "")
        try:
            check_digits(digits)
        except InvalidDigits:
            return _Outcome(result=f"error: {digits!r} cannot be dialled; {DIGITS_HELP}")
        return _Outcome(SendDtmf(digits.replace("W", "w")), DTMF_SENT)

    # ------------------------------------------------------------------------------------------- errors

    def _detail(self, error: dict[str, Any] | str) -> str:
        """What an error event in the stream says, without the key."""
        message = error.get("message") if isinstance(error, dict) else error
        if not isinstance(message, str) or not message:
            message = "an error occurred during streaming"
        return _scrubbed(message, self._client.api_key)

    def _error(self, exc: openai.APIError) -> LLMError:
        detail = _scrubbed(_message(exc), self._client.api_key)
        model = self._config.model
        match exc:
            case openai.AuthenticationError():
                # OpenAI's own text quotes part of the key; none of it goes into logs or call records.
                message = "openai refused the API key (HTTP 401): check the key the agent's llm uses (OPENAI_API_KEY)"
            case openai.PermissionDeniedError():
                message = f"openai denied access to {model!r} (HTTP 403): {detail}"
            case openai.NotFoundError():
                message = f"openai has no model {model!r} at {self._client.base_url} (HTTP 404): {detail}"
            case openai.RateLimitError():
                message = f"openai rate limit or quota exceeded for {model!r} (HTTP 429): {detail}"
            case openai.APIStatusError(status_code=status):
                message = f"openai answered HTTP {status} for {model!r}: {detail}"
            case openai.APITimeoutError():
                message = f"openai did not answer in time ({self._client.base_url}); try again or check its status"
            case openai.APIConnectionError():
                message = f"openai could not be reached at {self._client.base_url}: {detail}"
            case _:
                message = f"openai stream for {model!r} failed: {detail}"
        return LLMError(message, provider="openai")


_T = TypeVar("_T")


def _present(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else "" if value is None else str(value)


def _message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, Mapping) and isinstance(body.get("message"), str) and body["message"]:
        return str(body["message"])
    cause = exc.__cause__
    if isinstance(exc, openai.APIConnectionError) and cause is not None:
        return f"{exc.message} ({type(cause).__name__}: {cause})"
    return exc.message


def _scrubbed(text: str, api_key: str) -> str:
    return text.replace(api_key, "***") if api_key else text


def _assistant_calls(text: str | None, calls: Sequence[_FunctionCall]) -> ChatCompletionAssistantMessageParam:
    tool_calls: list[ChatCompletionMessageFunctionToolCallParam] = [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]
    return {"role": "assistant", "content": text, "tool_calls": tool_calls}


def _tool_result(call: _FunctionCall, result: str) -> ChatCompletionToolMessageParam:
    return {"role": "tool", "tool_call_id": call.id, "content": result}


async def _chunks(response: httpx2.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON object of each server-sent event of a streamed completion, up to `[DONE]`.

    Events as the SSE format defines them: the `data:` lines up to a blank line, joined by newlines (other
    fields, such as `event:`, carry nothing a chat completion needs). After `[DONE]` the rest of the body is
    read, briefly, so that HTTP/1.1 can reuse the connection.
    """
    data: list[bytes] = []
    lines = _lines(response.aiter_bytes())
    async for line in lines:
        if line:
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            continue
        if not data:
            continue
        text = data[0] if len(data) == 1 else b"\n".join(data)
        data.clear()
        if text == b"[DONE]":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                    async for _ in lines:
                        pass
            return
        try:
            chunk = json.loads(text)
        except ValueError:
            raise LLMError(f"openai sent a stream chunk that is not JSON: {text[:80]!r}", provider="openai") from None
        if not isinstance(chunk, dict):
            raise LLMError(f"openai sent a stream chunk that is not a JSON object: {text[:80]!r}", provider="openai")
        yield chunk


async def _lines(pieces: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The lines of a byte stream, without their ends: "\\r\\n", "\\n" or "\\r", as SSE allows.

    Split as bytes: the text decoding and line splitting of httpx's `aiter_lines` cost more than the events'
    JSON; json.loads reads UTF-8 bytes itself.
    """
    pending = b""
    after_cr = False  # the last piece ended with "\\r": a "\\n" starting the next one ends no further line
    async for arrived in pieces:
        piece = arrived[1:] if after_cr and arrived.startswith(b"\n") else arrived
        after_cr = piece.endswith(b"\r")
        if not piece:
            continue
        pending += piece
        lines = pending.splitlines()
        pending = b"" if pending.endswith((b"\n", b"\r")) else lines.pop()
        for line in lines:
            yield line
    if pending:
        yield pending
