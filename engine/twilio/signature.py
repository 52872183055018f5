"""X-Twilio-Signature checks, on the URL Twilio used (rebuilt from the public URL behind a proxy)."""

from __future__ import annotations

import logging

from aiohttp import web
from multidict import MultiDict, MultiDictProxy
from twilio.request_validator import RequestValidator

from config.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
"""How Twilio posts its webhooks' parameters, in UTF-8."""


def request_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """The X-Twilio-Signature Twilio sends for a request to `url` with form `params` (the simulator signs with it)."""
    signature: str = RequestValidator(auth_token).compute_signature(url, params)
    return signature


def public_request_url(request: web.Request, settings: Settings) -> str:
    """The URL Twilio requested: the configured public URL plus path and query, else the URL as received."""
    if settings.public_url:
        return settings.public_url + request.rel_url.path_qs
    return str(request.url)


def public_base_url(request: web.Request, settings: Settings) -> str:
    """Where Twilio reaches this engine: the configured public URL, else scheme and host as received."""
    if settings.public_url:
        return settings.public_url
    return f"{request.scheme}://{request.host}"


def signature_is_valid(
    request: web.Request, settings: Settings, params: MultiDictProxy[str] | dict[str, str] | None = None
) -> bool:
    """Whether the request carries Twilio's signature for its URL and form parameters.

    With no auth token configured there is nothing to check against, and every request passes (the engine
    logs that at start). A WebSocket upgrade is signed over its URL with no parameters; Twilio's docs do
    not say whether that URL is the wss:// or the https:// form, so both are accepted.
    """
    token = settings.twilio_auth_token
    if token is None:
        return True
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        return False
    validator = RequestValidator(token.get_secret_value())
    url = public_request_url(request, settings)
    candidates = [url]
    if url.startswith("https://"):
        candidates.append("wss://" + url.removeprefix("https://"))
    elif url.startswith("http://"):
        candidates.append("ws://" + url.removeprefix("http://"))
    return any(validator.validate(candidate, params or {}, signature) for candidate in candidates)


async def signed_form(request: web.Request, settings: Settings) -> MultiDictProxy[str]:
    """A webhook's parameters once Twilio's signature on them checks out.

    403 when the signature does not match. A body that is not the UTF-8 form Twilio sends has its signature checked
    on the URL alone, all that can be read of it, and is then a 400: never an error of ours.
    """
    form: MultiDict[str] | None = None
    if request.content_type in ("", FORM_CONTENT_TYPE):
        try:
            posted = await request.post()
        except ValueError:  # UnicodeDecodeError among them
            pass
        else:
            form = MultiDict((name, value) for name, value in posted.items() if isinstance(value, str))
    params = MultiDictProxy(form if form is not None else MultiDict[str]())
    if not signature_is_valid(request, settings, params):
        log.warning("%s with a bad Twilio signature from %s: refused", request.path, request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    if form is None:
        raise web.HTTPBadRequest(text=f"expected a UTF-8 {FORM_CONTENT_TYPE} body")
    return params
