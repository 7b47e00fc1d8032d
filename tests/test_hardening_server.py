"""A server that cannot be exhausted (issue 17, items 1–5): header size and header time
limits, a cap on connections waiting for headers, tokens kept out of worker environments,
a bounded Range parser, and a store damaged mid-stream named to the client, not retried,
and counted as an error in /metrics. Real uvicorn servers on real sockets."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from logitstore_server import guard
from logitstore_server.app import ServerConfig, create_app

import logitstore

GOLDEN = Path(__file__).parent / "golden" / "v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GOLDEN / "topk-u8.zarr", tmp_path / "s.zarr"))


@contextmanager
def in_process(store: Path, **settings: object) -> Iterator[int]:
    """The app over ``store`` with the guarded protocol, in a thread; yields its port."""
    port = _free_port()
    config = uvicorn.Config(
        create_app(ServerConfig.from_cli([store], **settings)),  # type: ignore[arg-type]
        host="127.0.0.1",
        port=port,
        http=guard.GuardedHttpTools,
        log_level="error",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def subprocess_server(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "logitstore", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                time.sleep(0.1)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()


def _request(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_oversized_headers_are_refused_with_431(store: Path) -> None:
    with in_process(store) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /v1/stores HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Probe: " + b"a" * 1000 + b"\r\n"
        try:
            for _ in range(1024):  # 1 MiB, far past the 64 KiB limit
                s.sendall(line)
        except OSError:
            pass  # closed by the server
        s.settimeout(5)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "headers_too_large"


def test_one_endless_header_line_is_refused_with_431(store: Path) -> None:
    # httptools keeps a header's value until its line ends, and only then reports it: the
    # limit counts the bytes received, not the lines reported (1 MiB in one unfinished line)
    with in_process(store) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /v1/stores HTTP/1.1\r\nHost: x\r\nX-Probe: ")
        try:
            for _ in range(256):
                s.sendall(b"a" * 4096)
        except OSError:
            pass  # closed by the server
        s.settimeout(5)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_a_half_sent_request_is_closed_after_the_header_timeout(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard, "HEADER_TIMEOUT", 0.5)
    with in_process(store) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /v1/stores HTTP/1.1\r\nHost: x\r\nX-Half: ")
        assert _closed_within(s, 5)
        assert _request(port, "/v1/health")[0] == 200


def test_a_body_sent_a_byte_at_a_time_is_closed_after_the_body_timeout(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each byte received restarts uvicorn's keep-alive timer: without a limit of its own, a
    # body that never ends holds its connection for ever
    monkeypatch.setattr(guard, "BODY_TIMEOUT", 1.0)
    with in_process(store) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        closed = False
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not closed:
            try:
                s.sendall(b"a")
            except OSError:
                closed = True
                break
            s.settimeout(0.3)
            try:
                while s.recv(4096):
                    pass
                closed = True
            except TimeoutError:
                pass
            except OSError:
                closed = True
        assert closed
        assert _request(port, "/v1/health")[0] == 200


def test_a_body_over_the_limit_is_refused_with_413(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a request body is read whole before it is parsed: 1.5 GB once cost 1.6 GB of RSS
    monkeypatch.setattr(guard, "MAX_BODY_BYTES", 1 << 20)
    with in_process(store) as port, socket.create_connection(("127.0.0.1", port)) as s:
        n = 4 << 20
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % n
        )
        try:
            for _ in range(n >> 16):
                s.sendall(b" " * (1 << 16))
        except OSError:
            pass  # closed by the server
        s.settimeout(5)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"


def test_half_sent_requests_cannot_crowd_out_new_clients(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard, "MAX_WAITING", 8)
    with in_process(store) as port:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for s in socks:
            s.sendall(b"GET /v1/stores HTTP/1.1\r\nHost: x\r\nX-Half: ")
        t0 = time.monotonic()
        assert _request(port, "/v1/stores")[0] == 200
        assert time.monotonic() - t0 < 2
        closed = sum(_closed_within(s, 0.5) for s in socks[:12])
        for s in socks:
            s.close()
    assert closed == 12  # the oldest, beyond the 8 allowed to wait


def test_a_range_number_of_thousands_of_digits_is_a_400(store: Path) -> None:
    with in_process(store) as port:
        status, body = _request(
            port, "/v1/stores/s.zarr/zarr/zarr.json", {"Range": "bytes=" + "9" * 4301 + "-"}
        )
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_range_header"


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_tokens_never_reach_a_process_environment(store: Path, tmp_path: Path) -> None:
    token = "s3cret-token-" + "x" * 20
    (tmp_path / "tokens").write_text(token + "\n")
    args = (str(store), "--workers", "2", "--token-file", str(tmp_path / "tokens"))
    with subprocess_server(*args) as (proc, port):
        auth = {"Authorization": f"Bearer {token}"}
        assert _request(port, "/v1/stores", auth)[0] == 200  # the workers read the file
        assert _request(port, "/v1/stores")[0] == 401
        pids = [proc.pid, *_children(proc.pid)]
        pids += [c for p in pids[1:] for c in _children(p)]
        assert len(pids) >= 3, pids  # the supervisor and its two workers
        for pid in pids:
            assert token.encode() not in _environ(pid), f"the token is in /proc/{pid}/environ"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_store_damaged_mid_stream_is_named_not_retried_and_counted(store: Path) -> None:
    _flip(store / "values" / "c" / "1" / "0")  # shard 1: positions 8-8
    with subprocess_server(str(store), "--block-positions", "4") as (_, port):
        remote = logitstore.open(f"http://127.0.0.1:{port}/v1/stores/s.zarr")
        assert remote.read(0, 8).ids.shape[0] == 8  # the good shard streams
        t0 = time.monotonic()
        with pytest.raises(logitstore.CorruptStoreError, match="store_error"):
            remote.read(0, 9)
        assert time.monotonic() - t0 < 2
        assert remote.retried == 0  # type: ignore[attr-defined]
        metrics = _request(port, "/metrics")[1].decode()
    assert 'route="/v1/stores/{name}/positions",status="500"} 1' in metrics, metrics


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_that_is_no_port(
    store: Path, port: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 99999 was taken modulo 65536: the server listened on 34463 and printed :99999
    from logitstore_server import app

    from logitstore.cli import main

    monkeypatch.setattr(app, "serve", lambda *a, **k: pytest.fail("a server was started"))
    with pytest.raises(SystemExit) as e:
        main(["serve", str(store), "--port", port])
    assert e.value.code == 2
    assert "port" in capsys.readouterr().err
