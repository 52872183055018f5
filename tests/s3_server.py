"""An S3-compatible server on loopback for tests: moto's standalone server, spoken to over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from moto.server import ThreadedMotoServer

ACCESS_KEY_ID = "test-access-key"
SECRET_ACCESS_KEY = "test-secret-key"


@dataclass(frozen=True, slots=True)
class S3Server:
    """Where the local S3 server listens, and the settings that point the engine at one of its buckets."""

    endpoint_url: str

    def settings(self, bucket: str, **overrides: object) -> dict[str, object]:
        """Engine settings keeping recordings in `bucket` of this server."""
        return {
            "recording_store": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": self.endpoint_url,
            "s3_access_key_id": ACCESS_KEY_ID,
            "s3_secret_access_key": SECRET_ACCESS_KEY,
            **overrides,
        }


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Run moto's S3 server on 127.0.0.1 on a free port for the length of the block."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
