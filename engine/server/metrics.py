"""Prometheus metrics of the engine, served at `/metrics`.

Per-turn latency is exported stage by stage (the same stages each agent turn stores in CallTurn.latency),
so a dashboard shows where response time goes: recognizer, model, synthesizer or the engine itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# Voice-agent latencies live between ~50 ms and a few seconds.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

TURN_STAGE_SECONDS = Histogram(
    "dialtone_turn_stage_seconds",
    "Time from the caller stopping speaking to each stage of the agent's answer.",
    ["stage"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
TURN_LATENCY_SECONDS = Histogram(
    "dialtone_turn_latency_seconds",
    "Voice to voice: the caller stopping speaking to the agent's first audio frame sent to Twilio.",
    buckets=_BUCKETS,
    registry=REGISTRY,
)
KNOWLEDGE_SEARCH_SECONDS = Histogram(
    "dialtone_knowledge_search_seconds",
    "Time of one knowledge-base search during a call (PostgreSQL full-text search, with vector search if on).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
KNOWLEDGE_VECTOR_FALLBACKS = Counter(
    "dialtone_knowledge_vector_fallbacks_total",
    "Knowledge searches that answered with full-text alone because the question's embedding did not come, by "
    "reason: timeout or error.",
    ["reason"],
    registry=REGISTRY,
)
KNOWLEDGE_EMBEDDING_FAILURES = Counter(
    "dialtone_knowledge_embedding_failures_total",
    "Rounds of embedding knowledge passages that failed after their retries (an embedding API down, refusing the "
    "engine's key, or refusing a setting); the passages wait for a later round and are found by full-text meanwhile.",
    registry=REGISTRY,
)
CALLS_LIVE = Gauge("dialtone_calls_live", "Calls with a media stream running on this engine.", registry=REGISTRY)
CALLS_ENDED = Counter(
    "dialtone_calls_ended_total", "Calls finished by this engine, by final status.", ["status"], registry=REGISTRY
)
SPECULATIVE_REPLIES = Counter(
    "dialtone_speculative_replies_total",
    "Replies started before the caller's turn was confirmed, by what became of them: started, used (the turn was "
    "confirmed with the same words) or discarded (the caller spoke on, or the final words differed).",
    ["event"],
    registry=REGISTRY,
)
BARGE_INS = Counter("dialtone_barge_ins_total", "Times a caller interrupted the agent.", registry=REGISTRY)
PROVIDER_FAILOVERS = Counter(
    "dialtone_provider_failovers_total",
    "Times a call moved to its next provider for a stage.",
    ["stage", "provider"],
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "dialtone_provider_errors_total", "Provider failures seen by calls.", ["stage", "provider"], registry=REGISTRY
)

STT_REPLAY_LOST_MS = Counter(
    "dialtone_stt_replay_lost_ms_total",
    "Milliseconds of callers' speech a recognizer could not hear again after a drop (no final result for longer "
    "than the replay bound, 30 s): words lost from the turn.",
    ["provider"],
    registry=REGISTRY,
)

INBOUND_MEDIA_GAPS = Counter(
    "dialtone_inbound_media_gaps_total",
    "Times Twilio skipped chunks of a caller's audio (its warning 31930), over all calls.",
    registry=REGISTRY,
)
INBOUND_MEDIA_GAP_MS = Counter(
    "dialtone_inbound_media_gap_ms_total",
    "Milliseconds of callers' audio missing by the media timestamps where Twilio skipped chunks.",
    registry=REGISTRY,
)

# Conversation paths: where calls go, so a builder sees where callers drop off (each counted once per call).
# Counted through PATH_NODES and PATH_EDGES, which bound how many series the tenants' graphs can make.
PATH_NODE_CALLS = Counter(
    "dialtone_path_node_calls_total",
    "Calls that reached a node of a conversation path.",
    ["path", "node"],
    registry=REGISTRY,
)
PATH_EDGE_CALLS = Counter(
    "dialtone_path_edge_calls_total",
    "Calls that took an edge (or a global node's way, global:<node>) of a conversation path.",
    ["path", "edge"],
    registry=REGISTRY,
)


class BoundedSeries:
    """A counter whose labels come from tenants' data, kept to at most `limit` series: every series stays in memory
    and in each scrape for the life of the process, so past the bound counts go to one `(other)` series, and a
    scrape stays small whatever the tenants build."""

    OTHER = "(other)"

    def __init__(self, counter: Counter, limit: int) -> None:
        """Bound `counter`'s series (its labels beyond `limit` distinct tuples read `(other)`)."""
        self._counter = counter
        self._limit = limit
        self._seen: set[tuple[str, ...]] = set()

    def inc(self, *labels: str) -> None:
        """Count one under `labels`, or under `(other)` for each label once the bound is reached."""
        if labels not in self._seen:
            if len(self._seen) >= self._limit:
                labels = (self.OTHER,) * len(labels)
            else:
                self._seen.add(labels)
        self._counter.labels(*labels).inc()


PATH_SERIES_MAX = 5000
"""The most series of path nodes, and of path edges, one process keeps: labels are the tenants' graphs' ids."""
PATH_NODES = BoundedSeries(PATH_NODE_CALLS, PATH_SERIES_MAX)
PATH_EDGES = BoundedSeries(PATH_EDGE_CALLS, PATH_SERIES_MAX)


def observe_media_gap(missing_ms: int) -> None:
    """Count one inbound media gap of `missing_ms` milliseconds."""
    INBOUND_MEDIA_GAPS.inc()
    INBOUND_MEDIA_GAP_MS.inc(missing_ms)


def observe_turn(stages_ms: Mapping[str, int]) -> None:
    """Record one agent turn's stage latencies (ms after the caller stopped speaking)."""
    for stage, ms in stages_ms.items():
        TURN_STAGE_SECONDS.labels(stage).observe(ms / 1000)
    first_frame = stages_ms.get("firstFrameSent")
    if first_frame is not None:
        TURN_LATENCY_SECONDS.observe(first_frame / 1000)


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: every metric in Prometheus' text format."""
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
