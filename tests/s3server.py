"""A real S3-compatible server for the tests: moto's server mode (``moto_server``) in its own
process on 127.0.0.1 — what s3fs's and zarr's own suites test against. Nothing of the client
is mocked: requests go over a socket to a server that keeps the objects."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["S3Server", "start_s3_server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running ``moto_server``; :meth:`env` is what a client process needs to reach it."""

    endpoint: str
    proc: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_MAX_ATTEMPTS": "3",
            **extra,
        }

    def fs(self) -> object:
        """An s3fs file system on this server (for setting up buckets and damage)."""
        import s3fs

        e = self.env()
        return s3fs.S3FileSystem(
            key=e["AWS_ACCESS_KEY_ID"],
            secret=e["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
        )

    def make_bucket(self, name: str) -> str:
        self.fs().mkdir(name)  # type: ignore[attr-defined]
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_s3_server(*, check_credentials: bool = False, timeout: float = 60) -> S3Server:
    """Start ``moto_server`` on a free loopback port and wait until it answers.

    ``check_credentials``: the server checks every request's signature and access key (moto's
    IAM mode with no unauthenticated requests allowed), so unknown keys are refused.
    """
    port = _free_port()
    env = {**os.environ}
    if check_credentials:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return S3Server(endpoint, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout} s")
