"""Transfers the organization pays for: the dialed leg's credits are reserved before Twilio dials it, and the leg
cannot outlast them.

The leg's longest length is the agent's `transfer.maxMinutes`, or fewer minutes when the balance pays for fewer;
Twilio is told it as the `<Dial>`'s time limit, and its action request (`engine.twilio.webhooks.handle_dial_ended`)
settles the leg when the dial ends. A transfer the balance cannot pay one minute of is not made: the call goes on
with the agent, as for any transfer Twilio refuses. Nor is one to a number the organization's dial policy does not
dial (storage.dial_policies, against toll fraud: premium-rate and the like), the rule every call it pays for obeys,
whatever the agent's transfer destinations list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from config.phone import InvalidPhoneNumber, e164
from engine.twilio.rest import CallUnconfirmed, TwilioCalls
from storage import Pool, dial_policies, transfer_legs
from storage.errors import DATABASE_ERRORS
from storage.organizations import InsufficientCredits

log = logging.getLogger(__name__)


class PaidTransfer:
    """Transfers of one call (`engine.call.twilio_control.Transfer`): reserve the leg, then ask Twilio to dial it."""

    def __init__(
        self,
        pool: Pool,
        twilio: TwilioCalls,
        *,
        organization_id: str,
        call_log_id: str,
        max_minutes: int,
        rates: Mapping[str, int],
        action_url: str,
    ) -> None:
        """Transfer the call `call_log_id` for at most `max_minutes` at its credit rate (else `rates` by plan);
        Twilio POSTs the dial's end to `action_url`."""
        self._pool = pool
        self._twilio = twilio
        self._organization_id = organization_id
        self._call_log_id = call_log_id
        self._max_minutes = max_minutes
        self._rates = rates
        self._action_url = action_url

    async def __call__(self, call_sid: str, to: str) -> bool | None:
        """Hand the caller to `to`; False (logged) when the dial policy, the credits or Twilio do not allow it, with
        nothing reserved; None when Twilio did not answer, with the leg reserved until Twilio's record settles it."""
        try:
            policy = await dial_policies.get_policy(self._pool, organization_id=self._organization_id)
        except DATABASE_ERRORS as exc:
            log.warning("call %s: no transfer: the organization's dial policy could not be read: %s", call_sid, exc)
            return False
        try:
            refusal = policy.refusal(e164(to))
        except InvalidPhoneNumber as exc:
            refusal = str(exc)
        if refusal is not None:
            log.warning("call %s: no transfer: %s", call_sid, refusal)
            return False
        try:
            leg = await transfer_legs.open_leg(
                self._pool,
                organization_id=self._organization_id,
                call_log_id=self._call_log_id,
                to=to,
                max_minutes=self._max_minutes,
                rates=self._rates,
            )
        except InsufficientCredits as exc:
            log.warning("call %s: no transfer: %s", call_sid, exc)
            return False
        except DATABASE_ERRORS as exc:
            log.warning("call %s: no transfer: its credits could not be reserved: %s", call_sid, exc)
            return False
        try:
            transferred = await self._twilio.transfer(
                call_sid, to, time_limit_seconds=leg.time_limit_seconds, action=self._action_url
            )
        except CallUnconfirmed as exc:
            # Twilio may be dialing: the leg stays reserved, and its action request (or the sweep) settles it.
            log.warning("call %s: transfer to %s unconfirmed: %s", call_sid, to, exc)
            return None
        if not transferred:
            await self.release(call_sid)
        return transferred

    async def release(self, call_sid: str) -> None:
        """Return the credits of the call's open leg, which Twilio did not dial: its request failed, or went
        unanswered and Twilio's record shows no dialed call (another transfer may then be made); a failure is logged."""
        try:
            await transfer_legs.release_leg(self._pool, call_log_id=self._call_log_id)
        except DATABASE_ERRORS as exc:  # the settlement sweep finds no dialed call for the leg, and charges nothing
            log.warning("call %s: the reserved transfer credits are returned later: %s", call_sid, exc)
