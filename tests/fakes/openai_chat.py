"""A local OpenAI Chat Completions server that streams scripted replies in OpenAI's exact SSE chunk shapes, and
answers /v1/embeddings with deterministic vectors (tests.fakes.embeddings).

async with FakeOpenAI(api_key="sk-test") as fake:
    fake.replies.append(["Let me check.", ToolCall("lookup", {"id": 7})])
    fake.replies.append("You are booked for Tuesday.")
    client = AsyncOpenAI(api_key="sk-test", base_url=fake.base_url, max_retries=0)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from tests.fakes.embeddings import hashed_embedding
from tests.fakes.server import serve

__all__ = ["DEFAULT_REPLY", "FakeOpenAI", "Reply", "Step", "ToolCall", "token_deltas"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A step of a reply: the model calls function `name` (arguments as a dict, or raw text, even invalid JSON)."""

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)


Step = str | ToolCall
"""Text the model says (streamed as small token-like deltas), or a function call."""
Reply = str | Sequence[Step]
"""One completion: a text, or steps in order."""

DEFAULT_REPLY = "Sure, I can help with that."

_TOKENS = re.compile(r"\s*[\w']+|\s*[^\w\s']+|\s+")
_ARGUMENT_FRAGMENT = 8
_TOO_LONG = (
    "This model's maximum context length is 8192 tokens, however you requested 9120 tokens (9120 in your prompt; "
    "0 for the completion). Please reduce your prompt; or completion length."
)
"""The real API's message when an embedding input is past the model's token limit (HTTP 400)."""
_QUOTA_EXCEEDED = (
    "You exceeded your current quota, please check your plan and billing details. For more information on this "
    "error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
"""The real API's message when the key's account has no quota left (HTTP 429, code insufficient_quota)."""
_EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}


def token_deltas(text: str) -> list[str]:
    """`text` cut the way a model streams it: a word or punctuation mark each, with its leading space."""
    return _TOKENS.findall(text)


class FakeOpenAI:
    """`POST /v1/chat/completions` on 127.0.0.1: answers from a FIFO of scripted replies, records every request.

    Controls: `replies` (FIFO of `Reply`; when empty, `default_reply`, a reply or a function of the last user
    message), `fail_next` (answer that many next requests with HTTP 500), `error_mid_stream` (while true, streams
    send an error event after their first delta), `break_mid_stream` (while true, streams drop the connection after
    their first delta), `first_token_delay_ms` and `token_interval_ms` (pacing), `eof_delay_ms` (between `[DONE]`
    and the end of the body).
    Observations: `requests` (every request body, in order), `peers` (the client address of each request, so
    connection reuse shows), `aborted_streams` (how many streams the client walked away from) and `stream_aborted`
    (set at the first).

    Requests in JSON mode (`response_format: json_object`, as post-call analysis sends) are a separate kind, as
    they would be on a real server: recorded in `json_requests` and answered from `json_replies` (a FIFO of
    JSON texts; when empty, `default_json_reply`, after `json_delay_ms`), so an analysis that runs after one call
    never takes a conversation reply scripted for the next. With `json_trickle_ms`, their answers are sent one byte
    at a time, that long apart: a model that keeps every read short and the whole answer long.

    `POST /v1/embeddings` answers every input with `hashed_embedding` (the request's `dimensions`, else the
    model's), as floats or base64 as asked. Controls: `embedding_failures` (a FIFO of HTTP statuses, e.g. 429 or
    500, the next embedding requests get instead), `embedding_refused_marker` (a request with an input containing
    it is refused with 400, as the real API refuses an input past the model's token limit, whatever else the
    batch holds), `embedding_quota_exhausted` (every request answered 429 `insufficient_quota`, as the real API
    answers a key whose account has no quota left), `embedding_delay_ms`. Observations: `embedding_requests`.
    """

    def __init__(
        self,
        *,
        api_key: str = "sk-test",
        default_reply: Reply | Callable[[str], Reply] = DEFAULT_REPLY,
        first_token_delay_ms: float = 0,
        token_interval_ms: float = 0,
    ) -> None:
        """Accept `Authorization: Bearer <api_key>` only; pace deltas by the given delays."""
        self.api_key = api_key
        self.default_reply = default_reply
        self.first_token_delay_ms = first_token_delay_ms
        self.token_interval_ms = token_interval_ms
        self.replies: deque[Reply] = deque()
        self.requests: list[dict[str, Any]] = []
        self.json_replies: deque[str] = deque()
        self.json_requests: list[dict[str, Any]] = []
        self.default_json_reply = json.dumps({"summary": "", "success": True, "reason": "The fake judged it."})
        self.json_delay_ms: float = 0
        self.json_trickle_ms: float = 0
        self.fail_next = 0
        self.error_mid_stream = False
        self.break_mid_stream = False
        self.eof_delay_ms: float = 0
        self.peers: list[tuple[str, int]] = []
        self.embedding_requests: list[dict[str, Any]] = []
        self.embedding_failures: deque[int] = deque()
        self.embedding_refused_marker: str | None = None
        self.embedding_quota_exhausted = False
        self.embedding_delay_ms: float = 0
        self.aborted_streams = 0
        self.stream_aborted = asyncio.Event()
        self.base_url = ""
        self._ids = itertools.count(1)
        self._exit_stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self.base_url = await self._exit_stack.enter_async_context(serve(app)) + "/v1"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._exit_stack.aclose()

    # ------------------------------------------------------------------------------------------- the route

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        json_mode = isinstance(body, dict) and (body.get("response_format") or {}).get("type") == "json_object"
        (self.json_requests if json_mode else self.requests).append(body)
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else ("", 0))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return _error(
                401,
                f"Incorrect API key provided: {_masked(given)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(
                500, "The server had an error while processing your request. Sorry about that!", "server_error"
            )
        if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("messages"), list):
            return _error(400, "'model' and 'messages' are required properties.", "invalid_request_error")
        if json_mode:
            await _sleep_ms(self.json_delay_ms)
            steps: list[Step] = [self.json_replies.popleft() if self.json_replies else self.default_json_reply]
        else:
            steps = self._next_reply(body["messages"])
        if body.get("stream"):
            return await self._stream(request, body, steps)
        if json_mode and self.json_trickle_ms:
            return await self._trickle(request, json.dumps(self._completion(body, steps)).encode())
        return web.json_response(self._completion(body, steps))

    async def _trickle(self, request: web.Request, answer: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(answer)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gave up waiting
            for at in range(len(answer)):
                await response.write(answer[at : at + 1])
                await _sleep_ms(self.json_trickle_ms)
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.embedding_requests.append(body)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        await _sleep_ms(self.embedding_delay_ms)
        if self.embedding_quota_exhausted:
            return _error(429, _QUOTA_EXCEEDED, "insufficient_quota", "insufficient_quota")
        if self.embedding_failures:
            status = self.embedding_failures.popleft()
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            return _error(status, f"The fake answered {status}, as told.", kind)
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) and text for text in texts):
            return _error(400, "'input' must be a non-empty string or array of strings.", "invalid_request_error")
        marker = self.embedding_refused_marker
        if marker is not None and any(marker in text for text in texts):
            return _error(400, _TOO_LONG, "invalid_request_error")
        dimensions = int(body.get("dimensions") or _EMBEDDING_DIMENSIONS.get(str(body.get("model")), 1536))
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = hashed_embedding(text, dimensions)
            encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(text.split()) for text in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": body.get("model"), "usage": usage})

    def _next_reply(self, messages: Sequence[Mapping[str, Any]]) -> list[Step]:
        if self.replies:
            reply = self.replies.popleft()
        elif callable(self.default_reply):
            reply = self.default_reply(_last_user_text(messages))
        else:
            reply = self.default_reply
        return [reply] if isinstance(reply, str) else list(reply)

    async def _stream(self, request: web.Request, body: Mapping[str, Any], steps: Sequence[Step]) -> web.StreamResponse:
        completion_id = f"chatcmpl-{next(self._ids)}"
        model = str(body["model"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(data: Mapping[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await response.write(f"data: {text}\n\n".encode())

        def chunk(delta: Mapping[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}
            return _chunk_envelope(completion_id, model) | {"choices": [choice]}

        deltas = self._deltas(steps)
        try:
            await send(chunk({"role": "assistant", "content": "", "refusal": None}))
            await _sleep_ms(self.first_token_delay_ms)
            for number, delta in enumerate(deltas):
                if number:
                    await _sleep_ms(self.token_interval_ms)
                await send(chunk(delta))
                if self.error_mid_stream:
                    await send({"error": _error_body("The model stopped unexpectedly.", "server_error")})
                    await response.write_eof()
                    return response
                if self.break_mid_stream and request.transport is not None:
                    request.transport.abort()
                    return response
            finish = "tool_calls" if any(isinstance(step, ToolCall) for step in steps) else "stop"
            await send(chunk({}, finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                await send(_chunk_envelope(completion_id, model) | {"choices": [], "usage": _usage(body, deltas)})
            await send("[DONE]")
            await _sleep_ms(self.eof_delay_ms)
            await response.write_eof()
        except ConnectionResetError:
            self.aborted_streams += 1
            self.stream_aborted.set()
        return response

    def _deltas(self, steps: Sequence[Step]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        tool_index = 0
        for step in steps:
            if isinstance(step, str):
                deltas.extend({"content": token} for token in token_deltas(step))
                continue
            arguments = step.arguments if isinstance(step.arguments, str) else json.dumps(step.arguments)
            first = {
                "index": tool_index,
                "id": f"call_{next(self._ids)}",
                "type": "function",
                "function": {"name": step.name, "arguments": ""},
            }
            deltas.append({"tool_calls": [first]})
            for start in range(0, len(arguments), _ARGUMENT_FRAGMENT):
                fragment = arguments[start : start + _ARGUMENT_FRAGMENT]
                deltas.append({"tool_calls": [{"index": tool_index, "function": {"arguments": fragment}}]})
            tool_index += 1
        return deltas

    def _completion(self, body: Mapping[str, Any], steps: Sequence[Step]) -> dict[str, Any]:
        # The non-streaming shape, for callers that do not ask for `stream: true`.
        text = "".join(step for step in steps if isinstance(step, str))
        calls = [
            {
                "id": f"call_{next(self._ids)}",
                "type": "function",
                "function": {
                    "name": step.name,
                    "arguments": step.arguments if isinstance(step.arguments, str) else json.dumps(step.arguments),
                },
            }
            for step in steps
            if isinstance(step, ToolCall)
        ]
        message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls" if calls else "stop"}
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": 1,
            "model": str(body["model"]),
            "choices": [choice],
            "usage": _usage(body, token_deltas(text)),
        }


def _chunk_envelope(completion_id: str, model: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": None,
    }


def _usage(body: Mapping[str, Any], completion: Sequence[Any]) -> dict[str, int]:
    # Words stand in for tokens: enough for tests that check usage is summed.
    prompt = sum(len(str(message.get("content") or "").split()) + 4 for message in body.get("messages", []))
    return {"prompt_tokens": prompt, "completion_tokens": len(completion), "total_tokens": prompt + len(completion)}


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _masked(key: str) -> str:
    return f"{key[:3]}***{key[-2:]}" if len(key) > 8 else "***"


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": None, "code": code}


def _error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": _error_body(message, kind, code)}, status=status)


async def _sleep_ms(milliseconds: float) -> None:
    if milliseconds > 0:
        await asyncio.sleep(milliseconds / 1000)
