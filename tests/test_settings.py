"""Engine settings: defaults, the settings file, the environment over it, and errors that name the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import SettingsError, load_settings

TOKEN = "twilio-auth-token-7f3a9c"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the developer's shell, and a working folder whose dialtone.toml is the test's own."""
    for name in list(os.environ):
        if name.startswith(("DIALTONE_", "DATABASE_URL", "TWILIO_")) or name in {"PORT", "HOST", "LOG_LEVEL"}:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def settings_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> Path:
    path = tmp_path / "engine-settings.toml"
    path.write_text(text)
    monkeypatch.setenv("DIALTONE_CONFIG", str(path))
    return path


def error_of(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


def test_defaults_listen_on_loopback_with_an_embedded_database() -> None:
    settings = load_settings()

    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.state_dir == Path(".dialtone")
    assert settings.database_url is None
    assert settings.public_url is None
    assert settings.log_level == "INFO"


def test_the_settings_file_named_by_dialtone_config_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings_file(monkeypatch, tmp_path, 'host = "192.0.2.10"\nport = 9000\nlog_level = "debug"\n')

    settings = load_settings()

    assert (settings.host, settings.port, settings.log_level) == ("192.0.2.10", 9000, "DEBUG")


def test_dialtone_toml_in_the_working_folder_is_read_by_default(tmp_path: Path) -> None:
    (tmp_path / "dialtone.toml").write_text("port = 9001\n")

    assert load_settings().port == 9001


def test_the_environment_wins_over_the_settings_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings_file(monkeypatch, tmp_path, 'host = "192.0.2.10"\nport = 9000\n')
    monkeypatch.setenv("DIALTONE_PORT", "9100")

    settings = load_settings()

    assert (settings.host, settings.port) == ("192.0.2.10", 9100)


def test_explicit_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIALTONE_PORT", "9100")

    assert load_settings(port=9200).port == 9200


def test_variables_without_the_settings_own_names_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "3000")
    monkeypatch.setenv("HOST", "192.0.2.10")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")

    settings = load_settings()

    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.1", 8080, "INFO")


def test_database_url_selects_an_external_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://dialtone@db.internal:5432/dialtone")

    assert load_settings().database_url == "postgresql://dialtone@db.internal:5432/dialtone"


def test_a_port_that_is_not_a_number_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(monkeypatch, "DIALTONE_PORT", "abc")

    assert message.startswith("DIALTONE_PORT: ")
    assert "'abc'" in message


def test_a_port_out_of_range_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(monkeypatch, "DIALTONE_PORT", "70000")

    assert message.startswith("DIALTONE_PORT: ")
    assert "65535" in message


def test_offline_workers_default_to_two_and_are_read_from_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().offline_workers == 2
    monkeypatch.setenv("DIALTONE_OFFLINE_WORKERS", "6")
    assert load_settings().offline_workers == 6


def test_zero_offline_workers_are_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(monkeypatch, "DIALTONE_OFFLINE_WORKERS", "0")

    assert message.startswith("DIALTONE_OFFLINE_WORKERS: ")


def test_a_database_url_that_is_not_postgresql_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(monkeypatch, "DATABASE_URL", "mysql://root@localhost/dialtone")

    assert message.startswith("DATABASE_URL: must be a postgresql:// URL")


def test_a_public_url_that_is_not_http_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(monkeypatch, "DIALTONE_PUBLIC_URL", "ftp://calls.example.com")

    assert message.startswith("DIALTONE_PUBLIC_URL: must be an http:// or https:// URL")


def test_every_bad_setting_is_named_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIALTONE_PORT", "abc")
    monkeypatch.setenv("DATABASE_URL", "mysql://root@localhost/dialtone")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "DIALTONE_PORT: " in str(caught.value)
    assert "DATABASE_URL: " in str(caught.value)


def test_a_missing_settings_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"

    message = error_of(monkeypatch, "DIALTONE_CONFIG", str(missing))

    assert message == f"DIALTONE_CONFIG: no settings file at {missing}"


def test_a_malformed_settings_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = settings_file(monkeypatch, tmp_path, "port = [\n")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert str(caught.value).startswith(f"{path}: ")


def test_a_misspelt_key_in_the_settings_file_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Ignored, it would leave the engine on its embedded database while the operator believes it uses this one.
    path = settings_file(monkeypatch, tmp_path, 'databse_url = "postgresql://dialtone@db.internal:5432/dialtone"\n')

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert str(caught.value) == f"{path}: 'databse_url' is not a setting (did you mean database_url?)"


def test_the_settings_file_takes_the_variables_names_in_any_case(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings_file(monkeypatch, tmp_path, 'DIALTONE_PORT = 9002\ndialtone_s3_prefix = "calls/"\n')

    settings = load_settings()

    assert (settings.port, settings.s3_prefix) == (9002, "calls/")


def test_the_twilio_auth_token_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)

    settings = load_settings()

    assert settings.twilio_auth_token is not None
    assert settings.twilio_auth_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)


def test_the_twilio_auth_token_is_not_in_error_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)

    message = error_of(monkeypatch, "DIALTONE_PORT", "abc")

    assert TOKEN not in message


def test_a_bad_twilio_auth_token_is_named_without_its_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings_file(monkeypatch, tmp_path, f'twilio_auth_token = ["{TOKEN}"]\n')

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert str(caught.value).startswith("TWILIO_AUTH_TOKEN: ")
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgres ql://dialtone:pg-pass-5e1f@db.internal:5432/dialtone",  # a typo in the scheme
        "mysql://dialtone:pg-pass-5e1f@db.internal/dialtone",
        "host=db.internal user=dialtone password=pg-pass-5e1f",  # libpq's keyword form, which asyncpg does not read
    ],
)
def test_a_bad_database_url_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    # The error quoted the URL as given, password and all, on the process's stderr and in its logs.
    message = error_of(monkeypatch, "DATABASE_URL", url)

    assert message.startswith("DATABASE_URL: must be a postgresql:// URL")
    assert "pg-pass-5e1f" not in message
    assert "db.internal" in message


def test_the_database_password_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://dialtone:pg-pass-5e1f@db.internal/dialtone")

    settings = load_settings()

    assert settings.database_url == "postgresql://dialtone:pg-pass-5e1f@db.internal/dialtone"
    assert "pg-pass-5e1f" not in repr(settings)
    assert "pg-pass-5e1f" not in str(settings)


def test_each_plan_has_a_credit_rate_a_minute_set_by_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().credit_rates == {"free": 1, "pro": 1, "enterprise": 1}
    monkeypatch.setenv("DIALTONE_CREDITS_PER_MINUTE_PRO", "3")
    monkeypatch.setenv("DIALTONE_CREDITS_PER_MINUTE_ENTERPRISE", "0")

    assert load_settings().credit_rates == {"free": 1, "pro": 3, "enterprise": 0}


def test_a_negative_credit_rate_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "DIALTONE_CREDITS_PER_MINUTE_FREE" in error_of(monkeypatch, "DIALTONE_CREDITS_PER_MINUTE_FREE", "-1")
