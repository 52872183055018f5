"""Engine settings from environment variables and an optional `dialtone.toml`, validated at start."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "DIALTONE_CONFIG"
DEFAULT_CONFIG_FILE = Path("dialtone.toml")
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
"""The length of each OpenAI embedding model's vectors (DIALTONE_KB_EMBEDDING_DIMENSIONS may shorten a v3's)."""


class SettingsError(Exception):
    """Settings that cannot be used; the message names each bad setting and what is wrong with it."""


def _env(name: str, field: str, default: Any = None, **constraints: Any) -> Any:
    # The environment variable comes first: error messages name it. The settings file uses the field name.
    return Field(default, validation_alias=AliasChoices(name, field), **constraints)


class Settings(BaseSettings):
    """Everything the engine reads at start. Environment variables win over the settings file."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    database_url: str | None = _env("DATABASE_URL", "database_url", repr=False)  # its password with it
    state_dir: Path = _env("DIALTONE_STATE_DIR", "state_dir", Path(".dialtone"))
    host: str = _env("DIALTONE_HOST", "host", "127.0.0.1")
    port: int = _env("DIALTONE_PORT", "port", 8080, ge=1, le=65535)
    public_url: str | None = _env("DIALTONE_PUBLIC_URL", "public_url")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _env("DIALTONE_LOG_LEVEL", "log_level", "INFO")
    db_pool_min: int = _env("DIALTONE_DB_POOL_MIN", "db_pool_min", 1, ge=0, le=100)
    db_pool_max: int = _env("DIALTONE_DB_POOL_MAX", "db_pool_max", 10, ge=1, le=500)
    db_connect_timeout: float = _env("DIALTONE_DB_CONNECT_TIMEOUT", "db_connect_timeout", 10.0, gt=0)
    twilio_account_sid: str | None = _env("TWILIO_ACCOUNT_SID", "twilio_account_sid")
    twilio_auth_token: SecretStr | None = _env("TWILIO_AUTH_TOKEN", "twilio_auth_token")
    # Twilio's REST API root; a setting so tests and regional proxies can point it elsewhere.
    twilio_api_base: str = _env("TWILIO_API_BASE", "twilio_api_base", "https://api.twilio.com")
    # Signs recording URLs; unset, a random key is made once and kept in the state folder.
    secret_key: SecretStr | None = _env("DIALTONE_SECRET_KEY", "secret_key", min_length=32)
    # How long the signed recording URL stored in CallLog.recordingUrl stays valid.
    recording_url_ttl_days: int = _env("DIALTONE_RECORDING_URL_TTL_DAYS", "recording_url_ttl_days", 30, ge=1, le=3650)

    # Cloud providers: keys (an agent may name another place with `api_key_ref`) and endpoints, which are
    # settings for proxies, regional hosts and tests.
    deepgram_api_key: SecretStr | None = _env("DEEPGRAM_API_KEY", "deepgram_api_key")
    openai_api_key: SecretStr | None = _env("OPENAI_API_KEY", "openai_api_key")
    elevenlabs_api_key: SecretStr | None = _env("ELEVENLABS_API_KEY", "elevenlabs_api_key")
    deepgram_url: str = _env("DEEPGRAM_URL", "deepgram_url", "wss://api.deepgram.com")
    openai_base_url: str = _env("OPENAI_BASE_URL", "openai_base_url", "https://api.openai.com/v1")
    elevenlabs_url: str = _env("ELEVENLABS_URL", "elevenlabs_url", "https://api.elevenlabs.io")
    # A Deepgram socket that stays open but sends nothing for this long (s) once the caller has spoken a second since
    # its last message is dropped as dead: reconnected, then failed over like a closed one.
    deepgram_silent_socket_timeout: float = _env(
        "DIALTONE_DEEPGRAM_SILENT_SOCKET_TIMEOUT", "deepgram_silent_socket_timeout", 5.0, gt=0, le=60
    )
    # Agent tools may call webhooks; addresses on loopback or private networks are refused unless allowed.
    allow_private_tool_urls: bool = _env("DIALTONE_ALLOW_PRIVATE_TOOL_URLS", "allow_private_tool_urls", False)
    # Call-event webhooks: the same refusal of private addresses, then how deliveries are sent and retried (s).
    allow_private_webhook_urls: bool = _env("DIALTONE_ALLOW_PRIVATE_WEBHOOK_URLS", "allow_private_webhook_urls", False)
    webhook_timeout: float = _env("DIALTONE_WEBHOOK_TIMEOUT", "webhook_timeout", 10.0, gt=0, le=300)
    webhook_concurrency: int = _env("DIALTONE_WEBHOOK_CONCURRENCY", "webhook_concurrency", 16, ge=1, le=1000)
    # At most this many of one organization's deliveries in flight across every engine process, so that one slow
    # endpoint or burst of events cannot hold every process's slots while other organizations' events wait.
    webhook_organization_concurrency: int = _env(
        "DIALTONE_WEBHOOK_ORGANIZATION_CONCURRENCY", "webhook_organization_concurrency", 4, ge=1, le=1000
    )
    webhook_retry_initial: float = _env("DIALTONE_WEBHOOK_RETRY_INITIAL", "webhook_retry_initial", 10.0, gt=0)
    webhook_retry_max: float = _env("DIALTONE_WEBHOOK_RETRY_MAX", "webhook_retry_max", 3600.0, gt=0)
    webhook_give_up_after: float = _env("DIALTONE_WEBHOOK_GIVE_UP_AFTER", "webhook_give_up_after", 86400.0, gt=0)
    webhook_lease: float = _env("DIALTONE_WEBHOOK_LEASE", "webhook_lease", 60.0, gt=0)
    webhook_poll_interval: float = _env("DIALTONE_WEBHOOK_POLL_INTERVAL", "webhook_poll_interval", 5.0, gt=0)
    # Days the delivery log keeps a finished (DELIVERED or FAILED) delivery and its attempts after its event.
    webhook_history_days: int = _env("DIALTONE_WEBHOOK_HISTORY_DAYS", "webhook_history_days", 30, ge=1)
    # Campaign dispatch: every process with Twilio and a public URL dials campaigns unless DIALTONE_DISPATCH=false;
    # how often it looks for due recipients (s), and how long a claimed recipient stays leased to it (s).
    dispatch_enabled: bool = _env("DIALTONE_DISPATCH", "dispatch_enabled", True)
    dispatch_interval: float = _env("DIALTONE_DISPATCH_INTERVAL", "dispatch_interval", 1.0, gt=0, le=60)
    dispatch_lease: float = _env("DIALTONE_DISPATCH_LEASE", "dispatch_lease", 60.0, ge=5, le=3600)
    # A call's end waits this long (s) for the database; past it, the rest of the call is kept in the spill on
    # local disk (under the state folder, at most this many bytes per run) and written when the database returns.
    call_log_finish_timeout: float = _env("DIALTONE_CALL_LOG_FINISH_TIMEOUT", "call_log_finish_timeout", 60.0, gt=0)
    call_log_spill_max_bytes: int = _env(
        "DIALTONE_CALL_LOG_SPILL_MAX_BYTES", "call_log_spill_max_bytes", 256 * 1024 * 1024, ge=1024
    )
    # Worker processes shared by every call for offline recognition and synthesis (PocketSphinx, eSpeak NG), which
    # would stall the event loop; two suit a 2-core machine.
    offline_workers: int = _env("DIALTONE_OFFLINE_WORKERS", "offline_workers", 2, ge=1, le=64)

    # Credits a started minute of a call costs, by the organization's plan. A call reserves its next minute before
    # it begins and ends with a goodbye when the balance cannot pay for it.
    credits_per_minute_free: int = _env("DIALTONE_CREDITS_PER_MINUTE_FREE", "credits_per_minute_free", 1, ge=0)
    credits_per_minute_pro: int = _env("DIALTONE_CREDITS_PER_MINUTE_PRO", "credits_per_minute_pro", 1, ge=0)
    credits_per_minute_enterprise: int = _env(
        "DIALTONE_CREDITS_PER_MINUTE_ENTERPRISE", "credits_per_minute_enterprise", 1, ge=0
    )

    # Plans and limits. Calls an organization may have in progress at once, by plan (0 = no limit); an inbound call
    # over the limit hears a polite refusal, POST /v1/calls waits up to call_slot_wait seconds for a free slot before
    # answering 429, campaigns keep their recipients queued until a slot frees.
    max_concurrent_calls_free: int = _env("DIALTONE_MAX_CONCURRENT_CALLS_FREE", "max_concurrent_calls_free", 10, ge=0)
    max_concurrent_calls_pro: int = _env("DIALTONE_MAX_CONCURRENT_CALLS_PRO", "max_concurrent_calls_pro", 50, ge=0)
    max_concurrent_calls_enterprise: int = _env(
        "DIALTONE_MAX_CONCURRENT_CALLS_ENTERPRISE", "max_concurrent_calls_enterprise", 0, ge=0
    )
    call_slot_wait: float = _env("DIALTONE_CALL_SLOT_WAIT", "call_slot_wait", 10.0, ge=0, le=120)
    # API requests each key may make per minute (0 = no limit), counted in PostgreSQL so every engine process
    # shares the count; over it, 429 with Retry-After.
    api_rate_limit_per_minute: int = _env("DIALTONE_API_RATE_LIMIT_PER_MINUTE", "api_rate_limit_per_minute", 1200, ge=0)
    # How long (s) a stored Idempotency-Key answer of POST /v1/calls or POST /v1/campaigns is replayed.
    idempotency_key_ttl: float = _env("DIALTONE_IDEMPOTENCY_KEY_TTL", "idempotency_key_ttl", 86400.0, ge=60)

    # Several hosts behind a load balancer (issue 20). Finished recordings are kept in the local folder (one host)
    # or in S3-compatible object storage that every host reaches (AWS S3, MinIO, Cloudflare R2, GCS's S3 API);
    # credentials unset use the usual AWS sources (environment, instance role).
    recording_store: Literal["local", "s3"] = _env("DIALTONE_RECORDING_STORE", "recording_store", "local")
    s3_bucket: str | None = _env("DIALTONE_S3_BUCKET", "s3_bucket")
    s3_prefix: str = _env("DIALTONE_S3_PREFIX", "s3_prefix", "recordings/")
    s3_endpoint_url: str | None = _env("DIALTONE_S3_ENDPOINT_URL", "s3_endpoint_url")
    # The endpoint clients fetch recordings from, when it differs from the engine's (e.g. MinIO inside a private
    # network): presigned URLs are signed for this host.
    s3_public_endpoint_url: str | None = _env("DIALTONE_S3_PUBLIC_ENDPOINT_URL", "s3_public_endpoint_url")
    s3_region: str = _env("DIALTONE_S3_REGION", "s3_region", "us-east-1")
    s3_access_key_id: SecretStr | None = _env("DIALTONE_S3_ACCESS_KEY_ID", "s3_access_key_id")
    s3_secret_access_key: SecretStr | None = _env("DIALTONE_S3_SECRET_ACCESS_KEY", "s3_secret_access_key")
    # Server-side encryption of uploaded recordings: AES256 (keys the store manages) or aws:kms (with this key id,
    # else the bucket's default KMS key); unset leaves it to the bucket's default encryption.
    s3_server_side_encryption: Literal["AES256", "aws:kms"] | None = _env(
        "DIALTONE_S3_SERVER_SIDE_ENCRYPTION", "s3_server_side_encryption"
    )
    s3_kms_key_id: str | None = _env("DIALTONE_S3_KMS_KEY_ID", "s3_kms_key_id")
    # How long (s) the presigned object-storage URL that GET /recordings/{id}.wav redirects to stays valid.
    recording_link_ttl: int = _env("DIALTONE_RECORDING_LINK_TTL", "recording_link_ttl", 300, ge=10, le=604800)
    # Uploads: how often a host looks for recordings to upload (s), the first and longest wait between tries (s).
    recording_upload_interval: float = _env(
        "DIALTONE_RECORDING_UPLOAD_INTERVAL", "recording_upload_interval", 5.0, gt=0
    )
    recording_upload_retry_initial: float = _env(
        "DIALTONE_RECORDING_UPLOAD_RETRY_INITIAL", "recording_upload_retry_initial", 10.0, gt=0
    )
    recording_upload_retry_max: float = _env(
        "DIALTONE_RECORDING_UPLOAD_RETRY_MAX", "recording_upload_retry_max", 3600.0, gt=0
    )
    # Recordings older than this many days are deleted from their store; unset keeps them for ever.
    recording_retention_days: int | None = _env("DIALTONE_RECORDING_RETENTION_DAYS", "recording_retention_days", ge=1)
    # Engine nodes: how often each heartbeats (s), how long one may stay silent before it counts as dead and its
    # calls are closed by the others (s), and how often each looks for such calls (s).
    node_heartbeat_interval: float = _env("DIALTONE_NODE_HEARTBEAT_INTERVAL", "node_heartbeat_interval", 10.0, gt=0)
    node_timeout: float = _env("DIALTONE_NODE_TIMEOUT", "node_timeout", 60.0, gt=0)
    recovery_interval: float = _env("DIALTONE_RECOVERY_INTERVAL", "recovery_interval", 60.0, gt=0)
    # How long (s) a stopping engine (SIGTERM, Ctrl-C) waits for its live calls to end by themselves, refusing new
    # ones, before it ends the rest (0: end them at once). Keep it under the platform's stop grace period.
    drain_seconds: float = _env("DIALTONE_DRAIN_SECONDS", "drain_seconds", 20.0, ge=0, le=86400)
    # How long (s) a live-call control sent to the node holding the call waits for that node's acknowledgement.
    control_timeout: float = _env("DIALTONE_CONTROL_TIMEOUT", "control_timeout", 5.0, gt=0, le=60)

    # Knowledge bases: documents are split into chunks of about this many characters, each overlapping the one
    # before by this many; an uploaded file may be this large (bytes).
    kb_chunk_chars: int = _env("DIALTONE_KB_CHUNK_CHARS", "kb_chunk_chars", 1000, ge=100, le=20_000)
    kb_chunk_overlap: int = _env("DIALTONE_KB_CHUNK_OVERLAP", "kb_chunk_overlap", 150, ge=0, le=5_000)
    kb_max_file_bytes: int = _env("DIALTONE_KB_MAX_FILE_BYTES", "kb_max_file_bytes", 10 * 1024 * 1024, ge=1024)
    # Ingestion workers in every engine process: documents at once, each claim's lease (s), how often to look for
    # queued documents (s), and attempts before a document that keeps failing is marked ERROR.
    kb_ingest_concurrency: int = _env("DIALTONE_KB_INGEST_CONCURRENCY", "kb_ingest_concurrency", 2, ge=1, le=64)
    kb_ingest_lease: float = _env("DIALTONE_KB_INGEST_LEASE", "kb_ingest_lease", 300.0, ge=1)
    kb_ingest_poll_interval: float = _env("DIALTONE_KB_INGEST_POLL_INTERVAL", "kb_ingest_poll_interval", 2.0, gt=0)
    kb_ingest_max_attempts: int = _env("DIALTONE_KB_INGEST_MAX_ATTEMPTS", "kb_ingest_max_attempts", 3, ge=1)
    # WEBSITE documents: same-site links followed this deep and to this many pages, each fetched within the
    # timeout (s) and at most this large (bytes); private addresses are refused unless allowed, as for webhooks.
    kb_crawl_max_depth: int = _env("DIALTONE_KB_CRAWL_MAX_DEPTH", "kb_crawl_max_depth", 2, ge=0, le=10)
    kb_crawl_max_pages: int = _env("DIALTONE_KB_CRAWL_MAX_PAGES", "kb_crawl_max_pages", 20, ge=1, le=1000)
    kb_fetch_timeout: float = _env("DIALTONE_KB_FETCH_TIMEOUT", "kb_fetch_timeout", 10.0, gt=0, le=120)
    kb_fetch_max_bytes: int = _env("DIALTONE_KB_FETCH_MAX_BYTES", "kb_fetch_max_bytes", 5 * 1024 * 1024, ge=1024)
    allow_private_kb_urls: bool = _env("DIALTONE_ALLOW_PRIVATE_KB_URLS", "allow_private_kb_urls", False)
    # Passages a call's knowledge lookup returns to the model.
    kb_search_results: int = _env("DIALTONE_KB_SEARCH_RESULTS", "kb_search_results", 3, ge=1, le=20)
    # Listen-in: audio a listener's socket may fall behind the call (ms) before the listener is dropped.
    listen_buffer_ms: int = _env("DIALTONE_LISTEN_BUFFER_MS", "listen_buffer_ms", 2000, ge=100, le=60_000)
    # Vector search over knowledge bases (needs pgvector): the OpenAI embedding model (unset: full-text only), its
    # vector length (unset: the model's own; set: the API is asked to shorten them), where the key is read
    # (`env:<VARIABLE>`: OPENAI_API_KEY or a shared DIALTONE_AGENT_KEY_SHARED_*, not one organization's variable),
    # passages per request and attempts per batch, and how long (s) a caller's question waits for its embedding
    # before full-text search answers alone.
    kb_embedding_model: str | None = _env("DIALTONE_KB_EMBEDDING_MODEL", "kb_embedding_model")
    kb_embedding_dimensions: int | None = _env(
        "DIALTONE_KB_EMBEDDING_DIMENSIONS", "kb_embedding_dimensions", None, ge=1, le=16000
    )
    kb_embedding_key_ref: str = _env("DIALTONE_KB_EMBEDDING_KEY_REF", "kb_embedding_key_ref", "env:OPENAI_API_KEY")
    kb_embedding_batch_size: int = _env(
        "DIALTONE_KB_EMBEDDING_BATCH_SIZE", "kb_embedding_batch_size", 64, ge=1, le=2048
    )
    kb_embedding_max_attempts: int = _env(
        "DIALTONE_KB_EMBEDDING_MAX_ATTEMPTS", "kb_embedding_max_attempts", 4, ge=1, le=20
    )
    kb_embedding_question_timeout: float = _env(
        "DIALTONE_KB_EMBEDDING_QUESTION_TIMEOUT", "kb_embedding_question_timeout", 0.25, gt=0, le=10
    )
    # Live call events (GET /v1/live-calls/events) are kept this many seconds for streams resuming after a drop.
    live_events_retention: float = _env("DIALTONE_LIVE_EVENTS_RETENTION", "live_events_retention", 3600.0, ge=60)

    @field_validator(
        "twilio_account_sid",
        "twilio_auth_token",
        "deepgram_api_key",
        "openai_api_key",
        "elevenlabs_api_key",
        "s3_bucket",
        "s3_server_side_encryption",
        "s3_kms_key_id",
        "s3_access_key_id",
        "s3_secret_access_key",
        "recording_retention_days",
        "kb_embedding_model",
        "kb_embedding_dimensions",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # docker compose passes `${NAME:-}` as an empty variable: that means "not set", not an empty key.
        return None if value == "" else value

    @model_validator(mode="after")
    def _node_liveness(self) -> Settings:
        if self.node_heartbeat_interval >= self.node_timeout:
            raise ValueError(
                "DIALTONE_NODE_HEARTBEAT_INTERVAL: must be shorter than DIALTONE_NODE_TIMEOUT, or live nodes look dead"
            )
        return self

    @model_validator(mode="after")
    def _object_storage(self) -> Settings:
        if self.recording_store == "s3" and not self.s3_bucket:
            raise ValueError("DIALTONE_S3_BUCKET: must be set when DIALTONE_RECORDING_STORE is s3")
        if self.s3_kms_key_id and self.s3_server_side_encryption != "aws:kms":
            raise ValueError("DIALTONE_S3_KMS_KEY_ID: needs DIALTONE_S3_SERVER_SIDE_ENCRYPTION=aws:kms")
        return self

    @model_validator(mode="after")
    def _embedding_dimensions(self) -> Settings:
        model = self.kb_embedding_model
        if model is not None and self.kb_embedding_dimensions is None and model not in EMBEDDING_DIMENSIONS:
            raise ValueError(
                f"DIALTONE_KB_EMBEDDING_DIMENSIONS: must be set for the embedding model {model!r} "
                f"(the vector length is known only for {', '.join(EMBEDDING_DIMENSIONS)})"
            )
        return self

    @field_validator("kb_embedding_key_ref")
    @classmethod
    def _engine_key_ref(cls, value: str) -> str:
        # Passages of every organization are embedded with this key: one organization's Tool cannot provide it.
        if not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must be 'env:<VARIABLE>' (e.g. env:OPENAI_API_KEY), naming where the key is kept")
        return value

    @field_validator("deepgram_url", "openai_base_url", "elevenlabs_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("must be an http(s):// or ws(s):// URL")
        return value.rstrip("/")

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _object_storage_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL of the S3-compatible service")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, the address Twilio reaches this engine at")
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def credit_rates(self) -> dict[str, int]:
        """Credits one started minute of a call costs, by plan name (free, pro, enterprise)."""
        return {
            "free": self.credits_per_minute_free,
            "pro": self.credits_per_minute_pro,
            "enterprise": self.credits_per_minute_enterprise,
        }

    @property
    def concurrent_call_limits(self) -> dict[str, int]:
        """Calls an organization may have in progress at once, by plan name (0 = no limit)."""
        return {
            "free": self.max_concurrent_calls_free,
            "pro": self.max_concurrent_calls_pro,
            "enterprise": self.max_concurrent_calls_enterprise,
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get(CONFIG_FILE_ENV) or DEFAULT_CONFIG_FILE)
        environment = _EnvironmentVariables(settings_cls)
        return (init_settings, environment, _SettingsFile(settings_cls, config_file))


class _SettingsFile(TomlConfigSettingsSource):
    """The settings file, whose every key must name a setting: a misspelt one is refused, not silently ignored."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls, toml_file=path)
        # Keys are matched without regard to case, by the setting's own name or its environment variable's.
        names = {
            str(name).lower(): field
            for field, info in settings_cls.model_fields.items()
            if isinstance(info.validation_alias, AliasChoices)
            for name in info.validation_alias.choices
        }
        unknown = [key for key in self.toml_data if key.lower() not in names]
        if unknown:  # load_settings names the file before this message
            raise ValueError("; ".join(_not_a_setting(key, sorted(set(names.values()))) for key in unknown))


def _not_a_setting(key: str, fields: list[str]) -> str:
    close = difflib.get_close_matches(key.lower(), fields, n=1)
    return f"{key!r} is not a setting" + (f" (did you mean {close[0]}?)" if close else "")


class _EnvironmentVariables(EnvSettingsSource):
    """Reads each setting from its own environment variable only."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # The stock source also reads the field's other names, so a bare PORT, HOST or LOG_LEVEL exported for
        # another program would configure the engine, and its errors would name a variable nobody set.
        name = _setting_name(field_name)
        return self.env_vars.get(name if self.case_sensitive else name.lower()), name, False


def _setting_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raise SettingsError naming every bad setting."""
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"{CONFIG_FILE_ENV}: no settings file at {config_file}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except ValueError as exc:  # a settings file that is not valid TOML
        raise SettingsError(f"{config_file or DEFAULT_CONFIG_FILE}: {exc}") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "settings"
        name = _setting_name(field) if field in Settings.model_fields else field
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        shown = "" if given is None or any(word in name for word in ("SECRET", "TOKEN", "KEY")) else f" (got {given!r})"
        lines.append(f"{name}: {message}{_without_passwords(shown)}")
    return "; ".join(lines)


_URL_PASSWORD = re.compile(r"(://[^:/?#@\s]*:)[^\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def _without_passwords(text: str) -> str:
    """`text` with the password of any URL in it ("postgres://user:***@host") or libpq keyword string hidden."""
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))
