"""The /monitor page in a real headless Chromium against the real engine: it signs in with an API key, shows a
simulated call's transcript as it grows, plays nothing until Listen is clicked, hangs the call up, and plays back a
finished call's recording; a VIEWER's key is shown every control it may not use switched off, with the engine's
reason, from sign-in; a wrong key reads as a clear error; a key signed in after another signed out on the same tab
neither sees nor acts on the first key's calls.

Set MONITOR_SCREENSHOTS to a folder to save the README's screenshots (monitor-live.png, monitor-recent.png) there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

from engine.simulator import CallEnding, CallResult, HangUp, Pause, Say
from storage import api_keys, call_logs, users
from storage.enums import CallStatus, CallType, UserRole, UserStatus
from storage.records import new_id
from tests.browser import headless_chromium, in_browser, missing_browser, until
from tests.engine_server import running_engine
from tests.test_api_auth import Api, Tenant, make_tenant
from tests.test_calls_e2e import TOKEN, call, call_log, make_line

if missing_browser() is not None and os.environ.get("DIALTONE_REQUIRE_BROWSER") == "1":  # CI (.ci/run) must run them
    pytest.fail(f"DIALTONE_REQUIRE_BROWSER=1 but {missing_browser()}", pytrace=False)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(missing_browser() is not None, reason=f"browser tests did not run: {missing_browser()}"),
]

AUDIO_SPY = """
window.__monitorAudio = { contexts: 0, plays: 0, sources: 0 };
for (const name of ["AudioContext", "webkitAudioContext"]) {
  const Original = window[name];
  if (!Original) continue;
  window[name] = class extends Original {
    constructor(...args) { super(...args); window.__monitorAudio.contexts += 1; }
  };
}
const play = HTMLMediaElement.prototype.play;
HTMLMediaElement.prototype.play = function (...args) {
  window.__monitorAudio.plays += 1;
  return play.apply(this, args);
};
const start = AudioBufferSourceNode.prototype.start;
AudioBufferSourceNode.prototype.start = function (...args) {
  window.__monitorAudio.sources += 1;
  return start.apply(this, args);
};
"""
"""Counts, from before the page's own scripts run, every AudioContext made and every sound started."""

SILENT = {"contexts": 0, "plays": 0, "sources": 0, "playing": False}
"""What `audio_counts` reads on a page that has made no sound and no AudioContext."""

SCREENSHOTS = os.environ.get("MONITOR_SCREENSHOTS")

CONTROLS = ("listen", "hangup", "say-text", "say-interrupt", "say-submit")
"""The elements of a live call's controls: Listen, Hang up, and Say's line, Interrupt box and button."""

READ_ONLY = "this API key's user is a VIEWER of the organization and can only read"
"""The engine's reason a VIEWER's key may not write (the 403 of any write)."""

LISTEN_REFUSAL = f"{READ_ONLY}: listening to a call needs an OWNER's or ADMIN's key"
"""The engine's reason a VIEWER's key may not listen (the listen endpoint's 403)."""

OFF_FOR_A_VIEWER = {name: {"enabled": False, "title": READ_ONLY} for name in CONTROLS} | {
    "listen": {"enabled": False, "title": LISTEN_REFUSAL}
}
"""How the controls read for a key that may use none of them: each off, with the engine's reason as its title."""

REFUSAL_NOTES = [f"Listen is off: {LISTEN_REFUSAL}.", f"Hang up and Say are off: {READ_ONLY}."]
"""What the page says beside the controls of a key that may use none of them."""


@pytest.fixture(scope="module")
async def engine(db_url: str) -> AsyncIterator[str]:
    async with running_engine(db_url, twilio_auth_token=TOKEN) as base:  # no Twilio account: hang-ups close the stream
        yield base


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[webdriver.Chrome]:
    chromium = headless_chromium()
    driver = await in_browser(chromium.__enter__)
    try:
        await in_browser(lambda: driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": AUDIO_SPY}))
        yield driver
    finally:
        await in_browser(lambda: chromium.__exit__(None, None, None))


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool) -> Tenant:
    return await make_tenant(pool, "Monitor", credits=1000)


async def open_monitor(driver: webdriver.Chrome, engine: str) -> None:
    """Load /monitor signed out (this tab's stored key forgotten)."""

    def load() -> None:
        driver.get(f"{engine}/monitor/static/monitor.css")  # the origin, without the page's scripts
        driver.execute_script("sessionStorage.clear()")
        driver.get(f"{engine}/monitor")

    await in_browser(load)
    await until(lambda: visible(driver, "signin"), timeout_s=20, what="the sign-in form")


async def sign_in(driver: webdriver.Chrome, engine: str, key: str) -> None:
    """Open the page and sign in with the key; returns once the calls in progress are shown."""
    await open_monitor(driver, engine)

    def submit() -> None:
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "signin-submit").click()

    await in_browser(submit)
    await until(lambda: visible(driver, "live-view"), timeout_s=10, what="the calls in progress")


def visible(driver: webdriver.Chrome, element_id: str) -> bool:
    """Whether the element with that id is displayed."""
    found = driver.find_elements(By.ID, element_id)
    return bool(found) and found[0].is_displayed()


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def controls(driver: webdriver.Chrome) -> dict[str, dict[str, Any]]:
    """Each control's element as shown: whether it is enabled and its title, read at one instant."""
    shown: dict[str, dict[str, Any]] = driver.execute_script(
        """return Object.fromEntries(arguments[0].map((id) => {
             const node = document.getElementById(id);
             return [id, { enabled: !node.disabled, title: node.title }];
           }))""",
        list(CONTROLS),
    )
    return shown


def refusal_notes(driver: webdriver.Chrome) -> list[str]:
    """The lines beside a live call's controls that say why some are off, as shown (none while it is hidden), read in
    one script (the page redraws them with the call)."""
    if not visible(driver, "control-refusals"):
        return []
    lines: list[str] = driver.execute_script(
        "return [...document.querySelectorAll('#control-refusals li')].map((line) => line.textContent)"
    )
    return lines


def requested_paths(driver: webdriver.Chrome) -> list[str]:
    """The paths of the requests the page's scripts have made and finished (fetch), from the browser's own record."""
    paths: list[str] = driver.execute_script(
        """return performance.getEntriesByType("resource")
             .filter((entry) => entry.initiatorType === "fetch")
             .map((entry) => new URL(entry.name).pathname)"""
    )
    return paths


def live_turns(driver: webdriver.Chrome) -> list[tuple[str, str]]:
    """The selected live call's finished turns as shown: (Caller|Agent, text), read at one instant."""
    return transcript(driver, "#live-transcript .turn:not(.interim):not(.speaking)")


def transcript(driver: webdriver.Chrome, selector: str) -> list[tuple[str, str]]:
    """The (speaker, text) of the turns `selector` finds, read in one script (the page redraws turns as they change)."""
    rows: list[list[str]] = driver.execute_script(
        """return [...document.querySelectorAll(arguments[0])].map((turn) => [
             turn.querySelector(".speaker").textContent, turn.querySelector(".turn-text").innerText])""",
        selector,
    )
    return [(speaker.title(), text) for speaker, text in rows]


def audio_counts(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page has done with sound so far, and whether any media element is playing now."""
    counts: dict[str, Any] = driver.execute_script(
        "return {...window.__monitorAudio,"
        " playing: [...document.querySelectorAll('audio, video')].some((media) => !media.paused)}"
    )
    return counts


def card_of(driver: webdriver.Chrome, list_id: str, call_log_id: str) -> WebElement | None:
    found = driver.find_elements(By.CSS_SELECTOR, f'#{list_id} .call-card[data-call-id="{call_log_id}"]')
    return found[0] if found else None


class CuttableProxy:
    """A loopback TCP relay to the engine whose open connections the test can cut, as a network break would."""

    def __init__(self, target: str) -> None:
        self.host, port = target.removeprefix("http://").split(":")
        self.port = int(port)
        self.connections: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.port)
        self.connections |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self.connections -= {writer, upstream_writer}

    def cut(self, *, refuse: bool) -> None:
        """Close every open connection; while `refuse`, close new ones at once too."""
        self.refusing = refuse
        for writer in list(self.connections):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut(refuse=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def confirm_hang_up(driver: webdriver.Chrome) -> None:
    """Press Hang up, then again to confirm."""
    for _ in range(2):
        driver.find_element(By.ID, "hangup").click()


async def first_live_call_id(pool: asyncpg.Pool, tenant: Tenant, task: asyncio.Task[Any]) -> str:
    """The id of the organization's call in progress, once its session holds the stream."""
    for _ in range(300):
        found = await pool.fetchval(
            """SELECT "id" FROM "CallLog" WHERE "organizationId" = $1 AND "status" = 'IN_PROGRESS'
               ORDER BY "timestamp" DESC LIMIT 1""",
            tenant.organization_id,
        )
        if found is not None:
            return str(found)
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    raise AssertionError("the simulated call never opened its CallLog")


async def silent_call_on_page(
    engine: str,
    browser: webdriver.Chrome,
    tenant: Tenant,
    pool: asyncpg.Pool,
    *,
    greeting: str,
    calls_to: str | None = None,
    key: str | None = None,
) -> tuple[asyncio.Task[CallResult], str]:
    """Sign in (with `key`, else the owner's), place a call (to `calls_to`, else `engine`) whose caller stays silent
    for a minute, and wait until the page shows the agent's greeting on it; the running call and its id."""
    number, _ = await make_line(pool, tenant.organization_id, firstSentence=greeting)
    await sign_in(browser, engine, key or tenant.owner_key)
    running = asyncio.create_task(call(calls_to or engine, number, Pause(60_000), timeout_s=90))
    call_log_id = await first_live_call_id(pool, tenant, running)
    await until(lambda: card_of(browser, "live-list", call_log_id), timeout_s=15, what="the call in progress")
    await until(lambda: live_turns(browser), timeout_s=30, what="the agent's greeting")
    return running, call_log_id


async def hang_up_as_owner(engine: str, tenant: Tenant, call_log_id: str, running: asyncio.Task[CallResult]) -> None:
    """End the call through the API with the OWNER's key (for a page whose key may not), and let it finish."""
    async with aiohttp.ClientSession() as session:
        status, _ = await Api(session, engine).call("POST", f"/live-calls/{call_log_id}/hangup", tenant.owner_key)
    assert status == 202
    await running


async def screenshot(driver: webdriver.Chrome, name: str) -> None:
    """Save the viewport as docs' screenshot `name` when MONITOR_SCREENSHOTS names a folder."""
    if SCREENSHOTS:
        path = Path(SCREENSHOTS) / name

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))

        await in_browser(save)


async def grows(observe: Callable[[], list[tuple[str, str]]], *, until_count: int, timeout_s: float) -> list[int]:
    """The distinct transcript lengths seen while waiting for at least `until_count` turns."""
    seen: list[int] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        count = len(await in_browser(observe))
        if not seen or seen[-1] != count:
            seen.append(count)
        if count >= until_count:
            return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"the transcript grew only through {seen} turns, not to {until_count}")


async def test_the_page_loads_and_signs_in_with_a_key(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    await sign_in(browser, engine, tenant.owner_key)
    org_name = await pool.fetchval('SELECT "name" FROM "Organization" WHERE "id" = $1', tenant.organization_id)
    assert await in_browser(lambda: text_of(browser, "org-name")) == org_name
    assert await until(lambda: visible(browser, "live-empty"), timeout_s=10, what="'No calls in progress'")
    url, stored = await in_browser(
        lambda: (browser.current_url, browser.execute_script("return Object.values(sessionStorage)"))
    )
    assert tenant.owner_key not in url
    assert stored == [tenant.owner_key]

    await in_browser(lambda: browser.find_element(By.ID, "sign-out").click())
    assert await until(lambda: visible(browser, "signin"), timeout_s=5, what="the sign-in form again")
    assert await in_browser(lambda: browser.execute_script("return sessionStorage.length")) == 0


async def test_a_wrong_key_shows_a_clear_error(engine: str, browser: webdriver.Chrome) -> None:
    await open_monitor(browser, engine)

    def submit() -> None:
        browser.find_element(By.ID, "key").send_keys("sk_live_not_a_key_of_anyone")
        browser.find_element(By.ID, "signin-submit").click()

    await in_browser(submit)
    message = await until(
        lambda: visible(browser, "signin-error") and text_of(browser, "signin-error"), timeout_s=10, what="an error"
    )
    assert message == "The API key was refused: the API key is not valid: unknown, revoked or expired."
    assert not await in_browser(lambda: visible(browser, "live-view"))
    assert await in_browser(lambda: browser.execute_script("return sessionStorage.length")) == 0


async def test_a_live_call_appears_and_its_transcript_grows_as_the_call_goes_on(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello, this is the front desk.")
    await sign_in(browser, engine, tenant.owner_key)
    running = asyncio.create_task(
        call(engine, number, Say("I would like to book an appointment"), Say("tuesday please"), timeout_s=90)
    )
    call_log_id = await first_live_call_id(pool, tenant, running)
    await until(lambda: card_of(browser, "live-list", call_log_id), timeout_s=15, what="the call in progress")
    assert await in_browser(lambda: text_of(browser, "stream-status")) == "Live"  # the event stream, not polling
    lengths = await grows(lambda: live_turns(browser), until_count=3, timeout_s=60)
    assert lengths[0] < lengths[-1], lengths
    shown = await in_browser(lambda: live_turns(browser))
    assert shown[0][0] == "Agent" and shown[0][1].startswith("Hello, this is the front desk.")
    assert "Caller" in {speaker for speaker, _ in shown}
    await screenshot(browser, "monitor-live.png")

    result = await running
    log = await call_log(pool, result)
    stored = await pool.fetch(
        'SELECT "speaker", "text" FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index"', call_log_id
    )
    assert log["id"] == call_log_id
    await until(
        lambda: visible(browser, "live-state") and "Ended" in text_of(browser, "live-state"),
        timeout_s=15,
        what="the call as ended",
    )
    assert await in_browser(lambda: live_turns(browser)) == [(row["speaker"].title(), row["text"]) for row in stored]


async def test_nothing_plays_and_no_audio_context_exists_until_listen_is_clicked(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    running, _ = await silent_call_on_page(engine, browser, tenant, pool, greeting="Hello from the quiet line.")
    assert await in_browser(lambda: audio_counts(browser)) == SILENT
    on = {"enabled": True, "title": ""}
    assert await in_browser(lambda: controls(browser)) == dict.fromkeys(CONTROLS, on)  # an OWNER's key may use all
    assert await in_browser(lambda: refusal_notes(browser)) == []

    await in_browser(lambda: browser.find_element(By.ID, "listen").click())
    await until(lambda: audio_counts(browser)["sources"] > 0, timeout_s=15, what="the call's audio playing")
    assert (await in_browser(lambda: audio_counts(browser)))["contexts"] == 1
    assert await in_browser(lambda: text_of(browser, "listen")) == "Stop listening"

    await in_browser(lambda: browser.find_element(By.ID, "listen").click())
    await until(lambda: text_of(browser, "listen") == "Listen", timeout_s=5, what="listening stopped")
    await in_browser(lambda: confirm_hang_up(browser))
    await running


async def test_a_viewers_key_is_shown_every_control_off_with_the_reasons_and_trying_them_sends_nothing(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    running, call_log_id = await silent_call_on_page(
        engine, browser, tenant, pool, greeting="Hello from the line viewers watch.", key=tenant.viewer_key
    )
    notes = await until(lambda: refusal_notes(browser), timeout_s=5, what="why the controls are off")
    assert notes == REFUSAL_NOTES
    assert await in_browser(lambda: controls(browser)) == OFF_FOR_A_VIEWER
    assert not await in_browser(lambda: visible(browser, "live-call-notice"))  # nothing was tried and refused

    def try_every_control() -> None:
        for name in ("listen", "hangup", "hangup", "say-interrupt", "say-submit"):
            browser.find_element(By.ID, name).click()
        # A submit that bypasses the disabled button (as Enter in the field would) is refused by the page too.
        browser.execute_script(
            "document.getElementById('say-text').value = 'Hello?'; document.getElementById('say').requestSubmit()"
        )

    await in_browser(try_every_control)
    await asyncio.sleep(0.5)  # room for any request the clicks would have started
    paths = await in_browser(lambda: requested_paths(browser))
    assert "/v1/me" in paths  # the page's requests are seen
    assert not [path for path in paths if path.endswith(("/listen", "/hangup", "/say"))], paths
    assert not await in_browser(lambda: visible(browser, "live-call-notice"))
    assert await in_browser(lambda: audio_counts(browser)) == SILENT
    assert not running.done()
    await hang_up_as_owner(engine, tenant, call_log_id, running)


async def test_a_key_made_a_viewers_after_sign_in_learns_it_at_its_first_try_of_each_right_and_its_controls_go_off(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    admin = await users.create_user(
        pool, email=f"demoted-{tenant.organization_id}@example.com", status=UserStatus.ACTIVE
    )
    await users.add_member(pool, user_id=admin.id, organization_id=tenant.organization_id, role=UserRole.ADMIN)
    key = await api_keys.create_api_key(
        pool, organization_id=tenant.organization_id, user_id=admin.id, name="demoted", live=True
    )
    running, call_log_id = await silent_call_on_page(
        engine, browser, tenant, pool, greeting="Hello from the line of the demoted.", key=key.plaintext
    )
    assert await in_browser(lambda: refusal_notes(browser)) == []
    await pool.execute(
        """UPDATE "UserOrganization" SET "role" = 'VIEWER' WHERE "userId" = $1 AND "organizationId" = $2""",
        admin.id,
        tenant.organization_id,
    )

    def say_line() -> None:
        browser.find_element(By.ID, "say-text").send_keys("Are you still there?")
        browser.find_element(By.ID, "say-submit").click()

    await in_browser(say_line)
    notes = await until(lambda: refusal_notes(browser), timeout_s=10, what="why Say and Hang up are off now")
    assert notes == [f"Hang up and Say are off: {READ_ONLY}."]
    assert await in_browser(lambda: text_of(browser, "live-call-notice")) == f"Sending the line failed: {READ_ONLY}."
    listen_still_on = OFF_FOR_A_VIEWER | {"listen": {"enabled": True, "title": ""}}  # until it is tried
    assert await in_browser(lambda: controls(browser)) == listen_still_on

    await in_browser(lambda: browser.find_element(By.ID, "listen").click())
    await until(lambda: len(refusal_notes(browser)) == 2, timeout_s=10, what="why Listen is off now")
    assert await in_browser(lambda: refusal_notes(browser)) == REFUSAL_NOTES
    assert await in_browser(lambda: text_of(browser, "live-call-notice")) == f"Listening failed: {LISTEN_REFUSAL}."
    assert await in_browser(lambda: controls(browser)) == OFF_FOR_A_VIEWER
    assert (await in_browser(lambda: audio_counts(browser)))["sources"] == 0
    await hang_up_as_owner(engine, tenant, call_log_id, running)


async def test_say_has_the_agent_speak_the_line_typed(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    running, call_log_id = await silent_call_on_page(
        engine, browser, tenant, pool, greeting="Hello from the line that takes requests."
    )

    def say_line() -> None:
        browser.find_element(By.ID, "say-text").send_keys("Your table is ready.")
        browser.find_element(By.ID, "say-submit").click()

    await in_browser(say_line)
    notice = await until(
        lambda: visible(browser, "live-call-notice") and text_of(browser, "live-call-notice").startswith("Sent"),
        timeout_s=10,
        what="the line accepted",
    )
    assert notice
    await until(
        lambda: ("Agent", "Your table is ready.") in live_turns(browser), timeout_s=30, what="the agent saying it"
    )
    assert await in_browser(lambda: browser.find_element(By.ID, "say-text").get_attribute("value")) == ""
    await in_browser(lambda: confirm_hang_up(browser))
    await running
    said = await pool.fetchval(
        """SELECT count(*) FROM "CallTurn" WHERE "callLogId" = $1 AND "speaker" = 'agent'
           AND "text" = 'Your table is ready.'""",
        call_log_id,
    )
    assert said == 1


async def test_the_page_resumes_its_event_stream_after_a_break_with_nothing_lost(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    proxy = CuttableProxy(engine)
    via_proxy = await proxy.start()
    try:
        running, call_log_id = await silent_call_on_page(
            via_proxy, browser, tenant, pool, greeting="Hello from the line that drops.", calls_to=engine
        )
        proxy.cut(refuse=True)
        await until(
            lambda: text_of(browser, "stream-status") == "Reconnecting…", timeout_s=20, what="the stream broken"
        )
        async with aiohttp.ClientSession() as session:
            status, _ = await Api(session, engine).call(
                "POST", f"/live-calls/{call_log_id}/say", tenant.owner_key, json={"text": "Said while you were away."}
            )
        assert status == 202
        await asyncio.sleep(2)  # the line is said, and its events recorded, while the page is cut off
        proxy.cut(refuse=False)
        await until(
            lambda: ("Agent", "Said while you were away.") in live_turns(browser), timeout_s=30, what="the missed line"
        )
        assert await in_browser(lambda: text_of(browser, "stream-status")) == "Live"
        await in_browser(lambda: confirm_hang_up(browser))
        await running
    finally:
        await proxy.close()


async def test_hang_up_ends_the_call_and_finishes_its_call_log(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    running, call_log_id = await silent_call_on_page(
        engine, browser, tenant, pool, greeting="Hello from the hang-up line."
    )

    await in_browser(lambda: browser.find_element(By.ID, "hangup").click())
    assert await in_browser(lambda: text_of(browser, "hangup")) == "Confirm hang-up"
    assert not running.done()
    await in_browser(lambda: browser.find_element(By.ID, "hangup").click())
    result = await asyncio.wait_for(running, timeout=30)
    assert result.ending is CallEnding.ENGINE_CLOSED
    log = await call_log(pool, result)
    assert (log["id"], log["status"], log["metadata"]["endReason"]) == (call_log_id, "COMPLETED", "api_hangup")
    await until(lambda: "Ended" in text_of(browser, "live-state"), timeout_s=15, what="the call as ended")


async def test_a_recent_call_shows_its_transcript_timeline_and_recording(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    number, _ = await make_line(pool, tenant.organization_id, firstSentence="Hello from the recorded line.")
    result = await call(engine, number, Say("I would like to book an appointment"), Pause(4000), HangUp())
    log = await call_log(pool, result)
    await sign_in(browser, engine, tenant.owner_key)
    await in_browser(lambda: browser.find_element(By.ID, "tab-recent").click())
    card = await until(lambda: card_of(browser, "recent-list", log["id"]), timeout_s=10, what="the finished call")
    await in_browser(card.click)

    audio = await until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#recent-recording audio"), timeout_s=10, what="the recording"
    )
    source = await in_browser(lambda: audio[0].get_attribute("src"))
    assert source is not None and source.startswith("blob:")
    duration = await until(
        lambda: browser.execute_script("return document.querySelector('#recent-recording audio').duration"),
        timeout_s=10,
        what="the recording's length",
    )
    assert duration > 1
    stored = await pool.fetch('SELECT "text" FROM "CallTurn" WHERE "callLogId" = $1 ORDER BY "index"', log["id"])
    shown = await in_browser(lambda: transcript(browser, "#recent-transcript .turn"))
    assert [text for _, text in shown] == [row["text"] for row in stored]
    spans = await in_browser(lambda: browser.find_elements(By.CSS_SELECTOR, "#recent-timeline .lane .span"))
    assert len(spans) == len(stored)
    assert await in_browser(lambda: audio_counts(browser)) == SILENT
    await screenshot(browser, "monitor-recent.png")


async def logged_call(pool: asyncpg.Pool, organization_id: str, customer: str, *, finished: bool) -> str:
    """The id of a call log of the organization (no call behind it) from `customer`, in progress or finished."""
    log = await call_logs.create_call_log(
        pool, organization_id=organization_id, call_type=CallType.INBOUND, call_id=f"CA{new_id()}", customer=customer
    )
    if finished:
        await call_logs.finalize_call_log(
            pool, organization_id=organization_id, call_log_id=log.id, status=CallStatus.COMPLETED, duration=5
        )
    return log.id


async def test_a_key_signed_in_after_sign_out_on_the_same_tab_neither_sees_nor_acts_on_the_first_keys_calls(
    engine: str, browser: webdriver.Chrome, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    first_live = await logged_call(pool, tenant.organization_id, "A caller of the first organization", finished=False)
    first_done = await logged_call(pool, tenant.organization_id, "A finished call of the first one", finished=True)
    following = await make_tenant(pool, "Following")
    next_live = await logged_call(pool, following.organization_id, "A caller of the next organization", finished=False)
    await sign_in(browser, engine, tenant.owner_key)
    await until(lambda: card_of(browser, "live-list", first_live), timeout_s=15, what="the first key's live call")
    await in_browser(lambda: browser.find_element(By.ID, "tab-recent").click())
    card = await until(lambda: card_of(browser, "recent-list", first_done), timeout_s=10, what="its finished call")
    await in_browser(card.click)

    def next_key_signs_in() -> None:
        browser.find_element(By.ID, "sign-out").click()
        browser.find_element(By.ID, "key").send_keys(following.owner_key)
        browser.find_element(By.ID, "signin-submit").click()

    await in_browser(next_key_signs_in)
    await until(lambda: card_of(browser, "live-list", next_live), timeout_s=15, what="the next key's live call")

    def say_line_and_press_hang_up_once() -> None:
        browser.find_element(By.ID, "say-text").send_keys("Only for the next organization.")
        browser.find_element(By.ID, "say-submit").click()
        browser.find_element(By.ID, "hangup").click()

    await in_browser(say_line_and_press_hang_up_once)
    assert await in_browser(lambda: text_of(browser, "hangup")) == "Confirm hang-up"  # nothing sent yet
    said = f"/v1/live-calls/{next_live}/say"
    await until(lambda: said in requested_paths(browser), timeout_s=10, what="the line sent")
    await in_browser(lambda: browser.find_element(By.ID, "tab-recent").click())
    assert not await in_browser(lambda: visible(browser, "recent-detail-body"))  # not the first key's call
    await in_browser(lambda: Select(browser.find_element(By.ID, "filter-status")).select_by_value("COMPLETED"))
    await until(lambda: visible(browser, "recent-empty"), timeout_s=10, what="no finished call of the next key")
    await asyncio.sleep(0.5)  # what a request still made with the first key would draw
    assert await in_browser(lambda: card_of(browser, "recent-list", first_done)) is None
    writes = [path for path in await in_browser(lambda: requested_paths(browser)) if path.endswith(("/say", "/hangup"))]
    assert writes == [said]


async def test_the_event_stream_parser_reads_events_split_anywhere_across_chunks(
    engine: str, browser: webdriver.Chrome
) -> None:
    await open_monitor(browser, engine)
    stream = (
        'event: call.snapshot\ndata: {"callLogId": "a"}\n\n'
        ": keepalive\r\n\r\n"
        'id: 7\r\nevent: caller.final\r\ndata: {"text":\r\ndata: "two lines"}\r\n\r\n'
        "id: 8\nevent: call.ended\ndata:{}\n\n"
        "id: 9\nevent: call.state\n"  # unfinished: no blank line yet
    )
    script = """
        const [text, done] = arguments;
        import("/monitor/static/js/sse.js").then(({ EventStreamParser }) => {
          const results = [];
          for (let size = 1; size <= text.length; size += 1) {
            const events = [];
            const parser = new EventStreamParser((event) => events.push(event));
            for (let i = 0; i < text.length; i += size) parser.push(text.slice(i, i + size));
            results.push({ events, lastEventId: parser.lastEventId });
          }
          done(results);
        });
    """
    results = await in_browser(lambda: browser.execute_async_script(script, stream))
    expected = {
        "events": [
            {"id": None, "type": "call.snapshot", "data": '{"callLogId": "a"}'},
            {"id": "7", "type": "caller.final", "data": '{"text":\n"two lines"}'},
            {"id": "8", "type": "call.ended", "data": "{}"},
        ],
        "lastEventId": "8",
    }
    assert all(result == expected for result in results), [r for r in results if r != expected][:1]
