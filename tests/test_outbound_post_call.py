"""Post-call analysis: the summary template filled by the model, the success verdict, Agent.successRate.

Calls are finished CallLogs with their turns in a real PostgreSQL; the model is the fake OpenAI over HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from config.agent import parse_agent_configuration
from config.settings import load_settings
from engine.workers import post_call
from engine.workers.post_call import PostCallAnalyzer, PostCallDeps, analyze_call
from pipelines.clients import ProviderClients
from storage import agents, call_logs, call_turns, campaigns, events, organizations
from storage.call_turns import TurnRecord
from storage.enums import CallerType, CallStatus, CallType
from tests.fakes.openai_chat import FakeOpenAI

OPENAI_KEY = "sk-test-post-call"
CLOUD_LLM = {"stt": {"provider": "sphinx"}, "llm": {"provider": "openai", "model": "gpt-4o-mini"}}
_sids = itertools.count(1)


@pytest.fixture(scope="module")
async def openai() -> AsyncIterator[FakeOpenAI]:
    """The fake OpenAI."""
    async with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def deps(db_url: str, pool: asyncpg.Pool, openai: FakeOpenAI, provider_clients: ProviderClients) -> PostCallDeps:
    """The database, settings pointing OpenAI at the fake, and the SDK clients."""
    settings = load_settings(database_url=db_url, openai_api_key=OPENAI_KEY, openai_base_url=openai.base_url)
    return PostCallDeps(pool=pool, settings=settings, clients=provider_clients)


@pytest.fixture(scope="module")
async def organization_id(pool: asyncpg.Pool) -> str:
    """An organization."""
    return (await organizations.create_organization(pool, name="Analysis", slug="analysis", credits=100)).id


async def make_agent(pool: asyncpg.Pool, organization_id: str, **configuration: Any) -> str:
    """An OUTBOUND agent with the given configuration; returns its id."""
    agent = await agents.create_agent(
        pool,
        organization_id=organization_id,
        name="analyzed",
        caller_type=CallerType.OUTBOUND,
        configuration=parse_agent_configuration(configuration).to_json(),
    )
    return agent.id


async def finished_call(
    pool: asyncpg.Pool,
    organization_id: str,
    agent_id: str,
    lines: list[tuple[str, str]],
    *,
    status: CallStatus = CallStatus.COMPLETED,
    end_reason: str = "path_end",
    campaign_id: str | None = None,
    variables: dict[str, str] | None = None,
) -> str:
    """A finished outbound call with these (speaker, text) turns; returns its CallLog id."""
    log = await call_logs.create_call_log(
        pool,
        organization_id=organization_id,
        call_type=CallType.OUTBOUND,
        call_id=f"CA{next(_sids):032x}",
        agent_id=agent_id,
        campaign_id=campaign_id,
        phone_number="+15550104444",
        metadata={"variables": variables or {}},
    )
    turns = [TurnRecord(i, speaker, text, i * 1000, i * 1000 + 900) for i, (speaker, text) in enumerate(lines)]  # type: ignore[arg-type]
    if turns:
        await call_turns.insert_turns(pool, organization_id=organization_id, call_log_id=log.id, turns=turns)
    await call_logs.finalize_call_log(
        pool,
        organization_id=organization_id,
        call_log_id=log.id,
        status=status,
        duration=len(lines),
        metadata={"endReason": end_reason},
    )
    return log.id


BOOKED = [
    ("agent", "Hi Ann, this is the clinic. Would you like to book your check-up?"),
    ("caller", "Yes, Tuesday at ten works for me."),
    ("agent", "Great, you are booked for Tuesday at ten. Goodbye."),
]
DECLINED = [
    ("agent", "Hi, this is the clinic. Would you like to book your check-up?"),
    ("caller", "No thanks, I am not interested."),
]


async def metadata_of(pool: asyncpg.Pool, call_log_id: str) -> dict[str, Any]:
    """The CallLog's metadata."""
    value: dict[str, Any] = await pool.fetchval('SELECT "metadata" FROM "CallLog" WHERE "id" = $1', call_log_id)
    return value


async def success_rate(pool: asyncpg.Pool, agent_id: str) -> float:
    """The agent's successRate."""
    rate: float = await pool.fetchval('SELECT "successRate" FROM "Agent" WHERE "id" = $1', agent_id)
    return rate


async def test_the_campaigns_summary_template_is_filled_and_success_judged_against_its_task(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=organization_id,
        batch_name="check-ups",
        agent_id=agent_id,
        task_prompt="Book {{name}} in for a check-up.",
        post_call_summary="Patient: {{name}}\nBooked: \nSlot: ",
    )
    call_log_id = await finished_call(
        pool, organization_id, agent_id, BOOKED, campaign_id=campaign.id, variables={"name": "Ann"}
    )
    summary = "Patient: Ann\nBooked: yes\nSlot: Tuesday 10:00"
    openai.json_replies.append(json.dumps({"summary": summary, "success": True, "reason": "A slot was booked."}))

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert (result.summary, result.success) == (summary, True)
    metadata = await metadata_of(pool, call_log_id)
    assert (metadata["summary"], metadata["success"], metadata["successReason"]) == (
        summary,
        True,
        "A slot was booked.",
    )
    assert metadata["analysis"]["model"] == "gpt-4o-mini"
    assert metadata["endReason"] == "path_end"  # the call's own metadata stays
    request = openai.json_requests[-1]
    assert request["model"] == "gpt-4o-mini" and request["response_format"] == {"type": "json_object"}
    assert request["max_completion_tokens"] == 4096  # an answer the organization pays for, bounded
    prompt = request["messages"][1]["content"]
    assert "Patient: Ann\nBooked: \nSlot: " in prompt
    assert "Book Ann in for a check-up." in prompt
    assert "Caller: Yes, Tuesday at ten works for me." in prompt
    assert await success_rate(pool, agent_id) == 100.0


async def test_the_criteria_are_filled_as_the_calls_prompt_was_built_ins_and_all(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    # The agent's prompt is judged against as the call read it: {{customer.number}} and {{today}} filled, and a
    # variable stored under a built-in's name (before such names were refused) left out there as in the call.
    prompt = "Call {{customer.number}} about the {{plan}} plan on {{today}}."
    variables = {"plan": "gold", "today": "whenever"}
    agent_id = await make_agent(pool, organization_id, prompt=prompt, variables=variables, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    created: datetime = await pool.fetchval('SELECT "createdAt" FROM "CallLog" WHERE "id" = $1', call_log_id)

    await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    asked = openai.json_requests[-1]["messages"][1]["content"]
    day = created.astimezone(UTC).strftime("%A, %B %-d, %Y")
    assert f"Call +15550104444 about the gold plan on {day}." in asked, asked


async def test_a_call_whose_campaign_is_deleted_during_its_analysis_is_judged_on_the_agents_own_terms(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, prompt="Book check-ups.", **CLOUD_LLM)
    campaign = await campaigns.create_campaign(
        pool,
        organization_id=organization_id,
        batch_name="deleted mid-analysis",
        agent_id=agent_id,
        task_prompt="Sell the premium plan.",
        post_call_summary="Plan sold: ",
    )
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED, campaign_id=campaign.id)
    openai.json_replies.append(json.dumps({"summary": "", "success": True, "reason": "A slot was booked."}))
    async with pool.acquire() as deleting:
        # The analysis has read the CallLog (still naming the campaign) when the campaign goes: the deletion holds a
        # lock the analysis's reading of the transcript waits for, and commits once the analysis waits.
        transaction = deleting.transaction()
        await transaction.start()
        await deleting.execute('LOCK TABLE "CallTurn" IN ACCESS EXCLUSIVE MODE')
        await campaigns.delete_campaign(deleting, organization_id=organization_id, campaign_id=campaign.id)
        analysis = asyncio.create_task(analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id))
        for _ in range(200):
            if await pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '\"CallTurn\"'::regclass"
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the analysis never read the transcript")
        await transaction.commit()
    result = await analysis

    assert (result.success, result.reason, result.error) == (True, "A slot was booked.", None)
    asked = openai.json_requests[-1]["messages"][1]["content"]
    assert "Book check-ups." in asked and "premium plan" not in asked  # the agent's own criteria: the campaign is gone
    metadata = await metadata_of(pool, call_log_id)
    assert metadata["success"] is True and "summary" not in metadata


async def test_success_rate_is_the_share_of_analyzed_calls_judged_a_success(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(
        pool,
        organization_id,
        successCriteria="The callee agreed to a check-up.",
        postCallSummary="Outcome: ",
        **CLOUD_LLM,
    )
    verdicts = [True, False, False, True]
    for verdict in verdicts:
        call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED if verdict else DECLINED)
        openai.json_replies.append(json.dumps({"summary": "Outcome: x", "success": verdict, "reason": "judged"}))
        await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)
    unanalyzed = await finished_call(pool, organization_id, agent_id, DECLINED)  # never analyzed: does not count

    assert await success_rate(pool, agent_id) == 50.0
    assert "success" not in await metadata_of(pool, unanalyzed)
    assert "The callee agreed to a check-up." in openai.json_requests[-1]["messages"][1]["content"]


async def test_without_a_template_only_success_is_judged(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, prompt="Sell the premium plan.", **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, DECLINED)
    openai.json_replies.append(json.dumps({"summary": "", "success": False, "reason": "The callee declined."}))

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert (result.summary, result.success, result.reason) == (None, False, "The callee declined.")
    metadata = await metadata_of(pool, call_log_id)
    assert "summary" not in metadata and metadata["success"] is False
    assert "Sell the premium plan." in openai.json_requests[-1]["messages"][1]["content"]
    assert await success_rate(pool, agent_id) == 0.0


async def test_an_offline_agent_is_skipped_with_the_reason_and_no_model_is_asked(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, postCallSummary="Outcome: ")  # conversation path only
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    asked = len(openai.json_requests)

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert result.skipped is not None and "offline" in result.skipped
    assert len(openai.json_requests) == asked
    metadata = await metadata_of(pool, call_log_id)
    assert metadata["analysis"]["skipped"] == result.skipped and "success" not in metadata


@pytest.mark.parametrize(
    ("status", "end_reason"),
    [(CallStatus.MISSED, "no-answer"), (CallStatus.FAILED, "failed"), (CallStatus.COMPLETED, "voicemail_left")],
)
async def test_calls_without_a_conversation_are_not_judged(
    *,
    deps: PostCallDeps,
    openai: FakeOpenAI,
    pool: asyncpg.Pool,
    organization_id: str,
    status: CallStatus,
    end_reason: str,
) -> None:
    agent_id = await make_agent(pool, organization_id, postCallSummary="Outcome: ", **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, [], status=status, end_reason=end_reason)
    asked = len(openai.json_requests)

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert result.skipped is not None and end_reason in result.skipped
    assert len(openai.json_requests) == asked
    assert "success" not in await metadata_of(pool, call_log_id)


async def test_a_model_answer_that_is_not_the_json_asked_for_is_recorded_as_an_error(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    openai.json_replies.append("I think it went well!")

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert result.error is not None and "not the JSON" in result.error
    metadata = await metadata_of(pool, call_log_id)
    assert metadata["analysis"]["error"] == result.error and "success" not in metadata


async def test_a_model_answer_with_characters_no_column_can_hold_is_stored_with_replacement_characters(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, postCallSummary="Outcome: ", **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    # A NUL and half an emoji, as JSON can carry them.
    openai.json_replies.append('{"summary": "Outcome: booked\\u0000", "success": true, "reason": "Yes \\ud83d"}')

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert (result.summary, result.success, result.reason) == ("Outcome: booked\ufffd", True, "Yes \ufffd")
    metadata = await metadata_of(pool, call_log_id)
    assert (metadata["summary"], metadata["success"], metadata["successReason"]) == (
        "Outcome: booked\ufffd",
        True,
        "Yes \ufffd",
    )
    assert await success_rate(pool, agent_id) == 100.0


async def test_openai_failing_is_recorded_and_not_raised(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    openai.fail_next = 2  # the shared client retries once

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert result.error == "OpenAI answered HTTP 500"
    assert (await metadata_of(pool, call_log_id))["analysis"]["error"] == "OpenAI answered HTTP 500"


async def test_a_model_trickling_its_answer_past_the_deadline_is_recorded_as_an_error(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each byte comes long before the client's read timeout; the whole answer would take minutes.
    monkeypatch.setattr(post_call, "ANSWER_SECONDS", 0.5)
    monkeypatch.setattr(openai, "json_trickle_ms", 200)
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)

    result = await analyze_call(deps, organization_id=organization_id, call_log_id=call_log_id)

    assert result.error == "OpenAI did not answer within 0.5 s"
    metadata = await metadata_of(pool, call_log_id)
    assert metadata["analysis"]["error"] == result.error and "success" not in metadata


async def test_a_running_call_or_another_organizations_call_is_refused(
    deps: PostCallDeps, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    running = await call_logs.create_call_log(
        pool, organization_id=organization_id, call_type=CallType.OUTBOUND, call_id="CA-running", agent_id=agent_id
    )
    other = await organizations.create_organization(pool, name="Other", slug="analysis-other", credits=1)
    finished = await finished_call(pool, organization_id, agent_id, BOOKED)

    with pytest.raises(ValueError, match="IN_PROGRESS"):
        await analyze_call(deps, organization_id=organization_id, call_log_id=running.id)
    with pytest.raises(Exception, match="CallLog"):
        await analyze_call(deps, organization_id=other.id, call_log_id=finished)


async def test_two_engines_given_one_ended_call_analyze_it_once(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    await events.create_event(
        pool, organization_id=organization_id, name="call.analyzed", webhook_url="https://hooks.example/analyzed"
    )
    asked = len(openai.json_requests)
    first, second = (PostCallAnalyzer(deps, node_id=node) for node in ("node-a", "node-b"))
    first.submit(call_log_id)
    second.submit(call_log_id)
    await first.close()
    await second.close()

    assert len(openai.json_requests) == asked + 1
    assert "success" in await metadata_of(pool, call_log_id)
    deliveries = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "event" = 'call.analyzed' AND "organizationId" = $1""",
        organization_id,
    )
    assert [d["payload"]["data"]["callLogId"] for d in deliveries] == [call_log_id]


async def test_an_analysis_taken_over_from_a_slow_engine_is_stored_and_announced_once(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    await events.create_event(
        pool, organization_id=organization_id, name="call.analyzed", webhook_url="https://hooks.example/slow"
    )
    # The first engine's model answers so late that its claim goes stale and a second engine takes the call over.
    stale_after = timedelta(milliseconds=300)
    slow, other = (PostCallAnalyzer(deps, node_id=node, stale_after=stale_after) for node in ("slow", "other"))
    openai.json_delay_ms = 1500
    try:
        slow.submit(call_log_id)
        for _ in range(200):
            if "analysisClaim" in await metadata_of(pool, call_log_id):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        other.submit(call_log_id)  # as its sweep does, finding the claim stale
        await other.close()
        await slow.close()
    finally:
        openai.json_delay_ms = 0
    assert len(openai.json_requests) >= 2, "the second engine did not take the analysis over"

    deliveries = await pool.fetch(
        """SELECT "payload" FROM "WebhookDelivery" WHERE "event" = 'call.analyzed' AND "organizationId" = $1
           AND "payload" -> 'data' ->> 'callLogId' = $2""",
        organization_id,
        call_log_id,
    )
    assert len({d["payload"]["id"] for d in deliveries}) == 1  # one occurrence, whatever the subscriptions
    metadata = await metadata_of(pool, call_log_id)
    assert metadata["success"] is True and "error" not in metadata["analysis"]


async def test_the_sweep_takes_up_analyses_a_dead_engine_left_undone(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    never_queued = await finished_call(pool, organization_id, agent_id, BOOKED)
    claimed_by_the_dead = await finished_call(pool, organization_id, agent_id, BOOKED)
    claimed_just_now = await finished_call(pool, organization_id, agent_id, BOOKED)
    for call_log_id, claimed_at in ((claimed_by_the_dead, "2000-01-01T00:00:00Z"), (claimed_just_now, "now")):
        await pool.execute(
            """UPDATE "CallLog" SET "metadata" = "metadata" || jsonb_build_object('analysisClaim',
                   jsonb_build_object('node', 'gone', 'at', CASE WHEN $2 = 'now' THEN now()::text ELSE $2 END))
               WHERE "id" = $1""",
            call_log_id,
            claimed_at,
        )
    analyzer = PostCallAnalyzer(deps, node_id="survivor")

    await analyzer.sweep()
    await analyzer.close()

    assert "success" in await metadata_of(pool, never_queued)
    assert "success" in await metadata_of(pool, claimed_by_the_dead)
    assert "analysis" not in await metadata_of(pool, claimed_just_now)  # its engine may still be at it


async def test_a_model_failing_for_a_passing_reason_is_asked_again_later_then_its_failure_stored(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenAI's server errors (and rate limits) pass: the call is put off and the sweep asks again, up to
    # ANALYSIS_ATTEMPTS times, before the failure becomes the call's analysis.
    monkeypatch.setattr(post_call, "RETRY_DELAYS", (timedelta(milliseconds=200), timedelta(milliseconds=400)))
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    recovers = await finished_call(pool, organization_id, agent_id, BOOKED)
    analyzer = PostCallAnalyzer(deps, node_id="retrying", stale_after=timedelta(minutes=10))
    asked = len(openai.json_requests)

    openai.fail_next = 2  # the shared client retries once: the first attempt fails
    analyzer.submit(recovers)
    await analyzer.close()
    metadata = await metadata_of(pool, recovers)
    assert "analysis" not in metadata and "success" not in metadata
    claim = metadata["analysisClaim"]
    assert (claim["attempts"], claim["lastError"]) == (1, "OpenAI answered HTTP 500")
    # The sweep submits what it finds unanalyzed (other tests' calls too): submitted here as it would.
    analyzer.submit(recovers)
    await analyzer.close()
    assert (await metadata_of(pool, recovers))["analysisClaim"]["attempts"] == 1  # put off: not taken up yet
    await asyncio.sleep(0.3)
    analyzer.submit(recovers)
    await analyzer.close()
    metadata = await metadata_of(pool, recovers)
    assert metadata["success"] is True and "error" not in metadata["analysis"]
    assert metadata["analysisClaim"]["attempts"] == 2
    assert len(openai.json_requests) == asked + 3

    never = await finished_call(pool, organization_id, agent_id, BOOKED)
    openai.fail_next = 2 * post_call.ANALYSIS_ATTEMPTS
    try:
        analyzer.submit(never)
        await analyzer.close()
        for delay in (0.3, 0.5):
            assert "analysis" not in await metadata_of(pool, never)
            await asyncio.sleep(delay)
            analyzer.submit(never)
            await analyzer.close()
    finally:
        openai.fail_next = 0
    metadata = await metadata_of(pool, never)
    assert metadata["analysis"]["error"] == "OpenAI answered HTTP 500"
    assert metadata["analysisClaim"]["attempts"] == post_call.ANALYSIS_ATTEMPTS
    asked = len(openai.json_requests)
    analyzer.submit(never)
    await analyzer.close()
    assert len(openai.json_requests) == asked  # stored: never asked again
    awaiting = await call_logs.awaiting_analysis(
        pool, ended_within=timedelta(hours=1), stale_after=timedelta(0), limit=10_000
    )
    assert never not in awaiting and recovers not in awaiting  # no sweep takes either up again


async def test_a_failure_that_asking_again_cannot_mend_is_stored_at_once(
    deps: PostCallDeps, openai: FakeOpenAI, pool: asyncpg.Pool, organization_id: str
) -> None:
    agent_id = await make_agent(pool, organization_id, **CLOUD_LLM)
    call_log_id = await finished_call(pool, organization_id, agent_id, BOOKED)
    openai.json_replies.append("This is not JSON.")
    analyzer = PostCallAnalyzer(deps, node_id="no-retry")

    analyzer.submit(call_log_id)
    await analyzer.close()

    metadata = await metadata_of(pool, call_log_id)
    assert "not the JSON asked for" in metadata["analysis"]["error"]
    assert metadata["analysisClaim"]["attempts"] == 1
