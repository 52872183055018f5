"""The delivery worker's settings: read from the engine's, and refused when a lease could not cover a request."""

from __future__ import annotations

from datetime import timedelta

import pytest

from config.settings import load_settings
from engine.workers.webhook_delivery import DeliverySettings, signature_header
from storage.webhook_outbox import DeliveryRetryPolicy


def test_the_defaults_retry_for_a_day_with_backoff_up_to_an_hour_and_refuse_private_addresses() -> None:
    settings = DeliverySettings.from_settings(load_settings())

    assert settings.retry == DeliveryRetryPolicy(
        initial=timedelta(seconds=10), maximum=timedelta(hours=1), give_up_after=timedelta(hours=24)
    )
    assert (settings.timeout, settings.lease) == (timedelta(seconds=10), timedelta(seconds=60))
    assert settings.allow_private is False
    assert (settings.concurrency, settings.per_organization) == (16, 4)


def test_environment_variables_configure_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIALTONE_ALLOW_PRIVATE_WEBHOOK_URLS", "true")
    monkeypatch.setenv("DIALTONE_WEBHOOK_RETRY_INITIAL", "0.5")
    monkeypatch.setenv("DIALTONE_WEBHOOK_CONCURRENCY", "3")
    monkeypatch.setenv("DIALTONE_WEBHOOK_ORGANIZATION_CONCURRENCY", "2")

    settings = DeliverySettings.from_settings(load_settings())

    assert settings.allow_private is True
    assert settings.retry.initial == timedelta(seconds=0.5)
    assert (settings.concurrency, settings.per_organization) == (3, 2)


def test_a_lease_no_longer_than_the_request_timeout_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"DIALTONE_WEBHOOK_LEASE \(10 s\) must be longer than DIALTONE_WEBHOOK_TIMEOUT"
    ):
        DeliverySettings(timeout=timedelta(seconds=10), lease=timedelta(seconds=10))


def test_retry_delays_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="initial <= maximum"):
        DeliveryRetryPolicy(initial=timedelta(minutes=5), maximum=timedelta(minutes=1))


def test_the_signature_is_hmac_sha256_over_the_timestamp_and_the_body() -> None:
    header = signature_header("whsec_test", 1700000000, b'{"a":1}')

    # From an independent implementation: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
    assert header == "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"


def test_the_delivery_log_keeps_finished_deliveries_thirty_days_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert DeliverySettings.from_settings(load_settings()).history == timedelta(days=30)

    monkeypatch.setenv("DIALTONE_WEBHOOK_HISTORY_DAYS", "7")

    assert DeliverySettings.from_settings(load_settings()).history == timedelta(days=7)
