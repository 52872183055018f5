"""A call's controls through Twilio's REST API: hang it up, or hand the caller to a number the agent may transfer to.

Either way Twilio then sends the stream's `stop`; the call waits a little for it (never forever). Without Twilio
credentials there is no REST API: a hang-up closes the stream instead, and transfers cannot be made. A transfer
request Twilio did not answer in time may still be carried out: its record of the calls the `<Dial>` made tells.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from config.agent import TransferConfig
from engine.call.driver import HANGUP_GRACE_SECONDS, ControlRefused
from engine.twilio.rest import CallLookupFailed
from pipelines.conversation.transfer_rules import Refusal, TransferRules

log = logging.getLogger(__name__)

UNANSWERED_TRANSFER_WAIT_SECONDS = 5.0
"""How long Twilio's record is asked again about a transfer request it did not answer in time, before the call is told
that the transfer's fate is unknown; and, once Twilio has left the stream, while the record shows no dial yet."""
DIALED_LOOKUP_INTERVAL_SECONDS = 1.0
"""How often Twilio's record is asked meanwhile."""
DIALED_LOOKUP_RETRY_SECONDS = 30.0
"""How long the end of a call with such a transfer keeps asking Twilio's record whether it was made, while the record
cannot be read, before the call ends without knowing."""

HangUp = Callable[[str], Awaitable[bool]]
"""Hang up a call by its CallSid through Twilio's REST API; False when that could not be done."""
Transfer = Callable[[str, str], Awaitable[bool | None]]
"""Transfer a call (CallSid) to an E.164 number through Twilio's REST API; False when that failed, None when Twilio
did not answer the request (it may be dialing)."""
Release = Callable[[str], Awaitable[None]]
"""Return the credits held for a call's (CallSid) transfer that Twilio did not dial."""
Dialed = Callable[[str], Awaitable[Sequence[object]]]
"""The calls Twilio's record shows a call's (CallSid) `<Dial>` made; raises CallLookupFailed when it cannot say."""


async def await_twilio_stop(ended: asyncio.Event) -> None:
    """After a hang-up or transfer through Twilio's REST API, wait a little (never forever) for its `stop`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended.wait(), timeout=HANGUP_GRACE_SECONDS)


class TwilioRefused(ControlRefused):
    """Twilio's REST API did not carry out a control asked from outside the call; the call goes on."""


class TwilioUnanswered(TwilioRefused):
    """Twilio's REST API did not answer a control asked from outside the call in time: it may still carry it out."""


class TwilioControl:
    """Hang-up and transfer of one call through Twilio's REST API, when the engine has credentials for it."""

    def __init__(
        self,
        call_sid: str,
        *,
        hang_up: HangUp | None,
        transfer: Transfer | None,
        rules: TransferConfig | None,
        dialed: Dialed | None = None,
        release: Release | None = None,
    ) -> None:
        """Control the call `call_sid`; `rules` are the agent's transfer destinations; `dialed` reads Twilio's record
        of the calls a transfer made; `release` returns the credits of a transfer Twilio did not dial."""
        self._call_sid = call_sid
        self._hang_up = hang_up
        self._transfer = transfer
        self._rules = rules
        self._dialed = dialed
        self._release = release

    @property
    def can_transfer(self) -> bool:
        """Whether there is a REST API to transfer the call with."""
        return self._transfer is not None

    async def hang_up(self) -> bool:
        """Ask Twilio to end the call; False when there is no REST API or it failed (closing the stream ends it)."""
        if self._hang_up is None:
            return False
        try:
            return await self._hang_up(self._call_sid)
        except Exception as exc:
            log.warning("call %s: hanging up through Twilio failed: %s", self._call_sid, exc)
            return False

    async def transfer(self, to: str) -> bool | None:
        """Ask Twilio to hand the caller to `to`; False when that cannot or may not be done (the call goes on), None
        when Twilio did not answer the request (it may be dialing: `dialed` tells)."""
        if self._transfer is None:
            return False
        # The model's `transfer_call` is checked before it gets here (the refusal is the model's function result);
        # a path's transfer node, the API's transfers and anything else are checked here, so that none skips them.
        verdict = TransferRules.from_config(self._rules).check(to)
        if isinstance(verdict, Refusal):
            log.warning(
                "call %s: no transfer: the agent's transfer rules refuse it: %s", self._call_sid, verdict.message
            )
            return False
        try:
            transferred = await self._transfer(self._call_sid, to)
        except Exception:
            log.exception("call %s: the transfer to %s failed", self._call_sid, to)
            return False
        if transferred is False:
            log.warning("call %s: transfer to %s failed", self._call_sid, to)
        return transferred

    async def dialed_within(self, seconds: float, gone: asyncio.Event) -> bool | None:
        """Whether Twilio carried out a transfer it did not answer for, its record asked again for up to `seconds`:
        True once the record shows the call its `<Dial>` made, None while it does not (or `gone` is set meanwhile:
        the call ended, and its end says how)."""
        if self._dialed is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not gone.is_set():
                    if await self.dialed():
                        return True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), DIALED_LOOKUP_INTERVAL_SECONDS)
        return None

    async def earlier_transfer_made(self) -> bool | None:
        """Before another transfer, whether Twilio made the one it did not answer for, by its record: True, False (its
        leg's credits are then returned, and another may be asked), or None when the record cannot say."""
        made = await self.dialed()
        if made is False and self._release is not None:
            await self._release(self._call_sid)
        return made

    async def dialed_known(self) -> bool | None:
        """Whether Twilio's record shows a call a transfer's `<Dial>` made, asked again while it cannot be read (for
        up to DIALED_LOOKUP_RETRY_SECONDS); None when it could not be read."""
        if self._dialed is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DIALED_LOOKUP_RETRY_SECONDS):
                while True:
                    made = await self.dialed()
                    if made is not None:
                        return made
                    await asyncio.sleep(DIALED_LOOKUP_INTERVAL_SECONDS)
        return None

    async def dialed_after_stop(self, gone: asyncio.Event) -> bool | None:
        """Whether Twilio's record shows a call a transfer's `<Dial>` made, once Twilio has left the stream: as
        `dialed_known`, and while it shows none, asked again for up to UNANSWERED_TRANSFER_WAIT_SECONDS (until `gone`
        is set), since the record may not show the `<Dial>` yet as the stream's `stop` comes."""
        made = await self.dialed_known()
        if made is False and await self.dialed_within(UNANSWERED_TRANSFER_WAIT_SECONDS, gone):
            return True
        return made

    async def dialed(self) -> bool | None:
        """Whether Twilio's record shows a call a transfer's `<Dial>` made; None when it cannot be asked."""
        if self._dialed is None:
            return None
        try:
            return bool(await self._dialed(self._call_sid))
        except CallLookupFailed as exc:
            log.warning("call %s: whether Twilio made the transfer is unknown: %s", self._call_sid, exc)
            return None
