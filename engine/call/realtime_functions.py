"""The functions a speech-to-speech model calls in a call: end it, transfer it, press keys, opt the callee out, or
the organization's webhooks (Tools). Each output goes back to the model once the response that called it is done;
an ending waits until the agent's last words were heard.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from engine.call.driver import CallHost
from engine.call.phases import CallPhase, PhaseEvent, accepts
from engine.call.realtime_path import RealtimePath
from engine.call.realtime_voice import ModelResponse, ModelVoice
from media.dtmf import DIGITS_HELP, InvalidDigits, dtmf_audio
from pipelines.conversation.transfer_rules import Refusal, TransferRules, builtin_functions
from pipelines.paths.prompts import FOLLOW_PATH
from pipelines.realtime.openai_realtime import FunctionCall, RealtimeChannel
from pipelines.tools import (
    CALL_ENDS,
    DTMF_SENT,
    END_CALL,
    OPT_OUT,
    OPT_OUT_CONFIRMATION,
    OPT_OUT_DONE,
    SEND_DTMF,
    TRANSFER_CALL,
    FunctionSpec,
    ToolRunner,
    parse_arguments,
    transfer_not_done,
    transferring,
    unreadable_arguments,
)
from storage.do_not_call import DoNotCallSource
from storage.end_reasons import EndReason

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
"""Run part of the driver's work as a task of the call."""


def short(value: object, limit: int = 200) -> str:
    """A model-given argument as one line of at most `limit` characters."""
    return " ".join(str(value or "").split())[:limit]


def _constant(text: str) -> Callable[[], Awaitable[str]]:
    async def result() -> str:
        return text

    return result


class ModelFunctions:
    """Runs the model's function calls for one call, and answers them."""

    def __init__(
        self,
        host: CallHost,
        voice: ModelVoice,
        *,
        channel: Callable[[], RealtimeChannel | None],
        answer: Callable[[float | None], Awaitable[None]],
        spawn: Spawn,
        spawn_ending: Spawn,
        on_idle: Callable[[], None],
        tools: ToolRunner | None,
        can_transfer: bool,
        say: Callable[[str], Awaitable[None]],
        path: RealtimePath | None = None,
    ) -> None:
        """Act in `host`'s call; `answer(reply_to)` asks the model to go on after the outputs were given, `say(text)`
        has it say `text` word for word. An ending runs through `spawn_ending`: once decided, it outlives a lost
        connection.

        With `path`, `follow_path` moves the call along its conversation path."""
        self._host = host
        self._voice = voice
        self._channel = channel
        self._answer_with = answer
        self._spawn = spawn
        self._spawn_ending = spawn_ending
        self._on_idle = on_idle
        self._tools = tools
        self._can_transfer = can_transfer
        self._say = say
        self._transfer_rules = TransferRules.from_config(host.config.transfer)
        self._seen: set[str] = set()
        self._path = path
        if path is not None:
            path.press_keys = self._press_keys
        self._quiet: set[str] = set()
        """Responses after whose function outputs the model should not speak (the path said what is to be said)."""
        self.answering = 0
        """Responses whose function outputs are still being worked out."""
        self.ending: asyncio.Task[None] | None = None

    def builtins(self) -> list[FunctionSpec]:
        """The built-in functions the model is offered: `transfer_call` only where the line and the agent allow it."""
        return [
            spec for spec in builtin_functions(self._transfer_rules) if spec.name != TRANSFER_CALL or self._can_transfer
        ]

    async def called(self, call: FunctionCall) -> None:
        """The model called a function (each call is acted on once, however often it is reported)."""
        if call.call_id in self._seen:
            return
        self._seen.add(call.call_id)
        response = self._voice.response(call.response_id)
        if response.cancelled:
            log.info("call %s: %s from a cut-off response ignored", self._host.context.call_sid, call.name)
            return
        arguments = parse_arguments(call.arguments)
        log.info("call %s: the model calls %s", self._host.context.call_sid, call.name)
        carried_out = self._built_in(response, call, arguments)
        if carried_out is not None:
            if self._tools is not None:  # the call's live events hear of it (the ToolRunner tells them)
                await self._tools.carried_out(call.name, arguments, carried_out)
        elif call.name == FOLLOW_PATH and self._path is not None:
            self._owe(response, call.call_id, functools.partial(self._follow, response, arguments))
        elif (unreadable := unreadable_arguments(call.name, call.arguments, arguments)) is not None:
            self._owe(response, call.call_id, _constant(unreadable))
        elif self._tools is None:
            self._owe(response, call.call_id, _constant(f"error: there is no function named {call.name!r}"))
        else:
            tools, name = self._tools, call.name
            self._owe(response, call.call_id, lambda: tools.run(name, arguments))

    def _built_in(self, response: ModelResponse, call: FunctionCall, arguments: dict[str, Any]) -> str | None:
        """Carry out a built-in function (end, transfer, keys, opt-out); what it did, or None for any other."""
        if call.name == END_CALL:
            self._end_after_speaking(response, short(arguments.get("reason")) or None)
            return CALL_ENDS
        if call.name == TRANSFER_CALL:
            result, refused = self._transfer_or_refuse(response, call.call_id, arguments)
            if refused:
                self._owe(response, call.call_id, _constant(result))
            return result
        if call.name == OPT_OUT:
            self._opt_out(response, call.call_id, short(arguments.get("reason")))
            return OPT_OUT_DONE
        if call.name == SEND_DTMF:
            result = self._press_keys(short(arguments.get("digits"), 64).replace(" ", ""))
            self._owe(response, call.call_id, _constant(result))
            return result
        return None

    def _owe(self, response: ModelResponse, call_id: str, output: Callable[[], Awaitable[str]]) -> None:
        """Remember a function output to give the model once its response is done (the first schedules the answer)."""
        response.outputs.append((call_id, output))
        if len(response.outputs) == 1:
            self.answering += 1
            self._spawn(self._answer(response), "function")

    async def _answer(self, response: ModelResponse) -> None:
        """Once the response is done (all its calls known), run its functions, give the results, and continue."""
        try:
            await response.done.wait()
            outputs = await asyncio.gather(*(run() for _, run in response.outputs))
            channel = self._channel()
            if channel is None:
                return
            for (call_id, _), output in zip(response.outputs, outputs, strict=True):
                await channel.send_function_output(call_id, output)
            if response.response_id in self._quiet:
                return
            if response.cancelled or self.ending is not None or self._host.phase is not CallPhase.RESPONDING:
                return  # the caller took the floor, or the call is ending: no reply of the model's own
            # A response that only called functions hands its caller's turn on to the one that answers.
            await self._answer_with(None if response.spoke else response.reply_to)
        finally:
            self.answering -= 1
            self._on_idle()

    async def _follow(self, response: ModelResponse, arguments: dict[str, Any]) -> str:
        """Move along the path; after a node that said its own words, the model does not add to them."""
        assert self._path is not None
        result, model_speaks = await self._path.follow(arguments)
        if not model_speaks:
            self._quiet.add(response.response_id)
        return result

    def _press_keys(self, digits: str) -> str:
        """Play touch tones as agent audio; the model's result."""
        try:
            tones = dtmf_audio(digits)
        except InvalidDigits as exc:
            return f"error: {exc}; {DIGITS_HELP}"
        self._voice.tones(digits, tones)
        if accepts(self._host.phase, PhaseEvent.REPLY):
            self._host.move(PhaseEvent.REPLY)
        return DTMF_SENT

    def _opt_out(self, response: ModelResponse, call_id: str, reason: str) -> None:
        """List the callee, confirm it in fixed words once the model's own have played, and end the call."""
        if self.ending is not None or not accepts(self._host.phase, PhaseEvent.WIND_DOWN):
            return
        self._host.move(PhaseEvent.WIND_DOWN)
        # The ending is set before the output is owed, so giving the output asks the model for nothing more.
        self.ending = self._spawn_ending(
            self._opt_out_then_end(response, reason or "the callee asked not to be called"), "ending"
        )
        self._owe(response, call_id, _constant(OPT_OUT_DONE))

    async def _opt_out_then_end(self, response: ModelResponse, reason: str) -> None:
        await self._voice.finished(response)
        await self._host.record_opt_out(DoNotCallSource.OPT_OUT_MODEL, reason)
        await self._say(OPT_OUT_CONFIRMATION)
        await self._host.hang_up(EndReason.AGENT_HANGUP, f"opted out: {reason}")

    def _transfer_or_refuse(self, response: ModelResponse, call_id: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Start a transfer once the agent's words have played; what was done, and whether it was refused (the
        result then tells the model why)."""
        given = short(arguments.get("phone_number"), 40)
        if not self._can_transfer:
            return "error: this line cannot transfer calls; tell the caller and offer to help otherwise", True
        verdict = self._transfer_rules.check(given)
        if isinstance(verdict, Refusal):
            log.warning("call %s: a transfer to %r refused: %s", self._host.context.call_sid, given, verdict.message)
            return verdict.message, True
        reason = short(arguments.get("reason")) or None
        self._end_after_speaking(response, reason, transfer_to=verdict.number, call_id=call_id, asked=arguments)
        return transferring(verdict.number), False

    def _end_after_speaking(
        self,
        response: ModelResponse,
        detail: str | None,
        *,
        transfer_to: str | None = None,
        call_id: str = "",
        asked: Mapping[str, Any] | None = None,
    ) -> None:
        if self.ending is not None or not accepts(self._host.phase, PhaseEvent.WIND_DOWN):
            return
        if transfer_to is None:
            self._host.move(PhaseEvent.WIND_DOWN)  # no barge-in on the last words; a transfer may still fail
        ending = self._finish_then_end(response, detail, transfer_to=transfer_to, call_id=call_id, asked=asked)
        self.ending = self._spawn_ending(ending, "ending")

    async def _finish_then_end(
        self,
        response: ModelResponse,
        detail: str | None,
        *,
        transfer_to: str | None,
        call_id: str,
        asked: Mapping[str, Any] | None,
    ) -> None:
        await self._voice.finished(response)
        if transfer_to is None:
            await self._host.hang_up(EndReason.AGENT_HANGUP, detail)
            return
        made = await self._host.transfer(transfer_to, detail, asked=asked)
        if made:
            return
        self.ending = None
        channel = self._channel()
        if channel is not None:
            await channel.send_function_output(call_id, f"{transfer_not_done(transfer_to, made)}; tell the caller")
            await channel.create_response()
