"""Whole cloud-pipeline calls under load: voice-to-voice latency, replies during pauses, engine CPU and memory per call.

    .venv/bin/python -m bench.bench_cloud --calls 1,10,100 --turns 3

The fake providers (Deepgram, OpenAI, ElevenLabs; tests/fakes) run in this process and pace like real ones (see
`Delays`): Deepgram ends a turn after `endpointing` = 300 ms of audio silence and sends that final 200 ms later,
and answers `Finalize` after 80 ms (when the FakeDeepgram accepts those delays); the model's first token comes
after 300 ms, then 60 tokens a second; the synthesizer's first byte after 150 ms, then audio at 4x real time. The
agents have the engine's default configuration. For each N, a fresh `dialtone serve` process (pinned to one CPU)
takes N concurrent calls from Twilio-protocol callers (bench/cloud_callers.py; this process, pinned to the other
CPU, with the fakes): in turn plain, pausing mid-sentence (400-600 ms inside one sentence), plain, and
caller-first (no opening). Each hears the opening, speaks, hears the reply out, and speaks again, `--turns` times,
then hangs up.

Per N it prints and stores (bench/results/cloud-<timestamp>.json, and a PNG plot when matplotlib is installed):
voice-to-voice p50/p95/p99 beside the providers' unavoidable delays, replies heard during a mid-sentence pause,
speculative replies used and discarded (the engine's /metrics counters, when it has them), turns answered,
playback gaps, the engine's CPU seconds per call-minute over whole calls (from before the first call to the end
of the last one's post-call work, idle floor included) and its idle floor, engine RSS per call, the engine's own
per-stage breakdown (CallTurn.latency), and this process's own load (so a saturated harness is visible rather
than silently blamed on the engine).

The harness keeps out of the way: its cyclic garbage collector is off during a round (a full collection of a few
hundred calls' objects stalled it for 50-250 ms, which showed up as engine latency and playback gaps), and the
fakes' request records are emptied as it goes. The engine gets a `sitecustomize` (written to a temporary folder
put first on its PYTHONPATH; no engine code changes) that records its own GC pauses (bench/stall_watch.py),
reported per round. With `--turns 0` a round is instead a window of `--seconds` of steady talk, and the calls
hang up only once every turn asked in the window has been heard out.
Options: the providers' pacing (--endpointing-ms, --final-delay-ms, --finalize-delay-ms, --llm-first-token-ms,
--tokens-per-second, --tts-first-byte-ms, --tts-speed), --no-recording turns the agents' recording off, --think S
sets the callers' pause between turns, --profile-calls N samples the engine's stack every ms of its CPU time in
round N (bench/cpu_sampler.py; --profiler cprofile traces it with cProfile instead) and --py-spy N samples it with
py-spy (figures distorted), --stalls records the engine's loop stalls (a 2 ms timer firing late
under uvloop) and this process's slow callbacks and late timers, and prints what overlapped each round's slowest
turns. --knowledge runs each N twice in the same run: as above, then with every agent linked to one of 10
knowledge bases (100 documents of ~10 pages, bench/bench_knowledge.py, ingested before the rounds) and its passages
put in the model's context on each caller turn (llm.knowledge_in_context); those rows are marked "kb".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import inspect
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import psutil
from aiohttp import web

from bench.bench_calls import REPO, _free_port, _wait_healthy
from bench.bench_knowledge import ingest, seed_knowledge_bases
from bench.cloud_callers import (
    CallerResult,
    CloudCaller,
    ReplyBook,
    TurnStats,
    Utterance,
    paused_utterance,
    speech_utterance,
    tone_utterance,
)
from bench.stall_watch import (
    ENV_LOG,
    ENV_LOOP,
    Event,
    StallWatch,
    gc_figures,
    overlapping,
    read_events,
)
from config.agent import parse_agent_configuration
from config.settings import Settings
from pipelines.conversation.chunking import SentenceChunker
from storage import agents, organizations, phone_numbers
from storage.embedded import start_embedded
from storage.enums import AgentStatus, CallerType, Plan
from storage.errors import AlreadyExists
from storage.migrate import migrate
from storage.pool import create_pool, ensure_database
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.openai_chat import FakeOpenAI, Step

RESULTS = Path(__file__).resolve().parent / "results"

MS_PER_CHAR: Final = 60
"""The fake ElevenLabs speaks 60 ms per character (about 170 words a minute)."""


@dataclass(frozen=True, slots=True)
class Delays:
    """How fast the fake providers are (ms; tokens per second): the pace of real ones, not the engine's doing."""

    endpointing: int = 300
    """Deepgram `endpointing` (the engine's default): the fake ends a turn after this much audio silence."""
    final_delay: int = 200
    """The fake Deepgram sends that final (`speech_final`) this long after the endpointing silence was reached."""
    finalize_delay: int = 80
    """The fake Deepgram answers a `Finalize` this long after receiving it."""
    llm_first_token: int = 300
    tokens_per_second: float = 60.0
    """The fake model's pace after its first token."""
    tts_first_byte: int = 150
    tts_speed: float = 4.0
    """The fake ElevenLabs sends audio this many times faster than real time after its first byte (0: at once)."""

    @property
    def token_interval_ms(self) -> float:
        """Milliseconds between two of the model's tokens after the first."""
        return 1000 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0

    @property
    def unavoidable(self) -> int:
        """The providers' unavoidable delays: Deepgram's answer to `Finalize`, the first token, the first byte.

        The least any engine could take from the caller's last voiced frame to the reply's first audio with these
        providers, were it to know the turn ended at once (the path through endpointing takes longer: `total`).
        """
        return self.finalize_delay + self.llm_first_token + self.tts_first_byte

    @property
    def total(self) -> int:
        """The providers' delays on the endpointing path: silence, Deepgram's final, first token, first byte."""
        return self.endpointing + self.final_delay + self.llm_first_token + self.tts_first_byte

    def formula(self) -> str:
        """How the diagnostic engine-added latency is computed, in words."""
        return (
            "voice-to-voice = arrival of the reply's first media frame at the caller - send time of the caller's "
            f"last voiced frame (both on the bench's clock). engine-added (diagnostic) = voice-to-voice - "
            f"{self.unavoidable} ms, the providers' unavoidable delays: {self.finalize_delay} (Deepgram's answer to "
            f"Finalize) + {self.llm_first_token} (LLM first token) + {self.tts_first_byte} (TTS first byte). It "
            f"holds what the engine waits to decide the turn is over (through endpointing: {self.endpointing} ms of "
            f"silence + {self.final_delay} ms for the final), the model's tokens up to the first speakable clause "
            f"({self.tokens_per_second:g} tokens/s after the first), loopback transport and the bench process's own "
            "event-loop delay (see 'bench tick lag')."
        )


DEFAULT_DELAYS = Delays()
FIRST_SENTENCE = "Hello, thanks for calling Dialtone."
REPLIES = (
    "Sure, I can help with that.",
    "Of course. Which day would suit you best?",
    "Thanks, I have noted that down. Is there anything else?",
)
"""The model's reply to a conversation holding k caller turns is REPLIES[k % 3]: one or two sentences."""
CALLER_TEXT = "Can you tell me your opening hours"
TRANSCRIPT = "Can you tell me your opening hours?"
PAUSE_FIRST, PAUSE_REST = "I would like to", "book a table for two."
PAUSE_TRANSCRIPT = f"{PAUSE_FIRST} | {PAUSE_REST}"
PAUSES_MS = (400, 500, 600)
"""The mid-sentence pauses a pausing caller makes (one at random per turn)."""
PAUSE_KEYTERM = "table"
"""The pausing callers' agent asks Deepgram for this keyterm: how the fake tells their streams apart."""
VOICE_ID = "21m00Tcm4TlvDq8ikWAM"

# --------------------------------------------------------------------------------------------------- fakes


class BenchOpenAI(FakeOpenAI):
    """The fake OpenAI, answering REPLIES[k % 3] to a conversation with k caller turns (so callers know the reply).

    It overrides the fake's private reply picker: `default_reply` sees only the last user message, and the
    benchmark needs the reply to depend on the turn. It counts the conversation requests whose last caller turn is
    only the half sentence before a mid-sentence pause (`half_sentence_requests`: speculation on a pause, or a
    reply to it).
    """

    half_sentence_requests = 0

    def _next_reply(self, messages: Sequence[Mapping[str, Any]]) -> list[Step]:
        user = [message for message in messages if message.get("role") == "user"]
        if user and str(user[-1].get("content") or "").strip().rstrip(".,") == PAUSE_FIRST:
            self.half_sentence_requests += 1
        return [REPLIES[len(user) % len(REPLIES)]]


_STREAM_TRANSCRIPT: contextvars.ContextVar[str] = contextvars.ContextVar("stream_transcript", default=TRANSCRIPT)


class BenchDeepgram(FakeDeepgram):
    """The fake Deepgram, recognizing the pausing callers' sentence on their streams and CALLER_TEXT on the others.

    A stream is a pausing caller's when its agent asked for the keyterm PAUSE_KEYTERM; the transcript is chosen per
    socket through a context variable set in the socket's own handler task (the fake's script is otherwise shared).
    """

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        pausing = PAUSE_KEYTERM in request.query.getall("keyterm", [])
        _STREAM_TRANSCRIPT.set(PAUSE_TRANSCRIPT if pausing else TRANSCRIPT)
        return await super()._listen(request)

    def _peek_transcript(self) -> str:
        return _STREAM_TRANSCRIPT.get()

    def _take_transcript(self) -> str:
        return _STREAM_TRANSCRIPT.get()


def deepgram_pacing(delays: Delays) -> dict[str, Any]:
    """The fake Deepgram's pacing keywords it accepts (older fakes have neither: the bench runs on both)."""
    accepted = inspect.signature(FakeDeepgram.__init__).parameters
    wanted = {"final_delay_ms": delays.final_delay, "finalize_delay_ms": delays.finalize_delay}
    return {name: value for name, value in wanted.items() if name in accepted}


def spoken_bytes(text: str) -> int:
    """μ-law bytes of the fake ElevenLabs' speech of `text`, as the engine cuts it into sentences."""
    chunker = SentenceChunker()
    sentences = [*chunker.push(text), chunker.flush()]
    return sum(len(s.strip()) for s in sentences if s) * MS_PER_CHAR * 8


def reply_book() -> ReplyBook:
    """Audio per reply: the opening is the first sentence and the reply to no caller turn, in one utterance."""
    return ReplyBook(spoken_bytes(FIRST_SENTENCE) + spoken_bytes(REPLIES[0]), [spoken_bytes(r) for r in REPLIES])


@contextlib.asynccontextmanager
async def fakes(delays: Delays) -> AsyncIterator[tuple[BenchDeepgram, BenchOpenAI, FakeElevenLabs]]:
    """The three providers on loopback, paced by `delays` (endpointing is the agent's setting)."""
    chunk_ms = 100
    async with (
        BenchDeepgram(
            api_key="dg-bench", default_transcript=TRANSCRIPT, idle_timeout_seconds=30, **deepgram_pacing(delays)
        ) as deepgram,
        BenchOpenAI(
            api_key="sk-bench",
            first_token_delay_ms=delays.llm_first_token,
            token_interval_ms=delays.token_interval_ms,
        ) as openai,
        FakeElevenLabs(
            api_key="el-bench",
            first_byte_delay_ms=delays.tts_first_byte,
            ms_per_char=MS_PER_CHAR,
            chunk_ms=chunk_ms,
            chunk_interval_ms=round(chunk_ms / delays.tts_speed) if delays.tts_speed > 0 else 0,
        ) as eleven,
    ):
        yield deepgram, openai, eleven


# --------------------------------------------------------------------------------------------------- CPUs


STALLS: StallWatch | None = None
"""This process's GC pauses (and with --stalls its loop's stalls): the harness's own delays."""


def pin_threads(pid: int, cpu: int) -> None:
    """Pin every thread of process `pid` to `cpu` (sched_setaffinity on a pid moves only its main thread)."""
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread.id, {cpu})


def affinity_of(pid: int) -> list[int]:
    """The CPUs any thread of `pid` may run on."""
    cpus: set[int] = set()
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):
            cpus |= os.sched_getaffinity(thread.id)
    return sorted(cpus)


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of a process (threads included)."""
    times = process.cpu_times()
    return float(times.user + times.system)


def run_delay_ms(pid: int) -> float:
    """How long the threads of `pid` have waited runnable for a CPU, in all (ms; 0 without /proc schedstat)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e6


def postgres_processes(pgdata: Path | None) -> list[psutil.Process]:
    """The embedded server's postmaster and its backends (empty when DATABASE_URL was given)."""
    if pgdata is None:
        return []
    try:
        postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]
    except (OSError, ValueError, psutil.Error):
        return []


def postgres_cpu(pgdata: Path | None) -> float:
    """CPU seconds of the embedded server's processes alive now."""
    total = 0.0
    for process in postgres_processes(pgdata):
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(process)
    return total


# --------------------------------------------------------------------------------------------------- engine


@dataclass(slots=True)
class Engine:
    """A running `dialtone serve`."""

    process: asyncio.subprocess.Process
    ps: psutil.Process
    base: str
    log_path: Path


async def start_engine(
    *, env: dict[str, str], cwd: Path, port: int, cpu: int | None, log_path: Path, profile: Path | None
) -> Engine:
    """Start `dialtone serve` on 127.0.0.1:`port`, pinned to `cpu`; when `profile` is given, under cProfile, or
    under bench/cpu_sampler.py for a `.folded` file."""
    command = [sys.executable]
    if profile is not None and profile.suffix == ".folded":
        command += ["-m", "bench.cpu_sampler", str(profile)]
    elif profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += ["-m", "engine.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    taskset = shutil.which("taskset")
    if cpu is not None and taskset:
        command = [taskset, "-c", str(cpu), *command]
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(*command, env=env, cwd=cwd, stderr=log, stdout=log)
    if cpu is not None and not taskset:
        pin_threads(process.pid, cpu)
    engine = Engine(process, psutil.Process(process.pid), f"http://127.0.0.1:{port}", log_path)
    try:
        await asyncio.wait_for(_wait_healthy(engine.base), timeout=60)
    except BaseException:
        await stop_engine(engine)
        raise RuntimeError(f"the engine did not become healthy; its log:\n{_tail(log_path, 30)}") from None
    return engine


async def stop_engine(engine: Engine, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within `timeout`."""
    if engine.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        engine.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(engine.process.wait(), timeout=timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            engine.process.kill()
        await engine.process.wait()


async def start_py_spy(engine: Engine, out: Path) -> asyncio.subprocess.Process | None:
    """Sample the engine's stacks with py-spy (a dev tool, if installed) into `out`, collapsed ("folded") format."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("      py-spy is not installed: no stack samples")
        return None
    command = [py_spy, "record", "--nonblocking", "--pid", str(engine.ps.pid), "--rate", "100", "--format", "raw"]
    command += ["-o", str(out)]
    print(f"      sampling the engine with py-spy into {out}")
    return await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


async def stop_py_spy(process: asyncio.subprocess.Process) -> None:
    """Stop py-spy (SIGINT: it writes its samples then exits)."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(process.wait(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()


def _tail(path: Path, lines: int) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def engine_env(base: Mapping[str, str], **values: str) -> dict[str, str]:
    """The bench's environment without Dialtone, Twilio or provider settings, plus `values`."""
    prefixes = ("DIALTONE_", "TWILIO_", "DEEPGRAM_", "OPENAI_", "ELEVENLABS_", "DATABASE_URL")
    env = {k: v for k, v in base.items() if not k.startswith(prefixes)}
    return env | values


# --------------------------------------------------------------------------------------------------- database


CALL_KINDS: Final = ("plain", "pausing", "plain", "caller-first")
"""Call i is of kind CALL_KINDS[i % 4]: half plain, a quarter pause mid-sentence, a quarter speak first."""


@dataclass(frozen=True, slots=True)
class Line:
    """The seeded organization and its numbers, one per kind of call, each answered by its agent."""

    organization_id: str
    numbers: Mapping[str, str]
    """Call kind → the number its callers dial."""


def agent_configuration(recording: bool, delays: Delays, kind: str = "plain") -> dict[str, Any]:
    """The cloud agent with the engine's defaults (Deepgram nova-3 endpointing 300, gpt-4o-mini, ElevenLabs).

    `pausing`: the same with the keyterm PAUSE_KEYTERM (how the fake Deepgram knows those streams);
    `caller-first`: the same without an opening, so the caller speaks first.
    """
    stt: dict[str, Any] = {"provider": "deepgram"}
    if delays.endpointing != DEFAULT_DELAYS.endpointing:
        stt["endpointing"] = delays.endpointing
    if kind == "pausing":
        stt["keywords"] = [PAUSE_KEYTERM]
    configuration: dict[str, Any] = {
        "stt": stt,
        "llm": {"provider": "openai"},
        "tts": {"provider": "elevenlabs", "voice": VOICE_ID},
        "prompt": "You are a concise phone agent for a benchmark.",
        "recording": recording,
    }
    if kind != "caller-first":
        configuration["firstSentence"] = FIRST_SENTENCE
    return configuration


KNOWLEDGE_FACTS: Final = (
    "Our opening hours are nine to five on weekdays and ten to two on Saturdays.",
    "To book a table for two or more, tell us the day and the time.",
)
"""Sentences the knowledge bases' pages hold, about what the callers ask (CALLER_TEXT, the booking sentence)."""


async def seed(pool: asyncpg.Pool, *, recording: bool, delays: Delays, knowledge: bool = False) -> Line:
    """One organization with plenty of credits and, per kind of call, an inbound number and the agent answering it.

    `knowledge`: the agents are linked to knowledge bases (one each) with their passages in the model's context.

    Its plan is ENTERPRISE, which has no limit on concurrent calls by default: on PRO (50) half of a 100-call round
    was refused as "all lines busy", and the round measured 50 concurrent calls plus 50 refusals.
    """
    tag = secrets.token_hex(4)
    organization = await organizations.create_organization(
        pool, name=f"Cloud bench {tag}", slug=f"bench-cloud-{tag}", plan=Plan.ENTERPRISE, credits=10**9
    )
    kb_ids: list[str] = []
    if knowledge:
        kb_ids, _ = await seed_knowledge_bases(pool, organization.id, random.Random(7), facts=KNOWLEDGE_FACTS)
    numbers: dict[str, str] = {}
    for index, kind in enumerate(dict.fromkeys(CALL_KINDS)):
        number_id, numbers[kind] = await _seed_number(pool, organization.id, kind)
        configuration = agent_configuration(recording, delays, kind)
        if knowledge:
            configuration["llm"]["knowledge_in_context"] = True
        agent = await agents.create_agent(
            pool,
            organization_id=organization.id,
            name=f"Cloud bench agent ({kind})",
            status=AgentStatus.ACTIVE,
            caller_type=CallerType.INBOUND,
            phone_number_id=number_id,
            configuration=parse_agent_configuration(configuration).to_json(),
        )
        if knowledge:
            kb_id = kb_ids[index % len(kb_ids)]
            await agents.link_knowledge_base(
                pool, organization_id=organization.id, agent_id=agent.id, knowledge_base_id=kb_id
            )
    if knowledge:
        print(f"knowledge bases: {len(kb_ids)} ingested in {await ingest(pool, Settings()):.1f} s")
    return Line(organization.id, numbers)


async def _seed_number(pool: asyncpg.Pool, organization_id: str, kind: str) -> tuple[str, str]:
    """A free +15555550xxx number for the organization: its id and its number."""
    for _ in range(50):
        try:
            number = await phone_numbers.create_phone_number(
                pool,
                organization_id=organization_id,
                phone_number=f"+1555555{random.randrange(100, 1000):04d}",
                label=f"Cloud bench line ({kind})",
            )
            return number.id, number.phone_number
        except AlreadyExists:
            continue
    raise RuntimeError("no free +15555550xxx number to seed")


async def engine_turns(
    pool: asyncpg.Pool, calls: Mapping[str, float], since: float, until: float
) -> list[dict[str, Any]]:
    """The agent turns with a latency breakdown whose audio started between `since` and `until` (loop clock).

    `calls` maps each CallLog id to when its media stream connected (loop clock), where the stream's own
    milliseconds (CallTurn.startMs) begin, give or take the first frame's trip.
    """
    rows = await pool.fetch(
        'SELECT "callLogId", "startMs", "latencyMs", "latency" FROM "CallTurn" WHERE "callLogId" = ANY($1::text[])'
        ' AND "speaker" = \'agent\' AND "latency" IS NOT NULL',
        list(calls),
    )
    turns = []
    for row in rows:
        started = calls[row["callLogId"]] + row["startMs"] / 1000
        if not since <= started < until:
            continue
        latency = row["latency"]
        if isinstance(latency, str):
            latency = json.loads(latency)
        turns.append({"latencyMs": row["latencyMs"], **latency, "_call": row["callLogId"], "_started": started})
    return turns


async def call_endings(pool: asyncpg.Pool, call_log_ids: Sequence[str]) -> dict[str, int]:
    """How this round's CallLogs ended: status/endReason → count."""
    rows = await pool.fetch(
        'SELECT "status", "metadata" FROM "CallLog" WHERE "id" = ANY($1::text[])', list(call_log_ids)
    )
    endings: dict[str, int] = {}
    for row in rows:
        metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"] or "{}")
        key = f"{row['status']}/{metadata.get('endReason', '?')}"
        endings[key] = endings.get(key, 0) + 1
    return endings


# --------------------------------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99, max and count."""
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "n": len(values),
    }


def median_or_none(values: Iterable[float]) -> float | None:
    """The median, None when empty."""
    values = list(values)
    return statistics.median(values) if values else None


STAGES = ("sttEndOfTurn", "llmFirstToken", "firstSentence", "ttsFirstByte", "firstFrameSent", "firstMarkEchoed")


def stage_figures(turns: Sequence[Mapping[str, Any]], delays: Delays) -> dict[str, Any]:
    """Medians of the engine's stages (ms after the caller's last voiced frame, by the engine's VAD) and of the
    engine's own share of each step (the step minus the provider delay inside it)."""

    def step(turn: Mapping[str, Any], end: str, start: str | None, provider_ms: int) -> float | None:
        if end not in turn or (start is not None and start not in turn):
            return None
        return float(turn[end] - (turn[start] if start else 0) - provider_ms)

    overheads: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
        "endOfTurn-endpointing": lambda t: step(t, "sttEndOfTurn", None, delays.endpointing),
        "firstToken-llm": lambda t: step(t, "llmFirstToken", "sttEndOfTurn", delays.llm_first_token),
        "sentence": lambda t: step(t, "firstSentence", "llmFirstToken", 0),
        "ttsFirstByte-tts": lambda t: step(t, "ttsFirstByte", "firstSentence", delays.tts_first_byte),
        "frameSent": lambda t: step(t, "firstFrameSent", "ttsFirstByte", 0),
    }
    p95_overheads = {}
    medians = {}
    for name, how in overheads.items():
        values = [v for v in (how(t) for t in turns) if v is not None]
        medians[name] = median_or_none(values)
        p95_overheads[name] = percentile(values, 95)
    return {
        "n": len(turns),
        "stageMedianMs": {s: median_or_none(t[s] for t in turns if s in t) for s in STAGES},
        "engineVoiceToVoiceMs": spread([float(t["latencyMs"]) for t in turns if t.get("latencyMs") is not None]),
        "engineStepMedianMs": medians,
        "engineStepP95Ms": p95_overheads,
    }


@dataclass(slots=True)
class Window:
    """The measured window of one round, on the loop clock and the wall clock."""

    start: float = 0.0
    end: float = 0.0
    wall_start: datetime = field(default_factory=lambda: datetime.now(UTC))
    wall_end: datetime = field(default_factory=lambda: datetime.now(UTC))
    lag_marks: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Length of the window."""
        return self.end - self.start

    def holds(self, at: float | None) -> bool:
        """Whether a loop-clock instant falls inside the window."""
        return at is not None and self.start <= at < self.end


def slowest_turns(
    results: Sequence[CallerResult],
    engine_turns: Sequence[Mapping[str, Any]],
    window: Window,
    delays: Delays,
    *,
    to_wall: float,
    run_delay: Sequence[tuple[float, float]],
) -> list[dict[str, Any]]:
    """The window's slowest 1.5% of answered turns (at least 5), on the wall clock, each with the engine's own
    breakdown of it (its CallTurn starting nearest the reply's arrival) when one matches, and how long the engine
    waited for a CPU over the `run_delay` samples (wall time, cumulative ms) around it."""

    def delay_between(since: float, until: float) -> float | None:
        before = [ms for at, ms in run_delay if at <= since]
        after = [ms for at, ms in run_delay if at >= until]
        return round(after[0] - before[-1], 1) if before and after else None

    answered = [
        (turn, result)
        for result in results
        for turn in result.turns
        if turn.index > 0 and window.holds(turn.asked_at) and turn.first_audio_at is not None
    ]
    answered.sort(key=lambda pair: -(pair[0].voice_to_voice_s or 0.0))
    by_call: dict[str, list[Mapping[str, Any]]] = {}
    for engine_turn in engine_turns:
        by_call.setdefault(engine_turn["_call"], []).append(engine_turn)
    slowest = []
    for turn, result in answered[: max(5, math.ceil(len(answered) * 0.015))]:
        asked, heard = turn.asked_at or 0.0, turn.first_audio_at or 0.0
        mine = by_call.get(result.call_log_id or "", [])
        engine = min(mine, key=lambda e: abs(e["_started"] - heard), default=None)
        if engine is not None and abs(engine["_started"] - heard) > 0.5:
            engine = None
        slowest.append(
            {
                "call": result.call_sid[-6:],
                "askedAt": asked + to_wall,
                "heardAt": heard + to_wall,
                "addedMs": round((heard - asked) * 1000 - delays.total, 1),
                "engine": None if engine is None else {k: engine[k] for k in ("latencyMs", *STAGES) if k in engine},
                "engineRunDelayMs": delay_between(asked + to_wall, heard + to_wall),
            }
        )
    return slowest


def stall_figures(
    engine_events: list[Event], bench_events: list[Event], slowest: list[dict[str, Any]], since: float, until: float
) -> dict[str, Any]:
    """The window's stalls in the engine and this process; adds the worst of each kind to each of the `slowest`
    turns."""

    def summary(events: list[Event]) -> dict[str, Any]:
        inside = overlapping(events, since, until)
        late = [ms for kind, _, ms, _ in inside if kind == "late"]
        by_label: dict[str, list[float]] = {}
        for kind, _, ms, label in inside:
            if kind == "slow":
                by_label.setdefault(label, []).append(ms)
        top = sorted(by_label.items(), key=lambda item: -max(item[1]))[:6]
        return {
            "lateTimersOver10Ms": sum(1 for ms in late if ms >= 10),
            "lateTimersOver20Ms": sum(1 for ms in late if ms >= 20),
            "lateTimerMaxMs": round(max(late, default=0.0), 1),
            "slowCallbacks": sum(len(v) for v in by_label.values()),
            "slowestCallbacks": [
                {"label": label, "count": len(v), "maxMs": round(max(v), 1), "totalMs": round(sum(v), 1)}
                for label, v in top
            ],
        }

    def worst(events: list[Event], asked: float, heard: float) -> str:
        kinds: dict[str, Event] = {}
        for event in overlapping(events, asked, heard):
            kind = "gc" if event[0].startswith("gc") else event[0]
            if kind not in kinds or event[2] > kinds[kind][2]:
                kinds[kind] = event
        return ", ".join(
            f"{e[0]} {e[2]:.0f}ms{' ' + e[3][:40] if e[3] and e[0] == 'slow' else ''}" for e in kinds.values()
        )

    for turn in slowest:
        turn["engineEvents"] = worst(engine_events, turn["askedAt"], turn["heardAt"])
        turn["benchEvents"] = worst(bench_events, turn["askedAt"], turn["heardAt"])
    return {"engine": summary(engine_events), "bench": summary(bench_events)}


def turn_figures(turns: Sequence[TurnStats], delays: Delays) -> dict[str, Any]:
    """Latency, answering and playback figures of the caller turns asked in the window."""
    answered = [t for t in turns if t.first_audio_at is not None]
    v2v = [t.voice_to_voice_s * 1000 for t in answered if t.voice_to_voice_s is not None]
    heard = [t for t in answered if t.ended_by in ("expected", "silence")]
    lateness = [max(t.max_lateness_s, 0.0) * 1000 for t in heard if t.first_played_at is not None]
    return {
        "asked": len(turns),
        "answered": len(answered),
        "voiceToVoiceMs": spread(v2v),
        "providersUnavoidableMs": delays.unavoidable,
        "providersEndpointingPathMs": delays.total,
        "engineAddedMs": spread([v - delays.unavoidable for v in v2v]),
        "pausedTurns": sum(1 for t in turns if t.paused),
        "repliesDuringPause": sum(1 for t in turns if t.reply_in_pause),
        "utterances": len(heard),
        "utterancesWithGap": sum(1 for t in heard if t.gaps),
        "gapMsTotal": round(sum(t.gap_s for t in heard) * 1000, 1),
        "worstLatenessMs": spread(lateness),
        "minLeadMs": min((-t.max_lateness_s * 1000 for t in heard if math.isfinite(t.max_lateness_s)), default=None),
        "incompleteReplies": sum(1 for t in heard if t.received_bytes != t.expected_bytes),
        "endedBy": {how: sum(1 for t in turns if t.ended_by == how) for how in {t.ended_by for t in turns}},
    }


# --------------------------------------------------------------------------------------------------- a round


@dataclass(slots=True)
class RoundSetup:
    """What every round shares."""

    args: argparse.Namespace
    line: Line
    pool: asyncpg.Pool
    database_url: str
    pgdata: Path | None
    state_root: Path
    auth_token: str
    utterances: Mapping[str, Sequence[Utterance]]
    """Call kind → what its callers say (one at random per turn)."""
    replies: ReplyBook
    delays: Delays
    stamp: str


ENGINE_HOOK = f"""\
# Written by bench/bench_cloud.py into a temporary folder first on the engine's PYTHONPATH: records the engine's
# GC pauses (and, when {ENV_LOOP}=1, its slow callbacks and late timers) into ${ENV_LOG} when it exits.
from bench.stall_watch import install_from_env

install_from_env()
"""


async def run_round(setup: RoundSetup, calls: int, profile: Path | None) -> dict[str, Any]:
    """Start fresh fakes and a fresh engine, warm it with one call, then measure `calls` concurrent calls."""
    args = setup.args
    state_dir = setup.state_root / f"n{calls}"
    hooks = state_dir / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(ENGINE_HOOK)
    events_log = state_dir / "engine-stalls.json"
    async with fakes(setup.delays) as (deepgram, openai, eleven):
        env = engine_env(
            os.environ,
            DATABASE_URL=setup.database_url,
            DIALTONE_STATE_DIR=str(state_dir),
            DIALTONE_LOG_LEVEL="WARNING",
            TWILIO_AUTH_TOKEN=setup.auth_token,
            DEEPGRAM_API_KEY="dg-bench",
            OPENAI_API_KEY="sk-bench",
            ELEVENLABS_API_KEY="el-bench",
            DEEPGRAM_URL=deepgram.url,
            OPENAI_BASE_URL=openai.base_url,
            ELEVENLABS_URL=eleven.url,
            PYTHONPATH=os.pathsep.join([str(hooks), str(REPO)]),
            **{ENV_LOG: str(events_log), ENV_LOOP: "1" if args.stalls else "0"},
        )
        engine = await start_engine(
            env=env,
            cwd=state_dir,
            port=_free_port(),
            cpu=None if args.no_pin else args.engine_cpu,
            log_path=state_dir / "engine.log",
            profile=profile,
        )
        try:
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=20)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                await _warm_up(setup, http, engine)
                result = await _idle_then_measure(setup, http, engine, (deepgram, openai, eleven), calls)
        finally:
            await stop_engine(engine)
            problems = log_problems(engine.log_path)
            for line, count in list(problems.items())[:5]:
                print(f"      engine log ({count}x): {line}")
            if any(line.startswith("ERROR") for line in problems):
                kept = args.out / f"{setup.stamp}-engine-n{calls}.log"
                shutil.copyfile(engine.log_path, kept)
                print(f"      engine errors: its log is kept as {kept}")
    since, until = (datetime.fromisoformat(at).timestamp() for at in result["windowUtc"])
    engine_events = read_events(events_log)
    result["engineGcPauses"] = gc_figures(engine_events, since, until)
    if args.stalls:
        bench_events = STALLS.events if STALLS else []
        result["stalls"] = stall_figures(engine_events, bench_events, result["slowestTurns"], since, until)
    result["engineLogProblems"] = problems
    return result


POST_CALL_MAX_S: Final = 30.0
"""The longest a whole-call round waits after the last hang-up for the engine's post-call work to finish."""
IDLE_SECONDS: Final = 6.0
"""How long the engine's idle floor (no call) is sampled before each round."""


async def _idle_then_measure(
    setup: RoundSetup,
    http: aiohttp.ClientSession,
    engine: Engine,
    providers: tuple[BenchDeepgram, BenchOpenAI, FakeElevenLabs],
    calls: int,
) -> dict[str, Any]:
    """Sample the warmed engine's idle floor (CPU, RSS), then measure `calls` calls with the harness kept quiet."""
    deepgram, openai, eleven = providers
    openai.half_sentence_requests = 0
    await asyncio.sleep(2.0)  # the warm-up calls' post-call work
    idle_rss = statistics.median([engine.ps.memory_info().rss for _ in range(3)])
    idle_cpu = cpu_seconds(engine.ps)
    await asyncio.sleep(IDLE_SECONDS)
    idle_cpu_pct = 100 * (cpu_seconds(engine.ps) - idle_cpu) / IDLE_SECONDS
    # The harness must not stall: its cyclic GC is off for the round (full collections of a few hundred calls'
    # objects pause it for 50-250 ms), and the fakes' records, which only grow, are emptied as it goes. What
    # little cyclic garbage piles up meanwhile is collected afterwards.
    gc.collect()
    gc.disable()
    janitor = asyncio.create_task(_sweep_fakes(deepgram, openai, eleven))
    spy = None
    if setup.args.py_spy == calls:
        spy = await start_py_spy(engine, setup.args.out / f"{setup.stamp}-engine-n{calls}.folded")
    try:
        result = await _measure(setup, http, engine, calls, idle_rss=idle_rss, idle_cpu_percent=idle_cpu_pct)
    finally:
        janitor.cancel()
        if spy is not None:
            await stop_py_spy(spy)
        gc.enable()
        gc.collect()
    return result | {
        "engineIdleCpuPercent": round(idle_cpu_pct, 2),
        "engineIdleCpuSecondsPerMinute": round(idle_cpu_pct * 60 / 100, 3),
        "halfSentenceModelRequests": openai.half_sentence_requests,
        "deepgramPacing": deepgram_pacing(setup.delays),
    }


def log_problems(path: Path) -> dict[str, int]:
    """The engine log's WARNING and ERROR lines, without their time and with digits blurred, counted."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if " WARNING " not in line and " ERROR " not in line:
                continue
            key = re.sub(r"\b(CA|MZ)[0-9a-f]{32}\b", "<sid>", line.split(" ", 1)[-1])
            key = re.sub(r"\b[a-z0-9]{20,}\b", "<id>", key)
            key = re.sub(r"\d+", "#", key)[:200]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


async def _sweep_fakes(deepgram: FakeDeepgram, openai: BenchOpenAI, eleven: FakeElevenLabs) -> None:
    """Empty the fakes' records of past requests every few seconds (the benchmark never reads them)."""
    while True:
        await asyncio.sleep(2.0)
        deepgram.listens.clear()  # each live socket's handler keeps its own record
        openai.requests.clear()
        eleven.texts.clear()
        eleven.sockets.clear()
        eleven.http_requests.clear()


def _caller(
    setup: RoundSetup,
    http: aiohttp.ClientSession,
    base: str,
    stop: asyncio.Event,
    *,
    seed: int,
    max_turns: int | None = None,
    kind: str = "plain",
) -> CloudCaller:
    return CloudCaller(
        http,
        base_url=base,
        to=setup.line.numbers[kind],
        from_=f"+1500555{seed % 10000:04d}",
        auth_token=setup.auth_token,
        utterance=setup.utterances[kind],
        replies=setup.replies,
        stop=stop,
        rng=random.Random(seed),
        reply_timeout_s=setup.args.reply_timeout,
        max_turns=max_turns,
        think_s=(max(setup.args.think - 0.35, 0.0), setup.args.think + 0.35),
        caller_first=kind == "caller-first",
    )


async def _warm_up(setup: RoundSetup, http: aiohttp.ClientSession, engine: Engine) -> None:
    """One short call of each kind (two turns) so imports, SDK clients and pools are warm before measuring."""
    for number, kind in enumerate(dict.fromkeys(CALL_KINDS)):
        caller = _caller(setup, http, engine.base, asyncio.Event(), seed=-1 - number, max_turns=2, kind=kind)
        result = await caller.run()
        if result.error or not any(t.first_audio_at for t in result.turns if t.index > 0):
            raise RuntimeError(
                f"the warm-up call ({kind}) failed ({result.error or 'no reply'}); engine log:\n"
                f"{_tail(engine.log_path, 30)}"
            )


@dataclass(slots=True)
class Observed:
    """What was sampled of the processes over the measured window."""

    window: Window
    engine_cpu: float = 0.0
    engine_system_cpu: float = 0.0
    """Of `engine_cpu`, the kernel's share (system calls: socket reads and writes, timers, epoll)."""
    bench_cpu: float = 0.0
    postgres_cpu: float = 0.0
    core_busy: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    engine_cpu_percent: list[float] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    run_delay: list[tuple[float, float]] = field(default_factory=list)
    """(wall time, the engine's cumulative ms runnable but not running): its waits for a CPU, sampled each second."""
    gc: dict[str, Any] = field(default_factory=dict)
    calls_live_metric: float | None = None
    speculation: dict[str, float] = field(default_factory=dict)
    """The engine's speculative-reply counters at the window's end (empty when it has none)."""


async def _observe(
    setup: RoundSetup,
    engine: Engine,
    http: aiohttp.ClientSession,
    callers: Sequence[CloudCaller],
    tasks: Sequence[asyncio.Task[CallerResult]],
    *,
    whole_calls: asyncio.Event | None = None,
    idle_cpu_percent: float = 0.0,
) -> Observed:
    """Sample the engine, this process and the database, with the calls running.

    For `--seconds` (a window of steady talk), or with `whole_calls`: from now (before the first call is placed)
    until every call has ended (`whole_calls` set) and the engine's CPU is back to its idle level (post-call work
    done), so the window holds whole calls: setup, turns, teardown and the idle floor in between.
    """
    loop = asyncio.get_running_loop()
    bench = psutil.Process()
    window = Window()
    seen = Observed(window)
    speculations0 = _speculation_counters(await engine_metrics(http, engine.base))  # warm-up calls' excluded
    window.start, window.wall_start = loop.time(), datetime.now(UTC)
    lag_from = [len(c.result.tick_lag_ms) for c in callers]
    gc_from = time.time()
    engine0, bench0, pg0 = cpu_seconds(engine.ps), cpu_seconds(bench), postgres_cpu(setup.pgdata)
    system0 = engine.ps.cpu_times().system
    cores0 = psutil.cpu_times(percpu=True)
    seen.run_delay.append((time.time(), run_delay_ms(engine.ps.pid)))
    last_cpu, last_t = engine0, loop.time()
    quiet_since: float | None = None
    ended_at: float | None = None

    def more() -> float:
        """Seconds to sample before looking again; 0 when the window is over."""
        nonlocal ended_at
        if whole_calls is None:
            left = float(setup.args.seconds) - (loop.time() - window.start)
            return max(0.0, min(1.0, left))
        if not whole_calls.is_set():
            return 0.5
        ended_at = ended_at or loop.time()
        # Post-call work (recording, analysis, webhooks) is done once the engine is back near idle for 1 s.
        settled = quiet_since is not None and loop.time() - quiet_since >= 1.0
        return 0.0 if settled or loop.time() - ended_at > POST_CALL_MAX_S else 0.5

    while (step := more()) > 0:
        await asyncio.sleep(step)
        seen.rss.append(engine.ps.memory_info().rss)
        seen.run_delay.append((time.time(), run_delay_ms(engine.ps.pid)))
        cpu_now, t_now = cpu_seconds(engine.ps), loop.time()
        seen.engine_cpu_percent.append(100 * (cpu_now - last_cpu) / max(t_now - last_t, 1e-6))
        last_cpu, last_t = cpu_now, t_now
        if whole_calls is not None and whole_calls.is_set():  # post-call work done once back near idle for 1 s
            quiet = seen.engine_cpu_percent[-1] <= idle_cpu_percent + 2.0
            quiet_since = (quiet_since or t_now) if quiet else None
        seen.live.append(sum(1 for t in tasks if not t.done()) if tasks else sum(map(_live, callers)))
    seen.engine_cpu = cpu_seconds(engine.ps) - engine0
    seen.engine_system_cpu = engine.ps.cpu_times().system - system0
    seen.bench_cpu = cpu_seconds(bench) - bench0
    seen.postgres_cpu = postgres_cpu(setup.pgdata) - pg0
    cores1 = psutil.cpu_times(percpu=True)
    window.end, window.wall_end = loop.time(), datetime.now(UTC)
    seen.core_busy = [round(_busy_percent(a, b), 1) for a, b in zip(cores0, cores1, strict=True)]
    window.lag_marks = {i: (lag_from[i], len(c.result.tick_lag_ms)) for i, c in enumerate(callers)}
    seen.gc = gc_figures(STALLS.events, gc_from, time.time()) if STALLS is not None else {}
    metrics = await engine_metrics(http, engine.base)
    seen.calls_live_metric = metrics.get("dialtone_calls_live")
    seen.speculation = {k: v - speculations0.get(k, 0.0) for k, v in _speculation_counters(metrics).items()}
    return seen


async def _measure(
    setup: RoundSetup,
    http: aiohttp.ClientSession,
    engine: Engine,
    calls: int,
    *,
    idle_rss: float,
    idle_cpu_percent: float,
) -> dict[str, Any]:
    """Run `calls` concurrent callers, staggered: whole calls of `--turns` turns, or a window of `--seconds`."""
    args = setup.args
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    ramp_s = args.ramp if args.ramp is not None else min(15.0, max(1.0, calls / 10))
    turns = args.turns or None
    callers = [
        _caller(setup, http, engine.base, stop, seed=i, max_turns=turns, kind=CALL_KINDS[i % len(CALL_KINDS)])
        for i in range(calls)
    ]

    async def place(index: int, caller: CloudCaller) -> CallerResult:
        await asyncio.sleep(ramp_s * index / calls)
        return await caller.run()

    if turns is not None:
        # Whole calls: the window opens before the first call is placed and closes after the last one's post-call
        # work, so the engine's CPU over it is the calls' whole cost, idle floor included.
        ended = asyncio.Event()
        observing = asyncio.create_task(
            _observe(setup, engine, http, callers, [], whole_calls=ended, idle_cpu_percent=idle_cpu_percent)
        )
        await asyncio.sleep(0)  # the window opens now
        tasks = [asyncio.create_task(place(i, c)) for i, c in enumerate(callers)]
        try:
            _, pending = await asyncio.wait(tasks, timeout=ramp_s + 60 + turns * (args.reply_timeout + 15))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            ended.set()
        seen = await observing
        live_at_start = 0
    else:
        tasks = [asyncio.create_task(place(i, c)) for i, c in enumerate(callers)]
        try:
            # The window opens once every call has heard its opening (or failed), plus a short settle.
            deadline = loop.time() + ramp_s + 30
            while loop.time() < deadline:
                if all(c.result.opening_done_at is not None or t.done() for c, t in zip(callers, tasks, strict=True)):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(args.settle)
            live_at_start = sum(1 for t in tasks if not t.done())
            seen = await _observe(setup, engine, http, callers, tasks)
            # The window's last turns are measured under the same load as the others: every call keeps talking
            # until each turn asked in the window has been heard out, and only then do they all hang up together.
            deadline = loop.time() + args.reply_timeout + 10
            while loop.time() < deadline:
                if not any((asked := c.asking_since) is not None and asked < seen.window.end for c in callers):
                    break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            _, pending = await asyncio.wait(tasks, timeout=args.reply_timeout + 20) if tasks else (set(), set())
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(1.5)  # the last CallLogs and turns are written after the hang-ups
    return {
        "calls": calls,
        "mode": f"whole calls of {turns} caller turns" if turns else f"a {args.seconds:g} s window of live calls",
        "rampSeconds": ramp_s,
        "liveAtWindowStart": live_at_start,
        **await _summarise(setup, engine, [c.result for c in callers], seen, idle_rss),
    }


def _live(caller: CloudCaller) -> bool:
    """Whether the caller's call is connected and not over yet."""
    r = caller.result
    return r.connected_at is not None and r.hung_up_at is None and not r.engine_closed and r.error is None


def call_minutes(results: Sequence[CallerResult], end: float) -> float:
    """The calls' total length in minutes: media stream connected → hang-up (or `end`)."""
    return sum((r.hung_up_at or end) - r.connected_at for r in results if r.connected_at is not None) / 60


async def _summarise(
    setup: RoundSetup, engine: Engine, results: Sequence[CallerResult], seen: Observed, idle_rss: float
) -> dict[str, Any]:
    """The round's figures from the callers' turns, the process samples and the engine's CallTurns."""
    window = seen.window
    in_window = [t for r in results for t in r.turns if t.index > 0 and window.holds(t.asked_at)]
    all_asked = [t for r in results for t in r.turns if t.index > 0]
    lags = [lag for i, r in enumerate(results) for lag in r.tick_lag_ms[slice(*window.lag_marks[i])]]
    call_log_ids = [r.call_log_id for r in results if r.call_log_id]
    connected = {r.call_log_id: r.connected_at for r in results if r.call_log_id and r.connected_at is not None}
    shift = setup.delays.total / 1000  # a reply starts about this long after its question
    turns = await engine_turns(setup.pool, connected, window.start + shift, window.end + shift)
    stages = stage_figures(turns, setup.delays)
    to_wall = time.time() - asyncio.get_running_loop().time()
    slowest = slowest_turns(results, turns, window, setup.delays, to_wall=to_wall, run_delay=seen.run_delay)
    mean_live = statistics.fmean(seen.live) if seen.live else 0.0
    whole = bool(setup.args.turns)
    minutes = call_minutes(results, window.end) if whole else mean_live * window.seconds / 60
    calls = len(results)
    busy = seen.engine_cpu + seen.bench_cpu + seen.postgres_cpu
    return {
        "windowSeconds": round(window.seconds, 2),
        "windowUtc": [window.wall_start.isoformat(), window.wall_end.isoformat()],
        "meanLiveCalls": round(mean_live, 2),
        "engineCallsLiveMetric": seen.calls_live_metric,
        "speculation": seen.speculation,
        "callErrors": [r.error for r in results if r.error],
        "engineClosedCalls": sum(1 for r in results if r.engine_closed),
        "protocolErrors": sum(len(r.protocol_errors) for r in results),
        "protocolErrorSamples": [e for r in results for e in r.protocol_errors][:5],
        "unexpectedAudioBytes": sum(r.unexpected_audio_bytes for r in results),
        "turnsWholeRun": {
            "asked": len(all_asked),
            "answered": sum(1 for t in all_asked if t.first_audio_at is not None),
            "openingsHeard": sum(1 for r in results if r.turns and r.turns[0].index == 0 and r.turns[0].first_audio_at),
        },
        **turn_figures(in_window, setup.delays),
        "voiceToVoiceMsByKind": {
            kind: spread(
                [
                    t.voice_to_voice_s * 1000
                    for i, r in enumerate(results)
                    if CALL_KINDS[i % len(CALL_KINDS)] == kind
                    for t in r.turns
                    if t.index > 0 and window.holds(t.asked_at) and t.voice_to_voice_s is not None
                ]
            )
            for kind in dict.fromkeys(CALL_KINDS)
        },
        "engineCpuSeconds": round(seen.engine_cpu, 3),
        "engineSystemCpuSeconds": round(seen.engine_system_cpu, 3),
        "callMinutes": round(minutes, 3),
        "engineCpuPerCallMinute": round(seen.engine_cpu / minutes, 3) if minutes else None,
        "engineCpuWhat": "whole calls (placing to post-call work done, idle floor included)"
        if whole
        else "a window of live calls (turns and streaming only)",
        "engineCpuPercent": round(100 * seen.engine_cpu / window.seconds, 1),
        "engineCpuPercentPeak": round(max(seen.engine_cpu_percent), 1) if seen.engine_cpu_percent else None,
        "engineIdleRssMb": round(idle_rss / 2**20, 1),
        "engineRssMaxMb": round(max(seen.rss) / 2**20, 1) if seen.rss else None,
        "engineRssPerCallMb": round((max(seen.rss) - idle_rss) / 2**20 / calls, 3) if seen.rss else None,
        "engineAffinity": affinity_of(engine.ps.pid),
        "postgresCpuPercent": round(100 * seen.postgres_cpu / window.seconds, 1) if setup.pgdata else None,
        "benchCpuPercent": round(100 * seen.bench_cpu / window.seconds, 1),
        "engineCpuPerBenchCpu": round(seen.engine_cpu / seen.bench_cpu, 3) if seen.bench_cpu > 0 else None,
        "benchAffinity": affinity_of(os.getpid()),
        "benchTickLagMs": spread(lags),
        "benchGcPauses": seen.gc,
        "coreBusyPercent": seen.core_busy,
        "otherCpuPercent": round(sum(seen.core_busy) - 100 * busy / window.seconds, 1),
        "loadAverage": list(os.getloadavg()),
        "engine": stages,
        "callEndings": await call_endings(setup.pool, call_log_ids),
        "turns": [t.as_json() for t in in_window],
        "slowestTurns": slowest,
        "engineRunDelayMs": round(seen.run_delay[-1][1] - seen.run_delay[0][1], 1) if seen.run_delay else None,
    }


def _busy_percent(before: Any, after: Any) -> float:
    """How busy one core was between two psutil.cpu_times samples (100 = fully)."""
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    return 100 * (total - idle) / total if total > 0 else 0.0


async def engine_metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The engine's /metrics samples (name with labels → value); empty when it cannot be read."""
    samples: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with http.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
            for line in (await response.text()).splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        samples[name] = float(value)
    return samples


SPECULATIONS: Final = "dialtone_speculative_replies_total"
"""The engine's counter of speculative replies, by `event`: started, used, discarded."""


def _speculation_counters(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(SPECULATIONS)}


def speculation_shares(counters: Mapping[str, float]) -> dict[str, float | None]:
    """Speculative replies used and discarded, as counted and as shares of both (None when unknown).

    Reads the engine's `dialtone_speculative_replies_total{event="used"|"discarded"}` samples; an event never
    counted has no sample, so it is 0 when the counter exists and unknown when it does not.
    """
    default = 0.0 if counters else None
    used = counters.get(f'{SPECULATIONS}{{event="used"}}', default)
    discarded = counters.get(f'{SPECULATIONS}{{event="discarded"}}', default)
    both = (used or 0.0) + (discarded or 0.0)
    return {
        "used": used,
        "discarded": discarded,
        "usedShare": round(used / both, 3) if used is not None and both else None,
        "discardedShare": round(discarded / both, 3) if discarded is not None and both else None,
    }


# --------------------------------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(rounds: Sequence[Mapping[str, Any]]) -> None:
    """The per-N tables: voice-to-voice first, beside the providers' unavoidable delays."""
    print()
    print(
        f"{'N':>4} {'answered':>10} {'VOICE-TO-VOICE ms':>18} {'providers':>9} {'replies in':>10} "
        f"{'speculative':>13} {'gaps':>8} {'CPU s/':>7} {'RSS MB':>7} {'engine-added ms':>17} {'bench':>6}"
    )
    print(
        f"{'':>4} {'/asked':>10} {'p50/p95/p99':>18} {'floor ms':>9} {'pause/paused':>10} "
        f"{'used/discarded':>13} {'utt.':>8} {'call-min':>7} {'/call':>7} {'(diagnostic)':>17} {'CPU%':>6}"
    )
    for r in rounds:
        v, e = r["voiceToVoiceMs"], r["engineAddedMs"]
        spec = speculation_shares(r.get("speculation") or {})
        used = "-" if spec["used"] is None else f"{spec['used']:.0f}"
        discarded = "-" if spec["discarded"] is None else f"{spec['discarded']:.0f}"
        print(
            f"{_round_name(r['calls'], r.get('knowledge', False)):>4} {str(r['answered']) + '/' + str(r['asked']):>10} "
            f"{_ms(v['p50']) + '/' + _ms(v['p95']) + '/' + _ms(v['p99']):>18} {r['providersUnavoidableMs']:>9} "
            f"{str(r['repliesDuringPause']) + '/' + str(r['pausedTurns']):>10} {used + '/' + discarded:>13} "
            f"{str(r['utterancesWithGap']) + '/' + str(r['utterances']):>8} "
            f"{r['engineCpuPerCallMinute'] if r['engineCpuPerCallMinute'] is not None else '-':>7} "
            f"{r['engineRssPerCallMb'] if r['engineRssPerCallMb'] is not None else '-':>7} "
            f"{_ms(e['p50']) + '/' + _ms(e['p95']) + '/' + _ms(e['p99']):>17} {r['benchCpuPercent']:>6}"
        )
    print()
    print("voice-to-voice p50/p95/p99 ms by kind of call:")
    for r in rounds:
        kinds = r.get("voiceToVoiceMsByKind") or {}
        print(
            f"{_round_name(r['calls'], r.get('knowledge', False)):>4} "
            + "  ".join(f"{k} {_ms(v['p50'])}/{_ms(v['p95'])}/{_ms(v['p99'])} (n={v['n']})" for k, v in kinds.items())
        )
    print()
    print(
        "engine cost over the round (CPU s per call-minute as above; idle: what the engine spends with no call; "
        "per harness CPU s: the engine's CPU over this process's, for comparing rounds on a machine whose speed "
        "drifts):"
    )
    print(
        f"{'N':>4} {'measured':>30} {'idle CPU s/min':>15} {'call-min':>9} {'engine CPU s':>12} {'of it kernel':>12} "
        f"{'per harness CPU s':>17}"
    )
    for r in rounds:
        print(
            f"{r['calls']:>4} {r['engineCpuWhat'].split(' (')[0]:>30} {r['engineIdleCpuSecondsPerMinute']:>15} "
            f"{r['callMinutes']:>9} {r['engineCpuSeconds']:>12} {r['engineSystemCpuSeconds']:>12} "
            f"{r['engineCpuPerBenchCpu'] if r['engineCpuPerBenchCpu'] is not None else '-':>17}"
        )
    print()
    print(
        "engine's own breakdown (CallTurn.latency medians, ms after the caller's last voiced frame per the engine VAD):"
    )
    print(f"{'N':>4} {'turns':>6} " + " ".join(f"{s:>15}" for s in STAGES) + f" {'engine v2v p50/p95':>19}")
    for r in rounds:
        st = r["engine"]
        ev = st["engineVoiceToVoiceMs"]
        print(
            f"{r['calls']:>4} {st['n']:>6} "
            + " ".join(f"{_ms(st['stageMedianMs'][s]):>15}" for s in STAGES)
            + f" {_ms(ev['p50']) + '/' + _ms(ev['p95']):>19}"
        )
    print()
    print("engine's share of each step (step minus its provider delay), median / p95 ms:")
    names = list(rounds[0]["engine"]["engineStepMedianMs"]) if rounds else []
    print(f"{'N':>4} " + " ".join(f"{n:>17}" for n in names))
    for r in rounds:
        st = r["engine"]
        print(
            f"{r['calls']:>4} "
            + " ".join(f"{_ms(st['engineStepMedianMs'][n]) + ' / ' + _ms(st['engineStepP95Ms'][n]):>17}" for n in names)
        )


def print_harness(rounds: Sequence[Mapping[str, Any]]) -> None:
    """Who else used the CPUs: this process (callers + fakes), PostgreSQL, other tenants of the machine."""
    print()
    print("harness and machine over the window (CPU% of one core):")
    print(
        f"{'N':>4} {'bench CPU%':>10} {'bench tick lag ms p50/p95/p99/max':>34} {'core busy% 0/1':>15} "
        f"{'others CPU%':>11} {'postgres%':>9} {'engine peak%':>12} {'engine idle%':>12} {'min lead ms':>11} "
        f"{'engine GC full/max ms':>21}"
    )
    for r in rounds:
        lag = r["benchTickLagMs"]
        lags = "/".join(_ms(lag[k]) for k in ("p50", "p95", "p99", "max"))
        cores = "/".join(f"{c:.0f}" for c in r["coreBusyPercent"])
        postgres = "-" if r["postgresCpuPercent"] is None else r["postgresCpuPercent"]
        peak = "-" if r["engineCpuPercentPeak"] is None else r["engineCpuPercentPeak"]
        gc_stats = r.get("engineGcPauses") or {}
        engine_gc = f"{gc_stats.get('full', '-')}/{_ms(gc_stats.get('maxMs'))}"
        print(
            f"{r['calls']:>4} {r['benchCpuPercent']:>10} {lags:>34} {cores:>15} {r['otherCpuPercent']:>11} "
            f"{postgres:>9} {peak:>12} {r.get('engineIdleCpuPercent', '-'):>12} {_ms(r['minLeadMs']):>11} "
            f"{engine_gc:>21}"
        )


def print_stalls(rounds: Sequence[Mapping[str, Any]]) -> None:
    """With --stalls: each round's loop stalls in the engine and here, and what overlapped its slowest turns."""
    for r in rounds:
        stalls = r.get("stalls")
        if not stalls:
            continue
        print(f"\nstalls at N={r['calls']} (engine waited runnable for a CPU {r['engineRunDelayMs']} ms in all):")
        for who in ("engine", "bench"):
            s = stalls[who]
            print(
                f"  {who}: timers late >=10 ms {s['lateTimersOver10Ms']}, >=20 ms {s['lateTimersOver20Ms']}, "
                f"worst {s['lateTimerMaxMs']} ms; callbacks >=5 ms {s['slowCallbacks']}"
            )
            for c in s["slowestCallbacks"]:
                print(f"      {c['maxMs']:>6} ms max, {c['count']:>4}x, {c['totalMs']:>7} ms in all: {c['label']}")
        print("  slowest turns (engine stage ms after the caller's last voiced frame; the worst event of each kind")
        print("  overlapping the turn; run-delay: the engine's waits for a CPU over the 1 s samples around it):")
        t0 = datetime.fromisoformat(r["windowUtc"][0]).timestamp()
        for t in r["slowestTurns"]:
            e = t["engine"] or {}
            stages = "/".join(_ms(e.get(k)) for k in STAGES[:5])
            print(
                f"    t={t['askedAt'] - t0:6.2f}s {t['call']} added {t['addedMs']:>5.0f} engine v2v "
                f"{_ms(e.get('latencyMs')):>4} ({stages}) run-delay {t.get('engineRunDelayMs')} ms"
                f" | engine: {t.get('engineEvents') or '-'} | bench: {t.get('benchEvents') or '-'}"
            )


def plot(rounds: Sequence[Mapping[str, Any]], path: Path, delays: Delays) -> bool:
    """Latency percentiles and CPU/RSS per call against N; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ns = [r["calls"] for r in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        left.plot(ns, [r["voiceToVoiceMs"][key] for r in rounds], style, label=f"voice-to-voice {key}")
        left.plot(ns, [r["engineAddedMs"][key] for r in rounds], style, alpha=0.6, label=f"engine-added {key}")
    left.set_xscale("log")
    left.set_xlabel("concurrent calls")
    left.set_ylabel("ms")
    left.set_title(f"latency (provider delays {delays.total} ms)")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    right.plot(ns, [r["engineCpuPerCallMinute"] for r in rounds], "o-", color="tab:red", label="CPU s / call-minute")
    right.set_xscale("log")
    right.set_xlabel("concurrent calls")
    right.set_ylabel("engine CPU s per call-minute", color="tab:red")
    twin = right.twinx()
    twin.plot(ns, [r["engineRssPerCallMb"] for r in rounds], "s--", color="tab:blue", label="RSS MB / call")
    twin.set_ylabel("engine RSS MB per call", color="tab:blue")
    right.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    right.set_title("engine cost per call")
    right.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------------------- main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", default="1,10,100", help="concurrent calls per round, comma-separated")
    parser.add_argument(
        "--turns",
        type=int,
        default=3,
        help="caller turns per call; the round measures whole calls (default 3; 0: a window of --seconds instead)",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="with --turns 0: measured window per round")
    parser.add_argument(
        "--ramp", type=float, default=None, help="stagger call starts over this many seconds (default N/10, 1 to 15)"
    )
    parser.add_argument("--endpointing-ms", type=int, default=DEFAULT_DELAYS.endpointing, help="Deepgram endpointing")
    parser.add_argument(
        "--final-delay-ms", type=int, default=DEFAULT_DELAYS.final_delay, help="Deepgram's final after endpointing"
    )
    parser.add_argument(
        "--finalize-delay-ms", type=int, default=DEFAULT_DELAYS.finalize_delay, help="Deepgram's answer to Finalize"
    )
    parser.add_argument("--llm-first-token-ms", type=int, default=DEFAULT_DELAYS.llm_first_token, help="fake LLM delay")
    parser.add_argument(
        "--tokens-per-second", type=float, default=DEFAULT_DELAYS.tokens_per_second, help="model pace (0: at once)"
    )
    parser.add_argument("--tts-first-byte-ms", type=int, default=DEFAULT_DELAYS.tts_first_byte, help="fake TTS delay")
    parser.add_argument(
        "--tts-speed", type=float, default=DEFAULT_DELAYS.tts_speed, help="TTS audio x real time (0: at once)"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after every opening before measuring")
    parser.add_argument("--reply-timeout", type=float, default=10.0, help="a turn unanswered this long is lost")
    parser.add_argument(
        "--think",
        type=float,
        default=0.65,
        help="mean seconds a caller waits after the agent's reply before speaking again (uniform, +-0.35 s); "
        "a long pause leaves mostly the cost of streaming audio, a short one adds the cost of turns",
    )
    parser.add_argument("--recording", action=argparse.BooleanOptionalAction, default=True, help="agent records calls")
    parser.add_argument("--engine-cpu", type=int, default=0, help="CPU the engine is pinned to (default 0)")
    parser.add_argument("--bench-cpu", type=int, default=1, help="CPU this process (callers, fakes) is pinned to")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    parser.add_argument("--tone", action="store_true", help="callers play a tone burst instead of eSpeak speech")
    parser.add_argument(
        "--knowledge", action="store_true", help="run each N again with agents using knowledge bases in context"
    )
    parser.add_argument("--profile-calls", type=int, default=None, help="profile the engine in this round")
    parser.add_argument(
        "--profiler",
        choices=("cpu", "cprofile"),
        default="cpu",
        help="with --profile-calls: sample the stack every ms of CPU time (bench/cpu_sampler.py; folded stacks) or "
        "trace every call with cProfile (inflates code of many small calls)",
    )
    parser.add_argument(
        "--py-spy", type=int, default=None, help="sample the engine with py-spy (if installed) over this round's calls"
    )
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="record the engine's and this process's loop stalls and explain the slowest turns (small overhead)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    return parser.parse_args(argv)


def _delays(args: argparse.Namespace) -> Delays:
    return Delays(
        endpointing=args.endpointing_ms,
        final_delay=args.final_delay_ms,
        finalize_delay=args.finalize_delay_ms,
        llm_first_token=args.llm_first_token_ms,
        tokens_per_second=args.tokens_per_second,
        tts_first_byte=args.tts_first_byte_ms,
        tts_speed=args.tts_speed,
    )


async def _utterances(tone: bool, delays: Delays) -> dict[str, list[Utterance]]:
    """What each kind of caller says: CALLER_TEXT, or (pausing) the booking sentence with a 400-600 ms pause."""
    quiet = delays.endpointing - 100
    if tone:
        plain = tone_utterance()
        return {"plain": [plain], "caller-first": [plain], "pausing": [plain]}
    try:
        plain = await speech_utterance(CALLER_TEXT, max_inner_quiet_ms=quiet)
        pausing = [
            await paused_utterance(PAUSE_FIRST, PAUSE_REST, pause, max_inner_quiet_ms=quiet) for pause in PAUSES_MS
        ]
    except Exception as exc:  # eSpeak missing or unsuitable: the fake Deepgram only needs energy
        print(f"eSpeak utterance unusable ({exc}); using a tone burst, without mid-sentence pauses")
        plain = tone_utterance()
        return {"plain": [plain], "caller-first": [plain], "pausing": [plain]}
    return {"plain": [plain], "caller-first": [plain], "pausing": pausing}


async def _database(tmp: Path) -> tuple[str, Path | None]:
    """DATABASE_URL if set, else a fresh embedded server in `tmp`; migrated. Returns its URL and data folder."""
    given_url = os.environ.get("DATABASE_URL")
    pgdata: Path | None = None
    if given_url:
        database_url = given_url
    else:
        server = await asyncio.to_thread(start_embedded, tmp / "db")
        await ensure_database(server.url(), "bench")
        database_url, pgdata = server.url("bench"), server.pgdata
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return database_url, pgdata


def _stop_embedded(pgdata: Path | None) -> None:
    """Stop the embedded server now, while its data folder still exists (pgserver's own exit hook needs it)."""
    if pgdata is None:
        return
    from pgserver.postgres_server import get_server

    with contextlib.suppress(Exception):
        get_server(pgdata).cleanup()


def _print_header(args: argparse.Namespace, pgdata: Path | None, utterance: Utterance) -> None:
    d = _delays(args)
    engine_cpu, bench_cpu = ("-", "-") if args.no_pin else (args.engine_cpu, args.bench_cpu)
    database = "embedded (temp)" if pgdata else "DATABASE_URL"
    print(
        f"cloud-pipeline calls through `dialtone serve`: {os.cpu_count()} CPUs, engine on CPU {engine_cpu}, "
        f"callers + fakes on CPU {bench_cpu}; database {database}; recording {'on' if args.recording else 'off'}"
    )
    print(
        f"provider pacing: endpointing {d.endpointing} ms + Deepgram final {d.final_delay} ms, Finalize answered "
        f"after {d.finalize_delay} ms, LLM first token {d.llm_first_token} ms then {d.tokens_per_second:g} tokens/s, "
        f"TTS first byte {d.tts_first_byte} ms then {d.tts_speed:g}x real time; fake Deepgram pacing applied: "
        f"{deepgram_pacing(d) or 'none (this FakeDeepgram has no final/finalize delays)'}"
    )
    print(
        f"calls: {' / '.join(CALL_KINDS)} in turn; plain callers say {utterance.source} ({utterance.duration_s:.2f} s);"
        f" {f'{args.turns} turns per call' if args.turns else f'window {args.seconds:g} s'}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


async def _rounds(
    setup: RoundSetup, wanted: Sequence[int], stamp: str, rounds: list[dict[str, Any]], knowledge: Line | None
) -> None:
    for calls, line in ((n, line) for n in wanted for line in (setup.line, knowledge) if line is not None):
        name = _round_name(calls, line is knowledge)
        print(f"  N={name}: running …", flush=True)
        profile = None
        if setup.args.profile_calls == calls:
            suffix = ".folded" if setup.args.profiler == "cpu" else ".prof"
            profile = setup.args.out / f"cloud-{stamp}-engine-n{name}{suffix}"
        result = await run_round(replace(setup, line=line), calls, profile)
        result["knowledge"] = line is knowledge
        if profile is not None:
            result["engineProfile"] = str(profile)
        rounds.append(result)
        v = result["voiceToVoiceMs"]
        print(
            f"  N={name}: {result['answered']}/{result['asked']} turns answered, voice-to-voice p50 "
            f"{_ms(v['p50'])} ms p95 {_ms(v['p95'])} ms p99 {_ms(v['p99'])} ms (providers' floor "
            f"{result['providersUnavoidableMs']} ms), replies during a pause {result['repliesDuringPause']}, "
            f"engine CPU {result['engineCpuPerCallMinute']} s/call-min, bench CPU {result['benchCpuPercent']}%, "
            f"call errors {len(result['callErrors'])}",
            flush=True,
        )
        if result["callErrors"]:  # e.g. calls refused: the round measured fewer concurrent calls than asked
            print(f"      first call error: {result['callErrors'][0]}", flush=True)


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds; print, store and plot the figures."""
    global STALLS  # noqa: PLW0603 - one recorder per process, read by every round
    args = _parse_args(argv)
    STALLS = StallWatch()
    if args.stalls:
        STALLS.watch_loop()
    wanted = [int(n) for n in str(args.calls).split(",") if n.strip()]
    if not args.no_pin:
        available = os.sched_getaffinity(0)
        if {args.engine_cpu, args.bench_cpu} - available or args.engine_cpu == args.bench_cpu:
            print(f"cannot pin to CPUs {args.engine_cpu} and {args.bench_cpu} (available: {sorted(available)})")
            return 2
        pin_threads(os.getpid(), args.bench_cpu)  # threads made later (executor, pgserver) inherit it
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    gitignore = args.out / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n!.gitignore\n")

    delays = _delays(args)
    utterances = await _utterances(args.tone, delays)
    utterance = utterances["plain"][0]
    with tempfile.TemporaryDirectory(prefix="dialtone-bench-cloud-") as tmp:
        database_url, pgdata = await _database(Path(tmp))
        pool = await create_pool(database_url)
        rounds: list[dict[str, Any]] = []
        try:
            setup = RoundSetup(
                args=args,
                line=await seed(pool, recording=args.recording, delays=delays),
                pool=pool,
                database_url=database_url,
                pgdata=pgdata,
                state_root=Path(tmp) / "state",
                auth_token=secrets.token_hex(16),
                utterances=utterances,
                replies=reply_book(),
                delays=delays,
                stamp=f"cloud-{stamp}",
            )
            knowledge = None
            if args.knowledge:
                knowledge = await seed(pool, recording=args.recording, delays=delays, knowledge=True)
            _print_header(args, pgdata, utterance)
            await _rounds(setup, wanted, stamp, rounds, knowledge)
        finally:
            await pool.close()
            await asyncio.to_thread(_stop_embedded, pgdata)
            if rounds:
                _report(args, stamp, utterance, rounds)
    return 0


def _round_name(calls: int, knowledge: bool) -> str:
    """N, or N marked "kb" for a round whose agents use knowledge bases."""
    return f"{calls}kb" if knowledge else str(calls)


def _report(args: argparse.Namespace, stamp: str, utterance: Utterance, rounds: list[dict[str, Any]]) -> None:
    delays = _delays(args)
    print_table(rounds)
    print_harness(rounds)
    print_stalls(rounds)
    print()
    saturated = [r["calls"] for r in rounds if r["engineCpuPercent"] >= 90]
    distorted = [r["calls"] for r in rounds if r["benchCpuPercent"] >= 85 or (r["benchTickLagMs"]["p99"] or 0) > 20]
    unanswered = [r["calls"] for r in rounds if r["answered"] < r["asked"]]
    paused = [r["calls"] for r in rounds if r["repliesDuringPause"]]
    if paused:
        print(f"REPLIES DURING A MID-SENTENCE PAUSE at N = {paused}.")
    print()
    if saturated:
        print(f"ENGINE SATURATED (>= 90% of its CPU) at N = {saturated}: its CPU per call-minute is capped there.")
    if distorted:
        print(f"HARNESS BUSY (bench CPU >= 85% or tick lag p99 > 20 ms) at N = {distorted}: latency overstated.")
    if unanswered:
        print(f"UNANSWERED TURNS at N = {unanswered}.")
    print("engine-added latency:", delays.formula())
    print(
        "gaps: utterances whose playback buffer ran dry before their audio ended / utterances heard; "
        "late ms: worst chunk lateness against an uninterrupted schedule from the first byte played. "
        "CPU s/call-min: engine user+sys CPU over the window / call-minutes; with --turns (the default) the window "
        "runs from before the first call is placed until the last one's post-call work is done, so it holds whole "
        "calls (webhook, setup, opening, turns, hang-up, recording, analysis) and the idle floor between them, and "
        "call-minutes are the calls' own lengths (stream connected to hang-up); with --turns 0 it is a window of "
        "steady talk / (mean live calls x window minutes); "
        "RSS/call: (max RSS in the window - idle RSS after warm-up) / N; bench CPU%: this process (callers + "
        "fakes) over the window, 100 = one core saturated; bench lag: how late the callers' 20 ms ticks ran; "
        "others CPU%: both cores' busy time not spent by the engine, this process or PostgreSQL (other tenants); "
        "min lead: the least any reply's audio arrived ahead of its playback (negative: late)."
    )
    report = {
        "started": stamp,
        "command": " ".join([Path(sys.executable).name, "-m", "bench.bench_cloud", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "loadAverage": list(os.getloadavg())},
        "config": {
            "endpointingMs": delays.endpointing,
            "deepgramFinalDelayMs": delays.final_delay,
            "deepgramFinalizeDelayMs": delays.finalize_delay,
            "deepgramPacingApplied": deepgram_pacing(delays),
            "llmFirstTokenMs": delays.llm_first_token,
            "llmTokensPerSecond": delays.tokens_per_second,
            "ttsFirstByteMs": delays.tts_first_byte,
            "ttsSpeed": delays.tts_speed,
            "providersUnavoidableMs": delays.unavoidable,
            "callKinds": list(CALL_KINDS),
            "turnsPerCall": args.turns,
            "ttsMsPerChar": MS_PER_CHAR,
            "firstSentence": FIRST_SENTENCE,
            "replies": list(REPLIES),
            "callerUtterance": utterance.source,
            "callerUtteranceSeconds": utterance.duration_s,
            "callerThinkSeconds": args.think,
            "windowSeconds": args.seconds,
            "recording": args.recording,
            "engineCpu": None if args.no_pin else args.engine_cpu,
            "benchCpu": None if args.no_pin else args.bench_cpu,
            "agentConfigurations": {
                k: agent_configuration(args.recording, delays, k) for k in dict.fromkeys(CALL_KINDS)
            },
        },
        "engineAddedFormula": delays.formula(),
        "rounds": rounds,
    }
    json_path = args.out / f"cloud-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {json_path}")
    png = args.out / f"cloud-{stamp}.png"
    if plot(rounds, png, delays):
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed")


def run(argv: Sequence[str] | None = None) -> int:
    """Run main() and stop cleanly on Ctrl-C or SIGTERM (the engine is stopped, the fakes closed)."""

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await main(argv)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: engine stopped, fakes closed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
