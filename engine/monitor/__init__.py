"""The monitor page at /monitor: calls in progress and recent calls, in the browser, over the /v1 API.

Plain HTML, CSS and JavaScript modules under `static/`, served as they are (no build step); the page signs in with
an API key kept in the tab's sessionStorage and sends it as `Authorization: Bearer` (the listen WebSocket offers it
as a subprotocol), never in a URL.
"""
