"""The engine's TwiML answer as Twilio reads it: where to stream (with its Parameters), or a refusal."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

from engine.simulator.results import SimulationError

__all__ = ["Twiml", "parse_twiml", "resolve_stream_url"]


@dataclass(frozen=True, slots=True)
class Twiml:
    """A voice webhook's answer: the stream to open and its Parameters and action, or why the call was refused."""

    stream_url: str | None
    parameters: dict[str, str]
    action: str | None
    refusal: str | None


def parse_twiml(text: str, webhook_url: str) -> Twiml:
    """Read TwiML answered to `webhook_url`; SimulationError for anything Twilio could not act on."""
    try:
        root = ET.fromstring(text)  # noqa: S314 - the engine under test wrote it; a hostile engine is out of scope
    except ET.ParseError as exc:
        raise SimulationError(
            f"the voice webhook answered something that is not TwiML ({exc}): {text[:200]!r}"
        ) from exc
    if root.tag != "Response":
        raise SimulationError(f"the voice webhook answered <{root.tag}>, expected <Response>: {text[:200]!r}")
    stream = root.find("./Connect/Stream")
    if stream is not None and stream.get("url"):
        connect = root.find("./Connect")
        parameters = {
            str(p.get("name")): str(p.get("value", "")) for p in stream.findall("./Parameter") if p.get("name")
        }
        action = connect.get("action") if connect is not None else None
        return Twiml(resolve_stream_url(str(stream.get("url")), webhook_url), parameters, action, None)
    if root.find("./Hangup") is not None or root.find("./Reject") is not None or root.find("./Say") is not None:
        said = " ".join((say.text or "").strip() for say in root.findall("./Say")).strip()
        return Twiml(None, {}, None, said or "(hung up without a word)")
    raise SimulationError(f"the voice webhook's TwiML has no <Connect><Stream url=…> and no <Hangup/>: {text[:200]!r}")


def resolve_stream_url(url: str, webhook_url: str) -> str:
    """The WebSocket URL Twilio opens for a `<Stream url>` given in answer to `webhook_url`."""
    # Relative URLs resolve against the webhook, as Twilio does; the query is dropped, as Twilio does.
    absolute = urljoin(webhook_url, url)
    parts = urlsplit(absolute)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))
