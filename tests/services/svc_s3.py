"""A real S3-compatible HTTP server for tests: moto's standalone server on 127.0.0.1.

`s3_server` (session) starts one `python -m moto.server` subprocess on a free port and stops it
by PID at the end; `s3_bucket` gives each test a fresh bucket in it, with dummy credentials set
in the test's environment only. `s3_server_factory` starts private servers that a test may
stop, freeze or kill (never the shared one); `s3_auth_server` is a private server that checks
request signatures and IAM policies.

moto's server routes every request by rescanning its own package directory (~180 `stat`
calls); the bootstrap below memoizes that scan before running `moto.server.main`, which about
triples its throughput here and changes nothing of its S3 behaviour. If a moto release drops
that function, the bootstrap runs the server unchanged.

moto does not check signatures unless told to (see `s3_auth_server`), but it does honour
`If-None-Match: *` on PUT and on multipart completion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ._common import free_port, private_servers, stop_process, unavailable, wait_until_listening

# Dummy credentials: moto accepts any key unless auth is switched on. Never real ones.
DUMMY_ACCESS_KEY = "AKIARULEWORKTESTKEY0"
DUMMY_SECRET_KEY = "rulework-test-secret-not-a-real-key"

_BOOTSTRAP = """
import sys
try:
    import moto.backends as _backends
    _modules = tuple(_backends.list_of_moto_modules())
    _backends.list_of_moto_modules = lambda: _modules
except (ImportError, AttributeError):
    pass
from moto.server import main
main(sys.argv[1:])
"""

_START_TIMEOUT = 60.0  # a safety net: moto starts in about a second


def _moto_available() -> bool:
    try:
        import boto3  # type: ignore[import-untyped]  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def _require_moto() -> None:
    if _moto_available():
        return
    message = (
        "moto's S3 server is not installed: pip install 'moto[server]==5.2.5' "
        "(it is in rulework's `test` extra)"
    )
    unavailable(message)


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=DUMMY_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=DUMMY_SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class MotoServer:
    """One moto server process. `endpoint` is its URL; stop it with `stop()` (by PID)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing ever answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port then refuses connections."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._stopped = True

    def stop(self) -> None:
        """Terminate (then kill if it lingers) and reap the process."""
        if self._stopped:
            return
        self._stopped = True
        stop_process(self.process)

    def boto3_client(self, **credentials: str) -> Any:
        """A boto3 S3 client for setting up and inspecting state independently of rulework."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=credentials.get("access_key", DUMMY_ACCESS_KEY),
            aws_secret_access_key=credentials.get("secret_key", DUMMY_SECRET_KEY),
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def iam_client(self) -> Any:
        import boto3

        return boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
        )


def start_moto_server(log_dir: Path, *, extra_env: dict[str, str] | None = None) -> MotoServer:
    """Start a moto server on a free port and wait (bounded) until it accepts connections."""
    _require_moto()
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        log_path = log_dir / f"moto-{port}.log"
        env = _server_env() | (extra_env or {})
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        server = MotoServer(process, port, log_path)
        if _wait_until_listening(server):
            return server
        last_error = server.log_tail()
        server.stop()
    raise RuntimeError(f"moto's S3 server did not start; its log ends with:\n{last_error}")


def _wait_until_listening(server: MotoServer) -> bool:
    return wait_until_listening(server.process, server.port, _START_TIMEOUT)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The shared moto S3 server of the test session (do not stop or kill it)."""
    server = start_moto_server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], MotoServer]]:
    """Starts private moto servers for one test (to kill or freeze); all stopped afterwards."""
    with private_servers(
        lambda: start_moto_server(tmp_path_factory.mktemp("moto-private"))
    ) as start:
        yield start


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Dummy AWS credentials in this test's environment, isolated from the host's AWS setup."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    empty = tmp_path_factory.mktemp("aws-config")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    # Never consult the host's files, nor instance metadata (a network call off this machine).
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class S3Bucket:
    """A fresh, empty bucket on a moto server, and a boto3 client to inspect it."""

    server: MotoServer
    name: str
    client: Any

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def config(self, **overrides: Any) -> Any:
        """An `S3CacheConfig` for this bucket (short timeouts suit loopback)."""
        from rulework.backends.s3 import S3CacheConfig

        settings: dict[str, Any] = {
            "bucket": self.name,
            "endpoint_url": self.endpoint,
            "timeout_seconds": 5.0,
        }
        settings.update(overrides)
        return S3CacheConfig(**settings)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket (under `prefix`), sorted."""
        found: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
            found.extend(obj["Key"] for obj in page.get("Contents", ()))
        return sorted(found)

    def multipart_uploads(self) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = self.client.list_multipart_uploads(Bucket=self.name).get(
            "Uploads", []
        )
        return uploads


def make_bucket(server: MotoServer, **credentials: str) -> S3Bucket:
    client = server.boto3_client(**credentials)
    name = f"rw-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(server, name, client)


@pytest.fixture
def s3_bucket(s3_server: MotoServer, s3_env: None) -> S3Bucket:
    """A fresh bucket on the shared server, with dummy credentials in the environment."""
    return make_bucket(s3_server)


@dataclass(frozen=True)
class AuthUsers:
    """Credentials of IAM users on `s3_auth_server` (access key, secret key) and its bucket."""

    server: MotoServer
    bucket: str
    writer: tuple[str, str]
    reader: tuple[str, str]
    nobody: tuple[str, str]


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthUsers]:
    """A private moto server that verifies SigV4 signatures and enforces IAM policies.

    Users: `writer` (s3:* on the bucket), `reader` (get/head/list only), `nobody` (no policy).
    """
    server = start_moto_server(tmp_path_factory.mktemp("moto-auth"))
    try:
        iam = server.iam_client()
        bucket = f"rw-auth-{uuid.uuid4().hex[:12]}"
        server.boto3_client().create_bucket(Bucket=bucket)
        arn = f"arn:aws:s3:::{bucket}"
        policies = {
            "writer": [{"Effect": "Allow", "Action": "s3:*", "Resource": [arn, f"{arn}/*"]}],
            "reader": [
                {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{arn}/*"]},
                {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [arn]},
            ],
            "nobody": [],
        }
        keys: dict[str, tuple[str, str]] = {}
        for user, statements in policies.items():
            iam.create_user(UserName=user)
            if statements:
                iam.put_user_policy(
                    UserName=user,
                    PolicyName=f"{user}-policy",
                    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
                )
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        # From now on every request is authenticated and authorized.
        import urllib.request

        request = urllib.request.Request(
            f"{server.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            # Not a form: moto reads the raw body as the number of unauthenticated requests.
            headers={"Content-Type": "application/octet-stream"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as answer:
            assert answer.status == 200
        yield AuthUsers(server, bucket, keys["writer"], keys["reader"], keys["nobody"])
    finally:
        server.stop()


__all__ = [
    "DUMMY_ACCESS_KEY",
    "DUMMY_SECRET_KEY",
    "AuthUsers",
    "MotoServer",
    "S3Bucket",
    "make_bucket",
    "s3_auth_server",
    "s3_bucket",
    "s3_env",
    "s3_server",
    "s3_server_factory",
    "start_moto_server",
]
