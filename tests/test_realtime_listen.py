"""A speech-to-speech call's barge-in through the real server: the OpenAI Realtime fake speaks a long opening, the
caller talks over it, and the agent audio Twilio threw away is neither in the recording nor heard by a listener,
while the model's item is truncated where the caller stopped hearing it."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import numpy as np

from media.g711 import BYTES_PER_MS, FRAME_BYTES, FRAME_MS
from tests.engine_server import running_engine
from tests.fakes.openai_realtime import FakeRealtime
from tests.test_api_auth import make_tenant
from tests.test_api_live_listen import assert_silent_from_the_barge_in, caller_wav, listen_to_call, recording_of
from tests.test_calls_e2e import TOKEN
from tests.test_cloud_calls_e2e import OPENAI_KEY
from tests.test_live_events_cloud import realtime_line

__all__ = ["caller_wav"]  # that module's fixture: what the caller says

OPENING = (
    "Welcome to the speech to speech line. This opening is long on purpose, so that the caller has plenty of time to "
    "interrupt it before it ends, and the model still has a lot to say."
)


async def test_the_agent_audio_a_barge_in_threw_away_is_neither_recorded_nor_heard_nor_kept_by_the_model(
    db_url: str, pool: asyncpg.Pool, caller_wav: Path, tmp_path: Path
) -> None:
    tenant = await make_tenant(pool, "Realtime listened")
    number = await realtime_line(pool, tenant.organization_id, "+15555579301", firstSentence=OPENING)
    async with FakeRealtime(api_key=OPENAI_KEY) as realtime:
        realtime.reply(OPENING)
        realtime.reply("Sure, what day works for you?")
        async with running_engine(
            db_url,
            twilio_auth_token=TOKEN,
            state_dir=tmp_path,
            listen_buffer_ms=500,
            openai_api_key=OPENAI_KEY,
            openai_base_url=realtime.base_url,
        ) as engine:
            heard_call = await listen_to_call(
                pool,
                tenant,
                number,
                caller_wav,
                engine=engine,
                listener_engine=engine,
                browser=False,
                barge_in_after_ms=1500,
            )
    recording = recording_of(tmp_path, db_url, tenant, heard_call.call_log_id)
    cut = assert_silent_from_the_barge_in(heard_call, recording)
    # The model keeps of its opening what the recording kept of it, what the caller heard (give or take the
    # rounding of each chunk's place on the call's timeline to the millisecond).
    (truncation,) = realtime.truncations
    assert truncation.accepted and truncation.audio_end_ms < truncation.item_audio_ms
    opening = np.flatnonzero(recording[: cut + FRAME_BYTES, 1])  # the agent's first audio is the opening
    recorded_ms = (opening[-1] + 1 - opening[0]) / BYTES_PER_MS
    assert abs(truncation.audio_end_ms - recorded_ms) <= FRAME_MS
