"""`logitstore serve --workers N`: N real uvicorn worker processes on one real socket. The
setting is checked before anything starts; /v1/health says how many workers there are;
/metrics answers for the whole server whichever worker a scrape reaches, and keeps a dead
worker's counts after uvicorn replaces it (docs/PROTOCOL.md §4, "Worker processes")."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from logitstore_server.config import ServerConfig, max_workers
from logitstore_server.metrics import FLUSH_SECONDS

import logitstore
from logitstore import Encoding

VOCAB = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The process ids ``pid`` started (Linux)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return out


class Serving:
    """`logitstore serve` in a subprocess on a free port, stopped as an operator stops it
    (SIGINT: the supervisor stops its workers); a worker still alive after that is killed."""

    def __init__(self, stores: list[Path], *extra: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "logitstore", "serve", *map(str, stores)]
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/v1/health")[0] == 200:
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    self.stop()
                    raise RuntimeError(
                        f"the server did not start: {err.decode()[-2000:]}"
                    ) from None
                time.sleep(0.1)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/v1/stores/{name}"

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def workers(self) -> list[int]:
        """The worker processes (not multiprocessing's resource tracker)."""
        out = []
        for pid in children(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
        return out

    def stop(self) -> None:
        workers = self.workers() if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in workers:  # never leave a worker holding the port
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of series ``name{labels}`` in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def worker_requests(text: str) -> dict[int, float]:
    pattern = r'^logitstore_worker_requests_total\{worker="(\d+)"\} (\S+)$'
    return {int(m[1]): float(m[2]) for m in re.finditer(pattern, text, re.M)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    seqs = logitstore.sequences_from_token_ids(
        [rng.integers(0, VOCAB, rng.integers(20, 200)) for _ in range(40)], 128
    )
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(4)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )
    path = tmp_path_factory.mktemp("workers") / "w.zarr"
    enc = Encoding("topk", "u8", k=16)
    return logitstore.capture(teacher, seqs, path, enc, progress=False, chunk_positions=256)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0", "--workers must be a number of server processes, at least 1; got 0"),
        ("-2", "at least 1; got -2"),
        (str(max_workers() + 1), "4 per core here"),
    ],
)
def test_a_bad_worker_count_is_refused_before_anything_starts(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from logitstore.cli import main

    # The store does not exist: the count is checked first, so its error is the one shown.
    assert main(["serve", "/nonexistent/x.zarr", "--workers", value]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_worker_count_that_is_no_number_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from logitstore.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["serve", "x.zarr", "--workers", "two"])
    assert stop.value.code == 2 and "invalid int value: 'two'" in capsys.readouterr().err


def test_the_config_carries_the_worker_count_to_the_workers(store: Path) -> None:
    config = ServerConfig.from_cli([store], workers=2)
    assert ServerConfig.from_json(config.to_json()).workers == 2
    with pytest.raises(logitstore.LogitStoreError, match="at least 1; got True"):
        ServerConfig(config.stores, workers=True)


def test_help_says_when_more_workers_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "logitstore", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    text = " ".join(proc.stdout.split())
    assert "--workers N" in text and "row streams" in text and "/metrics sums all workers" in text


def _wait_for(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_two_workers_serve_one_port_and_metrics_answer_for_both(store: Path) -> None:
    server = Serving([store], "--workers", "2")
    try:
        workers = server.workers()
        assert len(workers) == 2, workers
        status, body = server.get("/v1/health")
        assert status == 200 and json.loads(body) == {"status": "ok", "stores": 1, "workers": 2}
        # Many connections at once: the kernel hands them to both workers.
        conns = [http.client.HTTPConnection("127.0.0.1", server.port) for _ in range(16)]
        for c in conns:
            c.request("GET", "/v1/stores")
        for c in conns:
            assert c.getresponse().read()
            c.close()
        made = 17  # the health check and the 16 lists (the start-up polls came before)

        def summed() -> bool:
            text = server.metrics()
            lists = metric(text, "logitstore_requests_total", route="/v1/stores", status="200")
            per_worker = worker_requests(text)
            return (
                lists == 16
                and metric(text, "logitstore_worker_processes") == 2
                and set(per_worker) == set(workers)
                and sum(per_worker.values()) >= made
            )

        _wait_for(summed)  # each worker publishes its counts within 0.5 s
        # A worker that dies is replaced, and what it counted stays in every scrape.
        served = {pid: n for pid, n in worker_requests(server.metrics()).items() if n > 0}
        victim = max(served, key=lambda pid: served[pid])
        time.sleep(2 * FLUSH_SECONDS)  # its last counts are published
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: len(server.workers()) == 2 and victim not in server.workers(), 30)
        _wait_for(lambda: server.get("/v1/health")[0] == 200)

        def kept() -> bool:
            text = server.metrics()
            return (
                metric(text, "logitstore_worker_processes") == 3
                and worker_requests(text).get(victim, 0) >= served[victim]
                and metric(text, "logitstore_requests_total", route="/v1/stores", status="200")
                == 16
            )

        _wait_for(kept)
    finally:
        server.stop()
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a worker outlived the server"


def test_a_trainer_that_pauses_between_reads_keeps_its_connection(store: Path) -> None:
    # uvicorn closes an idle connection after 5 s by default: every training step longer
    # than that cost a retry (and its backoff) on the next read.
    server = Serving([store])
    try:
        with logitstore.RemoteStore(server.url("w.zarr")) as remote:
            first = remote.read(0, 100)
            time.sleep(6.0)
            again = remote.read(0, 100)
            assert remote.retried == 0
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    finally:
        server.stop()
