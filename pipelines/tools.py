"""Functions an agent's model may call: the built-in call controls and the organization's webhook Tools.

Built-ins act on the call itself (`end_call`, `transfer_call`, `send_dtmf`, `opt_out`); the session carries them out.
An organization's Tool becomes a function when its configuration has a `function` (name, description, JSON
schema of the arguments) and a `webhook` to POST the arguments to; the webhook's reply goes back to the model.
A Tool without `function` only holds credentials (`apiKey`) for `api_key_ref: "tool:<id>"`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config.text import storable_text
from media.dtmf import DIGITS_PATTERN
from pipelines.conversation.confirmation import turn_confirmed
from pipelines.errors import ProviderError
from pipelines.http_bodies import decoded, read_at_most
from pipelines.url_safety import UnsafeURL, ensure_public_url

log = logging.getLogger(__name__)

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
SEND_DTMF = "send_dtmf"
OPT_OUT = "opt_out"
OPT_OUT_CONFIRMATION = "You won't be called again. Goodbye."
"""What the callee hears once an opt-out is recorded, before the call ends."""
DTMF_SENT = "sent"
"""The `send_dtmf` result the model gets once its keypresses are queued into the call."""
CALL_ENDS = "done: the call ends once the last words are heard"
"""What an `end_call` does, as its tool.call event tells it (the model gets no result: its reply is over)."""
OPT_OUT_DONE = "done: the number is on the do-not-call list; the call ends now"
"""The `opt_out` result: the callee is listed, hears the confirmation, and the call ends."""


def transferring(number: str) -> str:
    """What a `transfer_call` the rules allow does, as its tool.call event tells it."""
    return f"done: the call is transferred to {number} once the last words are heard"


MAX_RESULT_CHARS = 4000
TOOL_ERROR_PREFIX = "error: "
"""How a function's result that reports a failure to the model starts."""


def transfer_failed(number: str) -> str:
    """What a started `transfer_call` came to when Twilio did not carry it out (the call goes on), as a second
    tool.call event of it tells it."""
    return f"{TOOL_ERROR_PREFIX}the transfer to {number} did not go through; the call goes on"


def transfer_unconfirmed(number: str) -> str:
    """What a started `transfer_call` came to when Twilio neither answered the request in time nor shows the call it
    dialed: it may still go through (the caller then leaves this call), and meanwhile the call goes on."""
    return (
        f"{TOOL_ERROR_PREFIX}the transfer to {number} is unconfirmed: Twilio did not answer in time and may still "
        "make it, handing the caller over; meanwhile the call goes on"
    )


def transfer_not_done(number: str, made: bool | None) -> str:
    """What a started transfer that did not take the caller came to, in every driver's words to the model: failed
    (`made` False: Twilio did not carry it out) or unconfirmed (None: it may still go through)."""
    return transfer_failed(number) if made is False else transfer_unconfirmed(number)


ToolCallObserver = Callable[[str, Mapping[str, Any], str], None]
"""Told of each function call: its name, its arguments and the result the model gets."""


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """A function as the model sees it."""

    name: str
    description: str
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


BUILTIN_FUNCTIONS: tuple[FunctionSpec, ...] = (
    FunctionSpec(
        END_CALL,
        "Hang up the call once your last words have been heard. Use it when the conversation is over.",
        {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Why the call ends, in a few words."}},
            "required": ["reason"],
        },
    ),
    FunctionSpec(
        TRANSFER_CALL,
        "Transfer the caller to a person at another phone number (a cold transfer); the call with you ends.",
        {
            "type": "object",
            "properties": {
                "phone_number": {
                    "type": "string",
                    "description": "The number to transfer to, in E.164 (+15551234567).",
                },
                "reason": {"type": "string", "description": "Why the caller is transferred."},
            },
            "required": ["phone_number"],
        },
    ),
    FunctionSpec(
        SEND_DTMF,
        "Press keys on the phone keypad, e.g. to navigate a phone menu. Digits 0-9, * and #; w waits half a second.",
        {
            "type": "object",
            "properties": {"digits": {"type": "string", "pattern": DIGITS_PATTERN}},
            "required": ["digits"],
        },
    ),
    FunctionSpec(
        OPT_OUT,
        "The callee asks not to be called again (stop calling, take me off your list, unsubscribe): their number "
        "goes on the do-not-call list, they hear a short confirmation and the call ends. Say nothing more yourself.",
        {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "What the callee asked, in a few words."}},
        },
    ),
)
BUILTIN_NAMES = frozenset(spec.name for spec in BUILTIN_FUNCTIONS)


class ToolConfigurationError(ProviderError, ValueError, stage="tools"):
    """A Tool's configuration cannot be used as a function."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _FunctionPart(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, parameters: dict[str, Any]) -> dict[str, Any]:
        # OpenAI refuses a request whose function's parameters are not a JSON Schema of an object, and so every
        # reply of the call's model: refused where the Tool is saved, and named where a call reads it.
        if parameters.get("type") != "object":
            raise ValueError('must be a JSON Schema of an object ({"type": "object", "properties": {...}})')
        problem = _schema_problem(json.dumps(parameters, sort_keys=True))
        if problem is not None:
            raise ValueError(problem)
        return parameters


@functools.lru_cache(maxsize=1024)
def _schema_problem(schema: str) -> str | None:
    """Why the JSON text `schema` is not a JSON Schema, or None. Kept by its text: every call reads its agent's Tools
    (checked against the metaschema, about 0.4 ms each), and a Tool's schema rarely changes."""
    try:
        Draft202012Validator.check_schema(json.loads(schema))
    except SchemaError as exc:
        at = "/".join(map(str, exc.path))
        return f"is not a JSON Schema: {exc.message}{f' (at {at})' if at else ''}"
    return None


class _WebhookPart(_Strict):
    url: str = Field(pattern=r"^https?://")
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(10.0, gt=0, le=60, alias="timeoutSeconds")


@dataclass(frozen=True, slots=True)
class AgentFunction:
    """An organization's Tool exposed to the model: its spec and the webhook that answers it."""

    tool_id: str
    spec: FunctionSpec
    url: str
    method: str
    headers: Mapping[str, str]
    timeout_seconds: float


class InvalidToolFunction(ValueError):
    """A Tool's `function` or `webhook` no call could use; `problems` are (field in the configuration, message)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))
        self.problems = list(problems)


def tool_function(tool_id: str, configuration: Mapping[str, Any]) -> AgentFunction | None:
    """The function a Tool's configuration defines; None for a Tool without `function` (credentials only).

    One check for the API saving a Tool and for a call reading it: InvalidToolFunction for one no call could use.
    """
    if "function" not in configuration:
        return None
    problems: list[tuple[str, str]] = []
    function = _part(_FunctionPart, configuration, "function", problems)
    webhook = _part(_WebhookPart, configuration, "webhook", problems)
    if function is None or webhook is None:
        raise InvalidToolFunction(problems)
    if function.name in BUILTIN_NAMES:
        raise InvalidToolFunction([("function.name", f"{function.name!r} is a built-in function")])
    return AgentFunction(
        tool_id=tool_id,
        spec=FunctionSpec(function.name, function.description, function.parameters),
        url=webhook.url,
        method=webhook.method,
        headers=webhook.headers,
        timeout_seconds=webhook.timeout_seconds,
    )


_Part = TypeVar("_Part", bound=_Strict)


def _part(
    model: type[_Part], configuration: Mapping[str, Any], key: str, problems: list[tuple[str, str]]
) -> _Part | None:
    """`configuration[key]` read as `model`; None, with its problems added (fields from the configuration), if it
    cannot be."""
    try:
        return model.model_validate(configuration.get(key))
    except ValidationError as exc:
        problems += [(".".join(map(str, (key, *e["loc"]))), e["msg"]) for e in exc.errors(include_url=False)]
        return None


def agent_functions(tools: Sequence[Any]) -> list[AgentFunction]:
    """The functions among an agent's Tools (rows with `id`, `name` and `configuration`).

    Tools without a `function` are skipped; a malformed one raises ToolConfigurationError naming the Tool.
    """
    functions: list[AgentFunction] = []
    for tool in tools:
        configuration = tool.configuration if tool.configuration is not None else {}
        if not isinstance(configuration, Mapping):
            raise ToolConfigurationError(f"tool {tool.name!r} ({tool.id}): its configuration is not a JSON object")
        try:
            function = tool_function(tool.id, configuration)
        except InvalidToolFunction as exc:
            raise ToolConfigurationError(f"tool {tool.name!r} ({tool.id}): {exc}") from None
        if function is not None:
            functions.append(function)
    return functions


def chat_tools(specs: Sequence[FunctionSpec]) -> list[dict[str, Any]]:
    """Function specs in Chat Completions' `tools` shape."""
    return [
        {
            "type": "function",
            "function": {"name": s.name, "description": s.description, "parameters": dict(s.parameters)},
        }
        for s in specs
    ]


def realtime_tools(specs: Sequence[FunctionSpec]) -> list[dict[str, Any]]:
    """Function specs in the Realtime session's `tools` shape."""
    return [
        {"type": "function", "name": s.name, "description": s.description, "parameters": dict(s.parameters)}
        for s in specs
    ]


class LocalFunction(Protocol):
    """A function the engine answers itself (e.g. `search_knowledge_base`) rather than a Tool's webhook."""

    @property
    def spec(self) -> FunctionSpec:
        """The function as the model sees it."""
        ...

    async def run(self, arguments: Mapping[str, Any]) -> str:
        """The function's result as text for the model; failures as text too, never exceptions."""
        ...


class ToolRunner:
    """Runs one call's agent functions: POSTs the arguments to the Tool's webhook and returns its reply as text.

    Failures come back as text the model can act on ("error: ..."), never as exceptions: a broken CRM must not
    end the call.
    """

    def __init__(
        self,
        functions: Sequence[AgentFunction],
        *,
        call: Mapping[str, Any],
        session: aiohttp.ClientSession,
        allow_private: bool = False,
        local: Sequence[LocalFunction] = (),
        observe: ToolCallObserver | None = None,
    ) -> None:
        """Serve `functions` over `session` (the engine's, shared by calls); `call` (the call's ids) goes with each.

        `local` functions are answered in the engine (knowledge-base search) and come first. `observe` is told of
        every call and its result (the call's live events).
        """
        self._observe = observe
        self._local = {f.spec.name: f for f in local}
        self._functions = {f.spec.name: f for f in functions if f.spec.name not in self._local}
        self._call = dict(call)
        self._allow_private = allow_private
        self._session = session
        self._cut: list[tuple[str, dict[str, Any], asyncio.Future[str]]] = []
        """Webhooks sent by a reply that was cut before they answered (see `cut_short`)."""

    @property
    def specs(self) -> list[FunctionSpec]:
        """The agent's function specs (without the built-ins)."""
        return [*(f.spec for f in self._local.values()), *(f.spec for f in self._functions.values())]

    async def run(self, name: str, arguments: Mapping[str, Any]) -> str:
        """Call function `name` with `arguments`; return the webhook's reply (or an error) as text.

        A webhook once sent is seen through even when the reply that called it is cut (the caller spoke again): it
        may already have acted, so its answer is kept for `cut_short`, and told like any other.
        """
        local = self._local.get(name)
        if local is not None:
            return self._told(name, arguments, await local.run(arguments))
        function = self._functions.get(name)
        if function is None:
            return self._told(name, arguments, f"{TOOL_ERROR_PREFIX}there is no function named {name!r}")
        await turn_confirmed()  # a speculative reply's webhook waits for the caller's turn (and dies with the reply)
        sent = asyncio.ensure_future(self._webhook(function, name, arguments))
        try:
            return await asyncio.shield(sent)
        except asyncio.CancelledError:
            self._cut.append((name, dict(arguments), sent))
            raise

    async def cut_short(self) -> list[tuple[str, dict[str, Any], str]]:
        """The functions (name, arguments, result) whose webhook was sent by a reply cut before it answered, once
        they have answered; each is given once. The model is to hear what they did, or it would ask again."""
        cut, self._cut = self._cut, []
        return [(name, arguments, await sent) for name, arguments, sent in cut]

    async def _webhook(self, function: AgentFunction, name: str, arguments: Mapping[str, Any]) -> str:
        return self._told(name, arguments, await self._post(function, name, arguments))

    def _told(self, name: str, arguments: Mapping[str, Any], result: str) -> str:
        if self._observe is not None:
            self._observe(name, arguments, result)
        return result

    async def carried_out(self, name: str, arguments: Mapping[str, Any], result: str) -> None:
        """A built-in function (`end_call`, `transfer_call`, `send_dtmf`, `opt_out`) the call carries out itself, with
        what it did: told like the agent's own functions, once the caller's turn is confirmed (a speculative reply
        thrown away never tells it)."""
        await turn_confirmed()
        if self._observe is not None:
            self._observe(name, arguments, result)

    async def _post(self, function: AgentFunction, name: str, arguments: Mapping[str, Any]) -> str:
        try:
            await ensure_public_url(function.url, allow_private=self._allow_private)
            async with self._session.request(
                function.method,
                function.url,
                json={"function": name, "arguments": dict(arguments), "call": self._call},
                headers=dict(function.headers),
                allow_redirects=False,  # a redirect could lead to an address nobody checked
                timeout=aiohttp.ClientTimeout(total=function.timeout_seconds),
            ) as response:
                body = await _reply_text(response)
                if response.status >= 300:
                    log.warning("tool %s answered HTTP %d", function.tool_id, response.status)
                    return f"{TOOL_ERROR_PREFIX}the {name} service answered HTTP {response.status}: {body[:500]}"
                return body
        except UnsafeURL as exc:
            log.warning("tool %s refused: %s", function.tool_id, exc)
            return f"{TOOL_ERROR_PREFIX}the {name} service address is not allowed"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("tool %s failed: %s", function.tool_id, type(exc).__name__)
            return f"{TOOL_ERROR_PREFIX}the {name} service could not be reached ({type(exc).__name__})"
        except ValueError as exc:  # a host name aiohttp cannot encode ("crm..example.com"), private addresses allowed
            log.warning("tool %s: its webhook URL cannot be used: %s", function.tool_id, exc)
            return f"{TOOL_ERROR_PREFIX}the {name} service address is not a valid URL"


async def _reply_text(response: aiohttp.ClientResponse) -> str:
    """The start of a webhook's reply, as much as the model is given (MAX_RESULT_CHARS).

    Only that much is read, so a huge body is never held in memory; bytes its charset cannot decode become U+FFFD,
    since a webhook answering garbage must not end the call.
    """
    raw = await read_at_most(response, MAX_RESULT_CHARS * 4)  # the most bytes MAX_RESULT_CHARS characters take
    return decoded(raw, response.charset)[:MAX_RESULT_CHARS]


def parse_arguments(raw: str) -> dict[str, Any]:
    """A function call's JSON arguments as a dict; invalid JSON (models do emit it) gives an empty dict.

    Every string in it is `storable_text`: an escape such as "\\ud83d" (half an emoji) reads as a lone surrogate,
    which a path's variables, the stored call and the model's next request could not carry.
    """
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {}
    return _storable(value) if isinstance(value, dict) else {}


def unreadable_arguments(name: str, raw: str, parsed: Mapping[str, Any]) -> str | None:
    """The result the model gets when it calls an agent function (not a built-in, which reads what it can) with
    arguments that are not a JSON object, for it to call again: they never reach a webhook as `{}`. None when `raw`
    was one (`parsed` being what `parse_arguments` made of it)."""
    if parsed or re.sub(r"\s", "", raw) in {"", "{}"}:  # parse_arguments gives {} for "{}" and for what is not JSON
        return None
    return f"{TOOL_ERROR_PREFIX}the arguments were not a JSON object; call {name} again"


def _storable(value: Any) -> Any:
    """A parsed JSON value with every string in it (keys too) `storable_text`."""
    match value:
        case str():
            return storable_text(value)
        case dict():
            return {storable_text(key): _storable(item) for key, item in value.items()}
        case list():
            return [_storable(item) for item in value]
        case _:
            return value
