"""One simulated inbound call, from the signed voice webhook through the media stream to the hang-up."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from urllib.parse import urljoin, urlsplit

import aiohttp

from engine.simulator.peer import StreamPeer, run_stream
from engine.simulator.results import CallEnding, CallResult, SimEvent, SimulationError
from engine.simulator.script import Step
from engine.simulator.twiml import Twiml, parse_twiml, resolve_stream_url
from engine.twilio.signature import request_signature

__all__ = ["simulate_call"]


def _new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


async def simulate_call(
    base_url: str,
    *,
    to: str,
    from_: str,
    script: Sequence[Step],
    auth_token: str | None = None,
    public_url: str | None = None,
    timeout_s: float = 120.0,
    reply_timeout_s: float = 10.0,
    on_event: Callable[[SimEvent], None] | None = None,
) -> CallResult:
    """Place one inbound call on the engine at `base_url` as Twilio would, run `script`, and report what happened.

    `public_url` is the address the engine believes Twilio reaches it at (it signs the webhook); default `base_url`.
    A turn waits up to `reply_timeout_s` for the agent to start replying; the whole call is cut at `timeout_s`.
    """
    started = time.monotonic()
    result = CallResult(call_sid=_new_sid("CA"), account_sid=_new_sid("AC"), stream_sid=_new_sid("MZ"))

    def log(who: str, text: str) -> None:
        event = SimEvent(time.monotonic() - started, who, text)
        result.events.append(event)
        if on_event is not None:
            on_event(event)

    base = base_url.rstrip("/")
    signed_base = (public_url or base_url).rstrip("/")
    params = {
        "CallSid": result.call_sid,
        "AccountSid": result.account_sid,
        "From": from_,
        "To": to,
        "Caller": from_,
        "Called": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as http:
        twiml = await _post_webhook(
            http,
            result=result,
            url=f"{base}/twilio/voice",
            signed_url=f"{signed_base}/twilio/voice",
            params=params,
            auth_token=auth_token,
        )
        log("call", f"{from_} calls {to}: webhook answered {result.webhook_status}")
        if twiml.refusal is not None:
            result.refusal = twiml.refusal
            result.ending = CallEnding.REFUSED
            log("call", f"refused: {twiml.refusal!r}")
            return result
        assert twiml.stream_url is not None
        result.stream_url = twiml.stream_url
        result.custom_parameters = twiml.parameters
        if not twiml.stream_url.startswith("wss://"):
            log("call", f"note: {twiml.stream_url} is not wss:// (Twilio would refuse it, error 31922)")
        headers = {}
        if auth_token:
            signed_stream = resolve_stream_url(urlsplit(twiml.stream_url).path, f"{signed_base}/twilio/voice")
            headers["X-Twilio-Signature"] = request_signature(auth_token, signed_stream, {})
        try:
            ws = await http.ws_connect(twiml.stream_url, headers=headers, autoping=True, heartbeat=None)
        except aiohttp.ClientError as exc:
            raise SimulationError(f"{twiml.stream_url}: the media WebSocket refused the handshake ({exc})") from exc
        async with ws:
            call = StreamPeer(ws, result, started, on_event, reply_timeout_s)
            await run_stream(call, script, timeout_s - (time.monotonic() - started))
        result.close_code = ws.close_code
        if result.ending is CallEnding.ENGINE_CLOSED and twiml.action:
            await _post_action(
                http,
                url=urljoin(f"{base}/twilio/voice", twiml.action),
                signed_url=urljoin(f"{signed_base}/twilio/voice", twiml.action),
                params=params,
                auth_token=auth_token,
                log=log,
            )
    return result


async def _post_webhook(
    http: aiohttp.ClientSession,
    *,
    result: CallResult,
    url: str,
    signed_url: str,
    params: dict[str, str],
    auth_token: str | None,
) -> Twiml:
    headers = {"X-Twilio-Signature": request_signature(auth_token, signed_url, params)} if auth_token else {}
    try:
        async with http.post(url, data=params, headers=headers) as response:
            result.webhook_status = response.status
            result.twiml = await response.text()
    except aiohttp.ClientError as exc:
        raise SimulationError(f"{url}: could not reach the engine's voice webhook ({exc})") from exc
    if result.webhook_status != 200:
        raise SimulationError(f"{url}: the voice webhook answered HTTP {result.webhook_status}: {result.twiml[:200]!r}")
    return parse_twiml(result.twiml, url)


async def _post_action(
    http: aiohttp.ClientSession,
    *,
    url: str,
    signed_url: str,
    params: dict[str, str],
    auth_token: str | None,
    log: Callable[[str, str], None],
) -> None:
    # After <Connect> ends because the server closed the stream, Twilio requests the action URL for more TwiML.
    fields = {**params, "CallStatus": "in-progress"}
    headers = {"X-Twilio-Signature": request_signature(auth_token, signed_url, fields)} if auth_token else {}
    try:
        async with http.post(url, data=fields, headers=headers) as response:
            log("call", f"<Connect action> {url} answered {response.status}")
    except aiohttp.ClientError as exc:
        log("error", f"<Connect action> {url} failed: {exc}")
