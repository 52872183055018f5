"""After a call: the language model fills the post-call summary template and judges whether the call succeeded.

`analyze_call` reads the finished call's transcript, asks the agent's OpenAI model once for a JSON answer
`{"summary": str, "success": bool, "reason": str}` and stores it in CallLog.metadata (`summary`, `success`,
`successReason`, `analysis`); Agent.successRate then becomes the share of the agent's analyzed calls judged a
success. Success is judged against, in order: the agent's `successCriteria`, the campaign's task prompt, the agent's
prompt. Calls with no conversation to judge (unanswered, voicemail, failed) and agents whose only language model is
the offline conversation path are skipped with the reason in `metadata.analysis.skipped`. The verdict, the
agent's new rate (kept by a trigger on CallLog, migration 0023) and the `call.analyzed` webhook are written in one
transaction.

`PostCallAnalyzer` runs the analyses of a running engine in the background, a few at a time, as calls end, and
takes up those a process that died left undone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import openai
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from config.agent import AgentConfiguration, AgentConfigurationError, OpenAILLMConfig, parse_agent_configuration
from config.settings import Settings
from config.text import storable_text
from engine.call.setup import provider_keys, template_variables
from engine.server.appkeys import DATABASE, PROVIDER_CLIENTS, SETTINGS
from engine.workers.recovery import NODE_ID
from pipelines.clients import ProviderClients
from pipelines.llm.prompt import render_prompt
from pipelines.registry import ProviderKeyMissing, provider_key
from storage import Pool, agents, call_logs, call_turns, campaigns, webhook_outbox
from storage.call_logs import CallLog
from storage.end_reasons import VOICEMAIL, EndReason
from storage.enums import CallStatus
from storage.errors import DATABASE_ERRORS, NotFound
from storage.records import Queryable, transaction
from storage.webhook_outbox import WebhookEvent

log = logging.getLogger(__name__)

ANSWER_MAX_TOKENS: Final = 4096
"""The longest answer the model may give (the organization pays for it, and it is stored with the call and sent in
call.analyzed): an answer cut there is not the JSON asked for, and is stored as the analysis's error."""

ANSWER_SECONDS: Final = 180.0
"""How long the model may take over its whole answer, retries included. The client's 20 s read timeout holds for
each read, not the answer: a model (or a proxy) that trickles bytes would otherwise hold an analysis, and one of the
analyzer's few places, for as long as it keeps trickling. Long enough for an answer of ANSWER_MAX_TOKENS at a slow
model's 50 tokens a second, retried once."""

ANALYSIS_ATTEMPTS: Final = 3
"""How many times the analyzer asks the model about a call whose request failed for a passing reason (HTTP 408, 409,
429 or 5xx, no answer in time, OpenAI unreachable) before it stores the failure as the call's analysis."""
RETRY_DELAYS: Final = (timedelta(minutes=1), timedelta(minutes=5))
"""How long the analyzer waits after the first and second passing failure before asking again (the sweep takes the
call up then, on whichever engine process runs it first)."""

MAX_TRANSCRIPT_CHARS: Final = 60_000
"""The transcript sent for analysis is cut (keeping its start and end) beyond this many characters."""

_INSTRUCTIONS = (
    "You analyze finished phone calls placed or answered by a voice agent. Read the transcript and answer with one "
    'JSON object and nothing else: {"summary": string, "success": boolean, "reason": string}. '
    "`success` is true only if the call achieved the goal described under SUCCESS CRITERIA; `reason` says why in one "
    "sentence. {summary_rule}"
)
_SUMMARY_RULE = (
    "`summary` is the SUMMARY TEMPLATE filled in from the transcript: keep its structure and labels, fill every blank "
    "from what was said, and write 'unknown' where the call did not say."
)
_NO_SUMMARY_RULE = '`summary` is "" (no summary was asked for).'


class AnalysisDeps(Protocol):
    """What analysis needs: the database, the settings and the engine's SDK clients (PostCallDeps qualifies)."""

    @property
    def pool(self) -> Pool:
        """The database."""
        ...

    @property
    def settings(self) -> Settings:
        """The engine's settings (the OpenAI base URL and key)."""
        ...

    @property
    def clients(self) -> ProviderClients:
        """The engine's SDK clients (the OpenAI one asks the model)."""
        ...


@dataclass(frozen=True, slots=True)
class PostCallDeps:
    """The database, settings and SDK clients of a running engine, or of a script."""

    pool: Pool
    settings: Settings
    clients: ProviderClients

    @classmethod
    def from_app(cls, app: web.Application) -> PostCallDeps:
        """The running engine's database, settings and SDK clients."""
        return cls(pool=app[DATABASE].pool, settings=app[SETTINGS], clients=app[PROVIDER_CLIENTS])


@dataclass(frozen=True, slots=True)
class CallAnalysis:
    """What analysis made of a call: summary and verdict, or why it was skipped or failed."""

    call_log_id: str
    summary: str | None = None
    success: bool | None = None
    reason: str | None = None
    skipped: str | None = None
    error: str | None = None
    retry: bool = False
    """The request failed for a passing reason and nothing was stored: the call is to be analyzed again later."""


class _Verdict(BaseModel):
    """The model's answer."""

    model_config = ConfigDict(extra="ignore")

    summary: str = ""
    success: bool
    reason: str = ""

    @field_validator("summary", "reason")
    @classmethod
    def _storable(cls, text: str) -> str:
        # JSON can carry a NUL or half an emoji, which jsonb refuses: the whole verdict would be lost, and asked for
        # again each time the sweep finds the call unanalyzed.
        return storable_text(text)


async def analyze_call(
    deps: AnalysisDeps, *, organization_id: str, call_log_id: str, retry_later: bool = False
) -> CallAnalysis:
    """Summarize and judge one finished call of the organization and store the result (the agent's successRate follows).

    NotFound if the organization has no such call; a call still IN_PROGRESS raises ValueError. Model failures
    (unreachable, refusing, answering something that is not the JSON asked for) are stored in
    `metadata.analysis.error` and returned, never raised: the call itself is over and stays as it is; with
    `retry_later`, a failure for a passing reason (a rate limit, a server error, no answer in time) stores nothing
    and returns `retry`, for the caller to ask again later (PostCallAnalyzer does). A call that
    has an analysis by the time this one is stored (another engine took it over and finished first) keeps it: nothing
    is stored or announced twice.
    """
    pool = deps.pool
    call_log = await call_logs.get_call_log(pool, organization_id=organization_id, call_log_id=call_log_id)
    if call_log.status is CallStatus.IN_PROGRESS:
        raise ValueError(f"CallLog {call_log_id} is still IN_PROGRESS; analyze it once it has ended")
    skipped = _nothing_to_judge(call_log)
    if skipped is not None:
        return await _skip(pool, call_log, skipped)
    assert call_log.agent_id is not None  # _nothing_to_judge skips calls without an agent
    try:
        bundle = await agents.load_agent_bundle(pool, organization_id=organization_id, agent_id=call_log.agent_id)
        config = parse_agent_configuration(bundle.agent.configuration)
    except (NotFound, AgentConfigurationError) as exc:
        return await _skip(pool, call_log, f"the agent cannot be read: {exc}")
    model = _analysis_model(config, deps.settings, bundle)
    if model is None:
        return await _skip(pool, call_log, "no OpenAI language model is configured (the offline one cannot summarize)")
    transcript = await _transcript(pool, call_log)
    if not transcript:
        return await _skip(pool, call_log, "nothing was said")

    campaign = await campaigns.find_call_campaign(
        pool, organization_id=organization_id, campaign_id=call_log.campaign_id
    )
    # Filled as the call's prompt was, as of the call's start: built-ins, the agent's variables, the call's own.
    variables = template_variables(config, call_log, call_log.created_at)
    template = (campaign.post_call_summary if campaign and campaign.post_call_summary else None) or (
        config.post_call_summary
    )
    criteria = (
        config.success_criteria
        or (campaign.task_prompt if campaign and campaign.task_prompt else None)
        or config.prompt
        or "The caller's request was dealt with and the call ended politely."
    )
    messages = _messages(
        template=render_prompt(template, variables).text if template else None,
        criteria=render_prompt(criteria, variables).text,
        transcript=transcript,
    )
    option, api_key = model
    try:
        verdict = await _ask(deps, option, api_key, messages)
    except _AnalysisError as exc:
        if retry_later and exc.passing:
            log.warning("CallLog %s: post-call analysis failed, to be asked again: %s", call_log.id, exc)
            return CallAnalysis(call_log.id, error=str(exc), retry=True)
        log.warning("CallLog %s: post-call analysis failed: %s", call_log.id, exc)
        await _store(pool, call_log, {"analysis": {"error": str(exc), "model": option.model, "at": _now()}})
        return CallAnalysis(call_log.id, error=str(exc))

    stored: dict[str, Any] = {
        "success": verdict.success,
        "successReason": verdict.reason,
        "analysis": {"model": option.model, "at": _now()},
    }
    if template:
        stored["summary"] = verdict.summary
    async with transaction(pool) as conn:
        # With it the agent's successRate (migration 0023's trigger); an engine that took the analysis over while this
        # one waited for its model may have stored one first, and a call is analyzed and announced once.
        if not await _store(conn, call_log, stored):
            log.info("CallLog %s: its analysis was stored first by another engine; this one is dropped", call_log.id)
            return CallAnalysis(call_log.id, skipped="analyzed already")
        await webhook_outbox.enqueue_event(
            conn,
            organization_id=organization_id,
            event=WebhookEvent.CALL_ANALYZED,
            data={
                "callLogId": call_log.id,
                "agentId": call_log.agent_id,
                "campaignId": call_log.campaign_id,
                "summary": stored.get("summary"),
                "success": verdict.success,
                "reason": verdict.reason,
            },
            agent_id=call_log.agent_id,
        )
    return CallAnalysis(
        call_log.id, summary=verdict.summary if template else None, success=verdict.success, reason=verdict.reason
    )


def _nothing_to_judge(call_log: CallLog) -> str | None:
    end_reason = EndReason.read(call_log.metadata.get("endReason"))
    if call_log.agent_id is None:
        return "the call has no agent"
    if call_log.status is not CallStatus.COMPLETED:
        return f"the call did not connect ({call_log.status}, {end_reason})"
    if end_reason in VOICEMAIL:
        return f"an answering machine took the call ({end_reason})"
    return None


def _analysis_model(
    config: AgentConfiguration, settings: Settings, bundle: agents.AgentBundle
) -> tuple[OpenAILLMConfig, str] | None:
    """The agent's first OpenAI language model whose key is available, with that key; for a speech-to-speech agent,
    its realtime entry's analysis model, with the realtime key."""
    keys = provider_keys(settings, bundle)
    candidates = [option for option in config.llm if isinstance(option, OpenAILLMConfig)]
    candidates += [
        OpenAILLMConfig(model=option.analysis_model, api_key_ref=option.api_key_ref) for option in config.realtime or ()
    ]
    for option in candidates:
        try:
            key = provider_key(option, keys, stage="llm")
        except ProviderKeyMissing as exc:
            log.info("post-call analysis cannot use %s: %s", option.model, exc)
            continue
        if key:
            return option, key
    return None


async def _transcript(pool: Pool, call_log: CallLog) -> str:
    turns = await call_turns.list_turns(pool, organization_id=call_log.organization_id, call_log_id=call_log.id)
    if turns:
        text = "\n".join(f"{'Agent' if t.speaker == 'agent' else 'Caller'}: {t.text}" for t in turns if t.text.strip())
    else:
        text = (call_log.transcript or "").strip()
    if len(text) > MAX_TRANSCRIPT_CHARS:
        half = MAX_TRANSCRIPT_CHARS // 2
        text = text[:half] + "\n[…]\n" + text[-half:]
    return text


def _messages(*, template: str | None, criteria: str, transcript: str) -> list[ChatCompletionMessageParam]:
    rule = _SUMMARY_RULE if template else _NO_SUMMARY_RULE
    parts = []
    if template:
        parts.append(f"SUMMARY TEMPLATE:\n{template}")
    parts.append(f"SUCCESS CRITERIA:\n{criteria}")
    parts.append(f"TRANSCRIPT:\n{transcript}")
    return [
        {"role": "system", "content": _INSTRUCTIONS.replace("{summary_rule}", rule)},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


class _AnalysisError(Exception):
    """The model could not give an analysis; the message says why (never the key). `passing`: asking again later
    may well succeed (a rate limit, a server error, no answer in time, OpenAI unreachable)."""

    def __init__(self, message: str, *, passing: bool = False) -> None:
        super().__init__(message)
        self.passing = passing


_PASSING_STATUSES: Final = frozenset({408, 409, 429})
"""HTTP statuses, besides 5xx, that say "not now" rather than "never" (the SDK retries the same ones)."""


async def _ask(
    deps: AnalysisDeps, option: OpenAILLMConfig, api_key: str, messages: list[ChatCompletionMessageParam]
) -> _Verdict:
    # POSTed through the SDK's client (auth, retries, its errors) but not `chat.completions.create`: its TypedDict
    # transformer walks the messages and its response becomes a pydantic model, 3-4 ms of event-loop time per call
    # (cProfile, 100 calls) for the one field read here. The messages are plain JSON already.
    client = deps.clients.openai(api_key, deps.settings.openai_base_url)
    body = {
        "model": option.model,
        "messages": messages,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "max_completion_tokens": ANSWER_MAX_TOKENS,
    }
    try:
        async with asyncio.timeout(ANSWER_SECONDS):
            answer = await client.post(
                "/chat/completions", body=body, options={"security": {"bearer_auth": True}}, cast_to=bytes
            )
    except TimeoutError:
        raise _AnalysisError(f"OpenAI did not answer within {ANSWER_SECONDS:g} s", passing=True) from None
    except openai.APIStatusError as exc:
        passing = exc.status_code in _PASSING_STATUSES or exc.status_code >= 500
        raise _AnalysisError(f"OpenAI answered HTTP {exc.status_code}", passing=passing) from None
    except openai.APIError as exc:  # connection errors and time-outs: the request had no answer
        raise _AnalysisError(f"OpenAI could not be reached: {type(exc).__name__}", passing=True) from None
    content = _answer_text(answer)
    if not content:
        raise _AnalysisError("the model gave no answer")
    try:
        return _Verdict.model_validate(json.loads(_without_fence(content)))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise _AnalysisError(f"the model's answer is not the JSON asked for ({type(exc).__name__})") from None


def _answer_text(answer: bytes) -> str | None:
    """The text of a completion's first choice (`choices[0].message.content`), or None if it has none."""
    try:
        completion = json.loads(answer)
    except ValueError:  # json.JSONDecodeError, or a body that is not UTF-8
        raise _AnalysisError("OpenAI sent a completion that is not JSON") from None
    choices = completion.get("choices") if isinstance(completion, dict) else None
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def _without_fence(content: str) -> str:
    # Some models wrap JSON in a Markdown fence even when asked not to.
    text = content.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    return text


async def _skip(pool: Pool, call_log: CallLog, reason: str) -> CallAnalysis:
    log.info("CallLog %s: no post-call analysis: %s", call_log.id, reason)
    await _store(pool, call_log, {"analysis": {"skipped": reason, "at": _now()}})
    return CallAnalysis(call_log.id, skipped=reason)


async def _store(db: Queryable, call_log: CallLog, metadata: dict[str, Any]) -> bool:
    """Store the analysis unless the call has one already; whether it was."""
    return await call_logs.store_analysis(
        db, organization_id=call_log.organization_id, call_log_id=call_log.id, metadata=metadata
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PostCallAnalyzer:
    """Analyzes calls as they end, in the background, at most `concurrency` at a time, once per call.

    Each analysis first claims its call (metadata.analysisClaim), so that of several engine processes exactly one
    analyzes it. Every `sweep_seconds` the analyzer also takes up calls that started within `sweep_window` and
    ended with no analysis and no live claim: those whose process died with their analysis queued or running
    (a claim goes stale after `stale_after`), and those whose model request failed for a passing reason, put off by
    `RETRY_DELAYS` until their `ANALYSIS_ATTEMPTS`th attempt, whose failure is stored. Shutting down waits
    `grace_seconds` for running analyses.
    """

    def __init__(
        self,
        deps: AnalysisDeps,
        *,
        node_id: str,
        concurrency: int = 4,
        grace_seconds: float = 10.0,
        sweep_seconds: float = 60.0,
        sweep_window: timedelta = timedelta(hours=6),
        stale_after: timedelta = timedelta(minutes=10),
    ) -> None:
        """Analyze with `deps`' database and settings, claiming calls as engine node `node_id`."""
        self._deps = deps
        self._node_id = node_id
        self._slots = asyncio.Semaphore(concurrency)
        self._grace = grace_seconds
        self._sweep_seconds = sweep_seconds
        self._sweep_window = sweep_window
        self._stale_after = stale_after
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, call_log_id: str) -> None:
        """Analyze the ended call soon (unless another process does); returns at once."""
        if call_log_id in self._tasks:
            return
        task = asyncio.create_task(self._analyze(call_log_id), name=f"post-call {call_log_id}")
        self._tasks[call_log_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(call_log_id, None))

    async def _analyze(self, call_log_id: str) -> None:
        async with self._slots:
            try:
                claim = await call_logs.claim_for_analysis(
                    self._deps.pool, call_log_id=call_log_id, node_id=self._node_id, stale_after=self._stale_after
                )
                if claim is None:
                    return
                result = await analyze_call(
                    self._deps,
                    organization_id=claim.organization_id,
                    call_log_id=call_log_id,
                    retry_later=claim.attempt < ANALYSIS_ATTEMPTS,
                )
                if result.retry:
                    await call_logs.put_off_analysis(
                        self._deps.pool,
                        call_log_id=call_log_id,
                        node_id=self._node_id,
                        stale_after=self._stale_after,
                        retry_in=RETRY_DELAYS[min(claim.attempt, len(RETRY_DELAYS)) - 1],
                        error=result.error or "",
                    )
            except Exception:  # one call's analysis must never take the engine down
                log.exception("CallLog %s: post-call analysis failed", call_log_id)

    async def sweep(self) -> int:
        """Queue the analyses a process that died left undone; how many were found."""
        found = await call_logs.awaiting_analysis(
            self._deps.pool, ended_within=self._sweep_window, stale_after=self._stale_after, limit=100
        )
        for call_log_id in found:
            self.submit(call_log_id)
        return len(found)

    async def run(self) -> None:
        """Sweep now and every `sweep_seconds`, until cancelled."""
        while True:
            try:
                if found := await self.sweep():
                    log.info("post-call analysis: %d ended call(s) left unanalyzed queued again", found)
            except DATABASE_ERRORS as exc:
                log.warning("post-call analysis: could not look for unanalyzed calls: %s", exc)
            await asyncio.sleep(self._sweep_seconds)

    async def close(self) -> None:
        """Let running analyses finish for a while, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks.values()), timeout=self._grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


POST_CALL = web.AppKey("post_call", PostCallAnalyzer)


async def post_call_context(app: web.Application) -> AsyncIterator[None]:
    """The engine's PostCallAnalyzer and its sweep, for as long as the app runs.

    It starts after recovery (it needs NODE_ID) and after the provider clients, which close after its grace period.
    """
    analyzer = PostCallAnalyzer(PostCallDeps.from_app(app), node_id=app[NODE_ID])
    app[POST_CALL] = analyzer
    sweeper = asyncio.create_task(analyzer.run(), name="post-call sweep")
    try:
        yield
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await analyzer.close()
