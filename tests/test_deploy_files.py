"""docker-compose.yml, the Dockerfile and deploy/nginx.conf, checked statically (containers cannot run here):
every variable the engine is given is a real setting that loads, the image's user can write the state folder,
the final image has no build tools, and ports and health checks agree from the engine to the load balancer."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config.settings import Settings, load_settings
from engine.server.app import create_app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")
SECRET_KEY = "0123456789abcdef" * 4


def env_example() -> dict[str, str]:
    """The variables .env.example documents, with their example values."""
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """What docker compose makes of `${NAME}`, `${NAME:-default}` and `${NAME:?error}` given `env`."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        given = env.get(name, "")
        if op == ":?" and not given:
            raise AssertionError(f"compose refuses to start: {name} is required ({arg})")
        return given or (arg if op == ":-" else "")

    return _VARIABLE.sub(value, text).replace("$$", "$")


def filled_env() -> dict[str, str]:
    """.env.example as a user fills it in: the secret key set."""
    return {**env_example(), "DIALTONE_SECRET_KEY": SECRET_KEY}


def setting_names() -> set[str]:
    """The environment variables the engine reads: each setting's first alias."""
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices and isinstance(choices[0], str):
            names.add(choices[0])
    return names


@dataclass(frozen=True)
class Stage:
    """One FROM stage of the Dockerfile: its base and instructions (keyword, arguments)."""

    base: str
    instructions: list[tuple[str, str]]

    def args(self, keyword: str) -> list[str]:
        """The arguments of every instruction of that keyword."""
        return [arguments for kw, arguments in self.instructions if kw == keyword]


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append(Stage(arguments.split()[0], []))
        else:
            stages[-1].instructions.append((keyword.upper(), arguments.strip()))
    return stages


def env_instruction(stage: Stage) -> dict[str, str]:
    """The variables the stage's ENV instructions set."""
    values: dict[str, str] = {}
    for arguments in stage.args("ENV"):
        for word in shlex.split(arguments):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def service(name: str) -> dict[str, Any]:
    """A compose service's definition."""
    definition: dict[str, Any] = COMPOSE["services"][name]
    return definition


def health_url(check: list[str]) -> str:
    """The URL a health-check command fetches."""
    text = " ".join(check)
    found = re.search(r"https?://[^\s'\"]+", text)
    assert found is not None, f"no URL in health check {check}"
    return found.group(0)


def test_every_variable_the_compose_file_reads_is_documented_in_env_example() -> None:
    used = {match["name"] for match in _VARIABLE.finditer((ROOT / "docker-compose.yml").read_text())}
    assert used - set(env_example()) == set()


def test_compose_starts_with_env_example_filled_in_and_refuses_without_the_secret_key() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    interpolate(text, filled_env())
    with pytest.raises(AssertionError, match="DIALTONE_SECRET_KEY"):
        interpolate(text, env_example())


def test_every_variable_given_to_the_engine_is_a_setting_and_they_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # As compose does: the YAML is parsed first, then each value interpolated.
    env = filled_env()
    environment = {k: interpolate(str(v), env) for k, v in service("engine")["environment"].items()}
    assert set(environment) - setting_names() == set()
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.recording_store == "s3"
    assert settings.s3_bucket == interpolate(service("minio-setup")["environment"]["DIALTONE_S3_BUCKET"], env)
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == SECRET_KEY
    assert settings.twilio_auth_token is None  # left empty in .env: unset, not an empty token
    assert settings.recording_retention_days is None
    assert urlsplit(settings.database_url or "").hostname == "postgres"
    assert urlsplit(settings.s3_endpoint_url or "").hostname == "minio"


def test_the_recordings_bucket_is_created_before_the_engines_start() -> None:
    setup = service("minio-setup")
    assert "mc mb --ignore-existing" in " ".join(setup["entrypoint"])
    assert '"local/$$DIALTONE_S3_BUCKET"' in " ".join(setup["entrypoint"])
    assert service("engine")["depends_on"]["minio-setup"] == {"condition": "service_completed_successfully"}


def test_postgres_is_an_image_with_pgvector() -> None:
    assert service("postgres")["image"].startswith("pgvector/pgvector:pg16")


def test_the_final_image_runs_as_a_non_root_user_that_owns_the_state_folder() -> None:
    final = dockerfile_stages()[-1]
    (user,) = final.args("USER")
    assert user not in ("root", "0")
    state_dir = env_instruction(final)["DIALTONE_STATE_DIR"]
    made = [args for args in final.args("RUN") if re.search(rf"install -d -o {user} -g {user}\b.* {state_dir}\b", args)]
    assert made, f"the final stage must make {state_dir} owned by {user}"
    # The compose volume for the state folder mounts exactly there, so a new volume starts owned by that user.
    assert f"state:{state_dir}" in service("engine")["volumes"]
    assert service("engine").get("user") in (None, user)


def test_the_final_image_copies_the_built_environment_and_has_no_build_tools() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert any("build-essential" in args for args in build.args("RUN"))
    assert not any(re.search(r"apt-get install|build-essential|gcc", args) for args in final.args("RUN"))
    assert any(args.startswith("--from=build /opt/dialtone") for args in final.args("COPY"))
    for args in build.args("COPY"):
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"


def test_ports_agree_from_the_engine_through_the_load_balancer() -> None:
    final = dockerfile_stages()[-1]
    command = " ".join(final.args("CMD"))
    port = re.search(r'"--port", "(\d+)"', command)
    assert port is not None
    engine_port = port.group(1)
    assert final.args("EXPOSE") == [engine_port]
    assert re.search(rf"server engine:{engine_port}\b", NGINX)
    assert "ports" not in service("engine"), "replicas are reached only through the load balancer"
    listen = re.search(r"listen (\d+);", NGINX)
    assert listen is not None
    (published,) = service("lb")["ports"]
    assert published.split(":")[-1] == listen.group(1)
    assert published.startswith("127.0.0.1:")


def test_health_checks_gate_the_load_balancer_and_probe_real_routes() -> None:
    final = dockerfile_stages()[-1]
    image_check = health_url(final.args("HEALTHCHECK"))
    compose_check = health_url(service("engine")["healthcheck"]["test"])
    routes = {resource.canonical for resource in create_app(load_settings()).router.resources()}
    for url in (image_check, compose_check):
        parts = urlsplit(url)
        assert parts.path in routes
        assert str(parts.port) in re.findall(r'"--port", "(\d+)"', " ".join(final.args("CMD")))
    lb_check = urlsplit(health_url(service("lb")["healthcheck"]["test"]))
    assert f"location = {lb_check.path} " in NGINX
    assert service("lb")["depends_on"]["engine"] == {"condition": "service_healthy"}
    for name, definition in COMPOSE["services"].items():
        for needed, condition in definition.get("depends_on", {}).items():
            if condition == {"condition": "service_healthy"}:
                assert "healthcheck" in service(needed), f"{name} waits for {needed}'s health, which has no check"


def test_the_load_balancer_passes_websockets_for_as_long_as_a_call_lasts() -> None:
    assert "proxy_http_version 1.1;" in NGINX
    assert "proxy_set_header Upgrade $http_upgrade;" in NGINX
    assert "proxy_set_header Connection $connection_upgrade;" in NGINX
    timeout = re.search(r"proxy_read_timeout (\d+)s;", NGINX)
    assert timeout is not None and int(timeout.group(1)) >= 3600
    assert service("lb")["volumes"] == ["./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"]


def nginx_block(opening: str) -> str:
    """The text of the nginx block that starts with `opening` (e.g. `server`, `location = /x`), braces balanced."""
    start = NGINX.index(opening + " {")
    depth = 0
    for index in range(NGINX.index("{", start), len(NGINX)):
        depth += {"{": 1, "}": -1}.get(NGINX[index], 0)
        if depth == 0:
            return NGINX[start : index + 1]
    raise AssertionError(f"unbalanced nginx block {opening}")


def next_upstream(block: str) -> set[str]:
    """The conditions of the `proxy_next_upstream` directive written directly in `block` (not in nested ones)."""
    flat = re.sub(r"\{[^{}]*\}", "", block[block.index("{") + 1 :])
    found = re.search(r"^\s*proxy_next_upstream ([^;]+);", flat, re.MULTILINE)
    assert found is not None, f"no proxy_next_upstream in {block[:40]!r}"
    return set(found.group(1).split())


def test_a_stopped_replica_is_given_time_to_drain_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    env = filled_env()
    for name, value in service("engine")["environment"].items():
        monkeypatch.setenv(name, interpolate(str(value), env))
    drain = load_settings().drain_seconds
    grace = re.fullmatch(r"(\d+)s", service("engine")["stop_grace_period"])
    assert grace is not None
    assert drain > 0
    # After the drain: up to 30 s to end the calls left (LiveCalls.end_all) and 10 s to close the connections.
    assert int(grace.group(1)) >= drain + 40, "ending the calls left after the drain, and closing, take time too"
    assert dockerfile_stages()[-1].args("STOPSIGNAL") == ["SIGTERM"]


def test_the_load_balancer_tries_another_engine_when_one_drains() -> None:
    # A draining engine answers 503 to /health, a new media stream (a GET) and Twilio's voice webhook (a POST).
    assert "http_503" in next_upstream(nginx_block("server"))
    assert "non_idempotent" not in next_upstream(nginx_block("server")), "an API call must never be placed twice"
    assert {"http_503", "non_idempotent"} <= next_upstream(nginx_block("location = /twilio/voice"))
    assert "proxy_pass http://engines;" in nginx_block("location = /twilio/voice")
    assert re.search(r"server engine:\d+ resolve max_fails=1 ", NGINX), "a replica answering 503 is left out a while"
