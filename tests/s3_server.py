"""A real S3-compatible HTTP server on 127.0.0.1 for the tests of the S3 blob store, loaded as a
pytest plugin (`pytest_plugins = ["s3_server"]`): moto's server on a thread of the test
process, spoken to over HTTP with boto3 like any S3 endpoint. Its buckets live in the test
process, so they outlast a `stop()` and `start()` of the server (the store going away and
coming back)."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field

import boto3
import pytest
from moto.server import ThreadedMotoServer

# What boto3 reads, in this process (monkeypatched per test) and in a server's environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cotune-test", "AWS_SECRET_ACCESS_KEY": "cotune-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    port: int
    _server: ThreadedMotoServer | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def environment(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> None:
        if self._server is None:
            self._server = ThreadedMotoServer("127.0.0.1", self.port, verbose=False)
            self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def new_bucket(self) -> str:
        name = f"cotune-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def client(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in listed.get("Contents", ()))


@pytest.fixture(scope="session")
def s3_server():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = S3Server(port)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server, monkeypatch) -> str:
    """s3://<a fresh bucket>/<prefix>, with boto3's environment set for this process."""
    s3_server.start()  # a test that stopped it and failed may have left it stopped
    for name, value in s3_server.environment.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.new_bucket()}/cluster-a"
