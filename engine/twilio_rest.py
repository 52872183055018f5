"""Twilio's REST API through the twilio package's async client: hanging up and transferring (later, placing) calls."""

from __future__ import annotations

import logging

from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from config.settings import Settings

log = logging.getLogger(__name__)


class TwilioCalls:
    """Call control for one Twilio account; the API root is a setting (regional proxies, tests)."""

    def __init__(self, account_sid: str, auth_token: str, *, api_base: str = "https://api.twilio.com") -> None:
        """Create the async client; nothing is sent until a call is controlled."""
        self._http = AsyncTwilioHttpClient(timeout=10)
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

    async def hang_up(self, call_sid: str) -> bool:
        """Ask Twilio to end a call; False (logged) if Twilio refused or could not be reached."""
        return await self._update(call_sid, "hang up", status="completed")

    async def transfer(self, call_sid: str, to: str, *, caller_id: str | None = None) -> bool:
        """Cold-transfer a call: Twilio leaves our media stream and dials `to`; False (logged) if it refused."""
        twiml = VoiceResponse()
        dial = twiml.dial(caller_id=caller_id) if caller_id else twiml.dial()
        dial.number(to)
        return await self._update(call_sid, "transfer", twiml=str(twiml))

    async def _update(self, call_sid: str, action: str, **changes: str) -> bool:
        try:
            await self._client.calls(call_sid).update_async(**changes)
        except TwilioRestException as exc:
            log.warning("Twilio refused to %s %s: %s %s", action, call_sid, exc.status, exc.msg)
            return False
        except (OSError, TimeoutError) as exc:
            log.warning("could not reach Twilio to %s %s: %s", action, call_sid, exc)
            return False
        return True

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._http.close()
