"""Twilio's REST API through the twilio package's async client: placing, finding, hanging up, transferring calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus

import aiohttp
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.rest.api.v2010.account.call import CallInstance
from twilio.twiml.voice_response import VoiceResponse

from config.settings import Settings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 10
"""How long a request to Twilio may take before the client gives up on it."""
OUTBOUND_API = "outbound-api"
"""The direction of a call created through the REST API, as `place_call` creates every call."""


class CallRefused(Exception):
    """Twilio did not place a call: its error code and message, or why it could not be reached (code None)."""

    def __init__(self, code: int | None, message: str, status: int | None = None) -> None:
        super().__init__(f"Twilio error {code}: {message}" if code is not None else message)
        self.code = code
        self.message = message
        self.status = status


class CallUnconfirmed(Exception):
    """Twilio did not answer a create request it may have received (a time-out, a dropped connection): whether the
    call exists only Twilio knows, and its status callbacks or Calls list will tell."""


class CallLookupFailed(Exception):
    """Twilio could not be asked which calls exist (unreachable, or it answered with an error): nothing is known."""


@dataclass(frozen=True, slots=True)
class TwilioCall:
    """A call as Twilio's Calls list shows it."""

    sid: str
    to: str
    from_: str
    status: str
    created_at: datetime
    direction: str
    """`OUTBOUND_API` for a call created through the API, `inbound`, `outbound-dial` for a `<Dial>`'s."""


@dataclass(frozen=True, slots=True)
class DialedCall:
    """A call a `<Dial>` made: its status (`completed` once it has ended) and its length in seconds (0 until then)."""

    sid: str
    status: str
    duration_seconds: int


def _refusal(exc: TwilioException) -> str:
    """What Twilio answered to a refused request, its status and message when it said them."""
    if isinstance(exc, TwilioRestException):
        return f"{exc.status} {exc.msg}"
    return " ".join(str(arg) for arg in exc.args)


def _twilio_call(call: CallInstance) -> TwilioCall:
    return TwilioCall(
        sid=call.sid,
        to=call.to,
        from_=call._from,
        status=str(call.status),
        created_at=call.date_created,
        direction=str(call.direction),
    )


def _seconds(duration: str | None) -> int:
    """Twilio's `duration` of a call: whole seconds as a string, None until it ends."""
    return int(duration) if duration and duration.isdigit() else 0


@dataclass(frozen=True, slots=True)
class MachineDetection:
    """Answering-machine detection for one call: Twilio's mode, and where its verdict is POSTed (async AMD)."""

    mode: str
    """`Enable` (a verdict as soon as the answer is known) or `DetectMessageEnd` (after the greeting's beep)."""
    callback_url: str
    timeout_seconds: int = 30


class TwilioCalls:
    """Call control for one Twilio account; the API root is a setting (regional proxies, tests)."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        api_base: str = "https://api.twilio.com",
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        """Create the async client (each request given up after `timeout` s); nothing is sent until a call is
        controlled."""
        # The SDK's async client keeps its `timeout` but never applies it (aiohttp's 5-minute default would): every
        # request here is bounded by asyncio.timeout instead.
        self._http = AsyncTwilioHttpClient()
        self._timeout = timeout
        self._client = Client(account_sid, auth_token, http_client=self._http)
        self._client.api.base_url = api_base.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioCalls | None:
        """A client when the settings hold Twilio credentials, else None (calls then end by closing the stream)."""
        if not settings.twilio_account_sid or settings.twilio_auth_token is None:
            return None
        return cls(
            settings.twilio_account_sid,
            settings.twilio_auth_token.get_secret_value(),
            api_base=settings.twilio_api_base,
        )

    async def place_call(
        self,
        *,
        to: str,
        from_: str,
        twiml: str,
        status_callback: str,
        status_events: Sequence[str],
        ring_timeout_seconds: int,
        machine_detection: MachineDetection | None = None,
    ) -> str:
        """Ask Twilio to dial `to` from `from_` and run `twiml` once answered; return the new CallSid.

        Raises CallRefused with Twilio's error code and message, or (code None) when Twilio could not be reached;
        CallUnconfirmed when the request was sent but not answered (the call may exist).
        """
        options: dict[str, object] = {}
        if machine_detection is not None:
            options = {
                "machine_detection": machine_detection.mode,
                "machine_detection_timeout": machine_detection.timeout_seconds,
                "async_amd": "true",
                "async_amd_status_callback": machine_detection.callback_url,
                "async_amd_status_callback_method": "POST",
            }
        try:
            call = await asyncio.wait_for(
                self._client.calls.create_async(
                    to=to,
                    from_=from_,
                    twiml=twiml,
                    status_callback=status_callback,
                    status_callback_event=list(status_events),
                    status_callback_method="POST",
                    timeout=ring_timeout_seconds,
                    **options,
                ),
                self._timeout,
            )
        except TwilioRestException as exc:
            raise CallRefused(exc.code, str(exc.msg), exc.status) from None
        except aiohttp.ClientConnectorError as exc:  # no connection: the request never left
            raise CallRefused(None, f"could not reach Twilio: {exc}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:  # sent, but no answer: it may have arrived
            raise CallUnconfirmed(f"Twilio did not answer the request to create the call: {exc!r}") from None
        sid: str = call.sid
        return sid

    async def calls_between(self, *, to: str, from_: str, limit: int = 50) -> list[TwilioCall]:
        """The most recent calls (up to `limit`) Twilio created to `to` from `from_`, whatever their status.

        Listed by `To` and `From` only: a call still queued has no start time yet, so the start-time filters
        would miss it; callers filter on `created_at`. Raises CallLookupFailed when Twilio cannot answer.
        """
        found = await self._list_calls(limit, to=to, from_=from_)
        return [_twilio_call(call) for call in found if call.sid and isinstance(call.date_created, datetime)]

    async def fetch_call(self, call_sid: str) -> TwilioCall | None:
        """The call as Twilio holds it for this account; None when this account has no such call.

        Raises CallLookupFailed when Twilio cannot answer.
        """
        try:
            call = await asyncio.wait_for(self._client.calls(call_sid).fetch_async(), self._timeout)
        except TwilioException as exc:
            if isinstance(exc, TwilioRestException) and exc.status == HTTPStatus.NOT_FOUND:
                return None
            raise CallLookupFailed(f"Twilio refused to look call {call_sid} up: {_refusal(exc)}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise CallLookupFailed(f"could not reach Twilio to look call {call_sid} up: {exc}") from None
        return _twilio_call(call)

    async def run_twiml(self, call_sid: str, twiml: str, *, action: str) -> bool:
        """Replace what a live call does with `twiml` (e.g. a message, then `<Hangup/>`); False (logged) if refused."""
        return await self._update(call_sid, action, twiml=twiml)

    async def hang_up(self, call_sid: str) -> bool:
        """Ask Twilio to end a call; False (logged) if Twilio refused or could not be reached."""
        return await self._update(call_sid, "hang up", status="completed")

    async def cancel(self, call_sid: str) -> bool:
        """Ask Twilio to stop a call that is queued or ringing (one answered meanwhile goes on: Twilio leaves it);
        False (logged) if Twilio refused or could not be reached."""
        return await self._update(call_sid, "cancel", status="canceled")

    async def transfer(
        self,
        call_sid: str,
        to: str,
        *,
        time_limit_seconds: int,
        action: str,
        caller_id: str | None = None,
    ) -> bool:
        """Cold-transfer a call: Twilio leaves our media stream and dials `to` for at most `time_limit_seconds`,
        then POSTs how the dial went to `action`; False (logged) if it refused or could not be reached.

        Raises CallUnconfirmed when the request was sent but not answered: Twilio may be dialing.
        """
        twiml = VoiceResponse()
        dial = twiml.dial(time_limit=time_limit_seconds, action=action, method="POST", caller_id=caller_id)
        dial.number(to)
        return await self._update(call_sid, "transfer", unconfirmed_raises=True, twiml=str(twiml))

    async def dialed_calls(self, parent_call_sid: str) -> list[DialedCall]:
        """The calls a `<Dial>` of the call `parent_call_sid` made, with how each ended and how long it ran.

        Raises CallLookupFailed when Twilio cannot answer.
        """
        found = await self._list_calls(20, parent_call_sid=parent_call_sid)
        return [
            DialedCall(sid=call.sid, status=str(call.status), duration_seconds=_seconds(call.duration))
            for call in found
            if call.sid
        ]

    async def _update(self, call_sid: str, action: str, *, unconfirmed_raises: bool = False, **changes: str) -> bool:
        """Change a live call; False (logged) if Twilio refused or could not be reached. A request sent but not
        answered is False too, or CallUnconfirmed with `unconfirmed_raises` (its caller must not assume either way)."""
        try:
            await asyncio.wait_for(self._client.calls(call_sid).update_async(**changes), self._timeout)
        except TwilioRestException as exc:
            log.warning("Twilio refused to %s %s: %s %s", action, call_sid, exc.status, exc.msg)
            return False
        except aiohttp.ClientConnectorError as exc:  # no connection: the request never left
            log.warning("could not reach Twilio to %s %s: %s", action, call_sid, exc)
            return False
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:  # sent, but no answer: it may have arrived
            if unconfirmed_raises:
                raise CallUnconfirmed(f"Twilio did not answer the request to {action} the call: {exc!r}") from None
            log.warning("Twilio did not answer the request to %s %s: %r", action, call_sid, exc)
            return False
        return True

    async def _list_calls(self, limit: int, **filters: str) -> list[CallInstance]:
        """Twilio's Calls list by `filters` (up to `limit`); CallLookupFailed when Twilio cannot answer."""
        try:
            return await asyncio.wait_for(
                self._client.calls.list_async(**filters, limit=limit, page_size=limit), self._timeout
            )
        except TwilioException as exc:  # a page Twilio would not give is a TwilioException, not a TwilioRestException
            raise CallLookupFailed(f"Twilio refused the call lookup: {_refusal(exc)}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise CallLookupFailed(f"could not reach Twilio to look calls up: {exc}") from None

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._http.close()
