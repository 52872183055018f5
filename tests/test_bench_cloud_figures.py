"""bench/bench_cloud.py's own arithmetic: speculation shares read from /metrics, call-minutes, and the pausing
callers' utterance (eSpeak NG speech with a silent mid-sentence pause); and its seeded organization, which must take
every call of a round at once."""

from __future__ import annotations

import base64

import asyncpg
import pytest

from bench.bench_cloud import PAUSE_FIRST, PAUSE_REST, Delays, call_minutes, seed, speculation_shares
from bench.cloud_callers import CallerResult, paused_utterance
from config.settings import load_settings
from media.g711 import FRAME_MS, ULAW_SILENCE
from storage import organizations


def test_speculation_shares_read_the_engines_counter_by_event() -> None:
    counters = {
        'dialtone_speculative_replies_total{event="started"}': 8.0,
        'dialtone_speculative_replies_total{event="used"}': 6.0,
        'dialtone_speculative_replies_total{event="discarded"}': 2.0,
    }
    assert speculation_shares(counters) == {"used": 6.0, "discarded": 2.0, "usedShare": 0.75, "discardedShare": 0.25}


def test_an_event_never_counted_is_zero_when_the_counter_exists() -> None:
    counters = {'dialtone_speculative_replies_total{event="used"}': 4.0}
    assert speculation_shares(counters) == {"used": 4.0, "discarded": 0.0, "usedShare": 1.0, "discardedShare": 0.0}


def test_speculation_shares_are_unknown_without_the_counters() -> None:
    assert speculation_shares({}) == {"used": None, "discarded": None, "usedShare": None, "discardedShare": None}


def test_call_minutes_run_from_connection_to_hang_up_or_the_end() -> None:
    done = CallerResult("CA1", connected_at=10.0, hung_up_at=40.0)
    open_call = CallerResult("CA2", connected_at=20.0)
    refused = CallerResult("CA3")
    assert call_minutes([done, open_call, refused], end=50.0) == pytest.approx(1.0)


def test_the_unavoidable_delays_are_finalize_first_token_and_first_byte() -> None:
    delays = Delays()
    assert delays.unavoidable == 80 + 300 + 150
    assert delays.total == 300 + 200 + 300 + 150


async def test_a_pausing_utterance_is_silent_for_its_pause_between_two_spoken_parts() -> None:
    utterance = await paused_utterance(PAUSE_FIRST, PAUSE_REST, 500, max_inner_quiet_ms=200)
    assert utterance.pause_from is not None
    assert utterance.transcript == f"{PAUSE_FIRST} | {PAUSE_REST}"
    pause = utterance.frames_b64[utterance.pause_from : utterance.pause_from + 500 // FRAME_MS]
    assert {base64.b64decode(frame) for frame in pause} == {bytes([ULAW_SILENCE]) * (8 * FRAME_MS)}
    assert base64.b64decode(utterance.frames_b64[utterance.pause_from - 1]) != bytes([ULAW_SILENCE]) * (8 * FRAME_MS)
    assert utterance.last_voiced == len(utterance.frames_b64) - 1


async def test_the_seeded_organization_has_no_limit_on_concurrent_calls(pool: asyncpg.Pool) -> None:
    # On a plan with a limit (PRO: 50), a 100-call round measured 50 calls and 50 refusals.
    line = await seed(pool, recording=False, delays=Delays())
    organization = await organizations.get_organization(pool, organization_id=line.organization_id)
    assert load_settings().concurrent_call_limits[organization.plan.value] == 0
