"""Stores in object storage, tested against a real S3-compatible server process on loopback
(moto's server mode, tests/s3server.py): writing and resuming after SIGKILL with byte
identity, the lease that refuses a second writer, verify of a damaged object, copy either
way, serve from S3, LogitDataset with DataLoader workers, and clear errors for bad
credentials, buckets and endpoints."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import logitstore
import logitstore.write.lease as lease_module
from logitstore import Encoding, StoreWriter, encode_rows
from logitstore.cli.main import main as cli_main
from logitstore.errors import StorageError
from logitstore.format.objects import CREATING_KEY, WRITER_KEY, ObjectLocation
from logitstore.tools.copy import copy_store
from logitstore.write.lease import _Lease, object_lease

from .conftest import CORPUS, deterministic_env
from .s3server import S3Server, start_s3_server

N, V = 3000, 512
ENC = Encoding("topk", "u8", k=16)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture()
def bucket(s3: S3Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket for the test, and the AWS environment that reaches the server."""
    for k, v in s3.env(SOURCE_DATE_EPOCH="1700000000").items():
        monkeypatch.setenv(k, v)
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return s3.make_bucket(f"t-{digest}")


def _rows() -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, N)
    offsets = np.array([0, 700, 1900, N])
    torch.manual_seed(0)
    return ids, offsets, torch.randn(N, V) * 3


def _write(out: str | Path, *, overwrite: bool = False) -> None:
    ids, offsets, logits = _rows()
    with StoreWriter(
        out,
        encoding=ENC,
        vocab_size=V,
        input_ids=ids,
        offsets=offsets,
        shard_positions=512,
        chunk_positions=128,
        overwrite=overwrite,
    ) as w:
        for a in range(0, N, 640):
            b = min(a + 640, N)
            w.write(a, encode_rows(logits[a:b], ENC, 0, torch.arange(a, b)))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _objects(url: str) -> dict[str, bytes]:
    loc = ObjectLocation(url)
    return {k: loc.read(k) or b"" for k in sorted(loc.sizes())}


def test_a_store_written_to_s3_has_the_bytes_of_a_local_one(bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/runs/teacher.zarr"
    _write(tmp_path / "local.zarr")
    _write(url)
    assert _objects(url) == _files(tmp_path / "local.zarr")  # no lease or marker left behind
    a, b = logitstore.open(tmp_path / "local.zarr"), logitstore.open(url)
    assert isinstance(b, logitstore.LogitStore) and b.path == url
    for s0, s1 in [(0, N), (100, 900), (1500, 2999), (2048, 2560)]:
        x, y = a.read(s0, s1), b.read(s0, s1)
        assert np.array_equal(x.ids, y.ids) and np.array_equal(x.probs, y.probs)
    # sequential reads take the read-ahead path: same rows
    got = np.concatenate([b.read(s, min(s + 400, N)).probs for s in range(0, N, 400)])
    assert np.array_equal(got, a.read(0, N).probs)
    assert b.nbytes_stored() == a.nbytes_stored()
    assert logitstore.verify(url).ok


def test_commands_take_s3_urls(bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{bucket}/teacher.zarr/"  # a trailing slash is the same store
    _write(url)
    assert cli_main(["info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == url.rstrip("/") and info["num_positions"] == N
    assert cli_main(["verify", url, "--no-progress"]) == 0
    assert "3,000 positions" in capsys.readouterr().out
    assert cli_main(["show", url, "--position", "1000", "--top", "3"]) == 0
    assert "1000" in capsys.readouterr().out
    out = io.StringIO()
    assert logitstore.export_jsonl(logitstore.open(url), out, ids=True) == 3
    assert len(json.loads(out.getvalue().splitlines()[1])["input_ids"]) == 1200


def test_a_damaged_or_missing_object_is_found_and_named(bucket: str) -> None:
    url = f"s3://{bucket}/damaged.zarr"
    _write(url)
    loc = ObjectLocation(url)
    key = "ids/c/2/0"
    data = bytearray(loc.read(key) or b"")
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a chunk
    loc.write(key, bytes(data))
    report = logitstore.verify(url)
    assert not report.ok
    assert any("shard 2" in f and "ids" in f for f in report.faults), report.faults
    with pytest.raises(logitstore.CorruptStoreError, match="shard 2"):
        logitstore.open(url).read(1024, 1536)
    loc.delete("values/c/1/0")
    faults = logitstore.verify(url).faults
    assert any("shard 1" in f and "values/c/1/0 missing" in f for f in faults), faults
    with pytest.raises(logitstore.CorruptStoreError, match="shard 1"):
        logitstore.open(url).read(600, 700)


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/leased.zarr"
    # Long enough that a renewal slowed by a loaded machine still lands in time (a job whose
    # lease runs out stops writing).
    monkeypatch.setenv("LOGITSTORE_LEASE_SECONDS", "2")
    with object_lease(url):
        _write(url)  # the job that holds the lease writes
        time.sleep(2.5)  # longer than the lease: renewals keep it
        with (
            pytest.raises(logitstore.StoreExistsError, match="another job is writing") as e,
            object_lease(url),
        ):
            pass
        assert "pid" in str(e.value) and WRITER_KEY in str(e.value)
    assert not ObjectLocation(url).exists(WRITER_KEY)  # released on leaving
    # A lease its holder stopped renewing (killed) runs out and is taken over.
    stale = {"job": "dead", "host": "h", "pid": 1, "expires": time.time() - 1}
    ObjectLocation(url).write(WRITER_KEY, json.dumps(stale).encode())
    with object_lease(url):
        assert ObjectLocation(url).read_json(WRITER_KEY)["job"] != "dead"


def test_of_two_jobs_taking_over_a_run_out_lease_one_gets_it(bucket: str) -> None:
    url = f"s3://{bucket}/takeover.zarr"
    stale = {"job": "dead", "host": "h", "pid": 1, "expires": time.time() - 1}
    ObjectLocation(url).write(WRITER_KEY, json.dumps(stale).encode())
    first, second = _Lease(ObjectLocation(url), 60), _Lease(ObjectLocation(url), 60)
    read = second.loc.read

    def read_then_lose_the_race(key: str) -> bytes | None:
        data = read(key)  # the second job has seen the run-out lease...
        first.acquire()  # ...and the first takes it over before the second acts on it
        return data

    second.loc.read = read_then_lose_the_race  # type: ignore[method-assign]
    with pytest.raises(logitstore.StoreExistsError, match="another job is writing"):
        second.acquire()
    assert ObjectLocation(url).read_json(WRITER_KEY)["job"] == first.job
    first.release()


def test_a_renewal_racing_a_takeover_does_not_overwrite_it(bucket: str) -> None:
    """Another job writes the lease between a renewal's read and its put (this job's
    renewals had stalled): the put, conditioned on what was read, fails, and this job
    stops; an unconditional put would overwrite the other job's lease and both would
    write."""
    url = f"s3://{bucket}/renew-race.zarr"
    lease = _Lease(ObjectLocation(url), 0.4)
    lease.acquire()
    other = {"job": "other", "host": "h", "pid": 1, "expires": time.time() + 60}
    read_tagged = lease.loc.read_tagged

    def read_then_lose_the_race(key: str) -> tuple[bytes, str | None] | None:
        tagged = read_tagged(key)  # this job's lease, as the renewal saw it...
        ObjectLocation(url).write(WRITER_KEY, json.dumps(other).encode())  # ...taken over
        return tagged

    lease.loc.read_tagged = read_then_lose_the_race  # type: ignore[method-assign]
    lease.start_renewing()
    deadline = time.time() + 20
    while url not in lease_module._LOST and time.time() < deadline:
        time.sleep(0.05)
    lost = lease_module._LOST.get(url, "")
    lease.release()
    assert "took over its lease while it was renewed" in lost
    assert ObjectLocation(url).read_json(WRITER_KEY)["job"] == "other"


def test_a_job_that_lost_its_lease_stops_before_its_next_shard(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/lost.zarr"
    monkeypatch.setenv("LOGITSTORE_LEASE_SECONDS", "0.4")
    ids, offsets, logits = _rows()
    with (
        object_lease(url),
        pytest.raises(logitstore.StoreExistsError, match="this job stopped writing"),
        StoreWriter(
            url,
            encoding=ENC,
            vocab_size=V,
            input_ids=ids,
            offsets=offsets,
            shard_positions=512,
            chunk_positions=128,
        ) as w,
    ):
        w.write(0, encode_rows(logits[:512], ENC, 0, torch.arange(512)))
        # Another job takes the store over (this one's renewals had failed meanwhile).
        other = {"job": "other", "host": "h", "pid": 1, "expires": time.time() + 60}
        ObjectLocation(url).write(WRITER_KEY, json.dumps(other).encode())
        deadline = time.time() + 20  # the next renewal finds it (0.1 s apart; later if loaded)
        while url not in lease_module._LOST and time.time() < deadline:
            time.sleep(0.05)
        w.write(512, encode_rows(logits[512:], ENC, 0, torch.arange(512, N)))
    assert logitstore.open(url, allow_incomplete=True).metadata.state != "complete"
    assert ObjectLocation(url).read_json(WRITER_KEY)["job"] == "other"  # left alone


def test_a_cut_short_creation_never_reads_as_a_store(bucket: str) -> None:
    url = f"s3://{bucket}/creating.zarr"
    _write(url)
    loc = ObjectLocation(url)
    loc.write(CREATING_KEY, b"{}")  # what a writer killed during creation leaves
    with pytest.raises(logitstore.StoreNotFoundError, match="being created"):
        logitstore.open(url)
    _write(url)  # the next write replaces it
    assert not loc.exists(CREATING_KEY) and logitstore.verify(url).ok


def test_something_else_under_the_prefix_is_never_touched(bucket: str) -> None:
    url = f"s3://{bucket}/notastore"
    ObjectLocation(url).write("data.csv", b"a,b\n")
    with pytest.raises(logitstore.StoreExistsError, match="not a logitstore store"):
        _write(url, overwrite=True)
    assert ObjectLocation(url).read("data.csv") == b"a,b\n"


def test_copy_either_way_is_byte_identical_resumable_and_verified(
    bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src.zarr"
    _write(src)
    url = f"s3://{bucket}/copied.zarr"
    report = copy_store(src, url)
    assert report.verified and report.copied == report.keys
    assert _objects(url) == _files(src)
    # An interrupted copy: some objects and the group's zarr.json missing, marker present.
    loc = ObjectLocation(url)
    loc.write(
        CREATING_KEY, json.dumps({"copy_of": logitstore.open(src).metadata.identity}).encode()
    )
    for key in ("zarr.json", "ids/c/3/0", "values/c/5/0"):
        loc.delete(key)
    with pytest.raises(logitstore.StoreNotFoundError):
        logitstore.open(url)
    again = copy_store(src, url)
    assert again.copied == 3 and _objects(url) == _files(src)
    back = tmp_path / "back.zarr"
    assert cli_main(["copy", url, str(back), "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().err
    assert _files(back) == _files(src)


def test_a_local_copy_killed_mid_file_resumes_and_verifies(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.zarr", tmp_path / "dst.zarr"
    _write(src)
    copy_store(src, dst)
    # What a copy killed while writing one file leaves: the marker, no zarr.json, and that
    # file's temporary `.partial` beside where it was going.
    identity = logitstore.open(src).metadata.identity
    (dst / CREATING_KEY).write_text(json.dumps({"copy_of": identity}))
    (dst / "zarr.json").unlink()
    (dst / "values/c/5/0").rename(dst / "values/c/5/0.abcd1234.partial")
    assert copy_store(src, dst).verified
    assert _files(dst) == _files(src)


def test_copy_refuses_a_destination_of_other_contents(bucket: str, tmp_path: Path) -> None:
    _write(tmp_path / "a.zarr")
    url = f"s3://{bucket}/other.zarr"
    ids, _, logits = _rows()
    with StoreWriter(url, encoding=ENC, vocab_size=V, input_ids=ids[:600], offsets=[0, 600]) as w:
        w.write(0, encode_rows(logits[:600], ENC, 0, torch.arange(600)))
    with pytest.raises(logitstore.StoreExistsError, match="other contents"):
        copy_store(tmp_path / "a.zarr", url)
    assert copy_store(tmp_path / "a.zarr", url, overwrite=True).verified


def test_copy_never_replaces_a_store_a_running_job_writes(
    bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "a.zarr")
    url = f"s3://{bucket}/busy.zarr"
    with object_lease(url):  # a job writing the store at url
        _write(url)
        before = _objects(url)
        rc = cli_main(["copy", str(tmp_path / "a.zarr"), url, "--overwrite", "--no-progress"])
        assert rc != 0 and "another job is writing" in capsys.readouterr().err
        assert _objects(url) == before
    assert cli_main(["copy", str(tmp_path / "a.zarr"), url, "--overwrite", "--no-progress"]) == 0


def test_bad_bucket_endpoint_and_missing_store_give_clear_errors(
    bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        logitstore.open("s3://no-such-bucket/x.zarr")
    with pytest.raises(logitstore.StoreNotFoundError, match="no logitstore store"):
        logitstore.open(f"s3://{bucket}/nothing.zarr")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        _write("s3://no-such-bucket/x.zarr")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="cannot reach the object store at") as e:
        logitstore.open(f"s3://{bucket}/x.zarr")
    assert dead in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)
    assert cli_main(["info", f"s3://{bucket}/x.zarr"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and "Traceback" not in err


def test_bad_credentials_give_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_s3_server(check_credentials=True)  # refuses unknown access keys
    try:
        for k, v in server.env(AWS_ACCESS_KEY_ID="AKIAWRONG").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(StorageError, match="access denied") as e:
            logitstore.open("s3://teacher-bucket/teacher.zarr")
        assert "AWS_ACCESS_KEY_ID" in str(e.value) and "teacher-bucket" in str(e.value)
    finally:
        server.stop()


class _Flaky(http.server.ThreadingHTTPServer):
    """A real HTTP proxy in front of the S3 server: answers ``503 SlowDown`` to the first
    ``transient`` requests, ``403 AccessDenied`` to every request for a key containing
    ``forbidden``, and forwards the rest."""

    def __init__(self, upstream: str, transient: int, forbidden: str) -> None:
        self.upstream, self.transient, self.forbidden = upstream, transient, forbidden
        self.refused = 0
        super().__init__(("127.0.0.1", 0), _FlakyHandler)


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _Flaky

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        if srv.forbidden and srv.forbidden in self.path:
            return self._error(403, "AccessDenied", "Access Denied")
        if srv.transient > 0:
            srv.transient -= 1
            srv.refused += 1
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        req = urllib.request.Request(
            srv.upstream + self.path, data=body or None, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(req) as r:
                status, out, rh = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, out, rh = e.code, e.read(), e.headers
        self.send_response(status)
        hop = ("content-length", "transfer-encoding", "connection", "server", "date")
        for k, v in rh.items():
            if k.lower() not in hop:
                self.send_header(k, v)
        length = rh.get("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def _error(self, status: int, code: str, message: str) -> None:
        out = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer


def test_transient_errors_are_retried_and_permanent_ones_name_the_key(
    bucket: str, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/flaky.zarr"
    _write(url)
    proxy = _Flaky(s3.endpoint, transient=4, forbidden="/ids/c/4/")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
        store = logitstore.open(url)  # its first requests meet four 503s, retried
        assert proxy.refused == 4
        assert np.array_equal(store.read(0, 512).ids, logitstore.open(url).read(0, 512).ids)
        with pytest.raises(StorageError, match="access denied") as e:
            store.read(2048, 2100)
        assert f"{url}/ids/c/4/0" in str(e.value)
    finally:
        proxy.shutdown()
        proxy.server_close()


def _write_cmd(teacher_dir: Path, data: Path, out: str | Path) -> list[str]:
    return [
        sys.executable, "-m", "logitstore", "write", "--teacher", str(teacher_dir),
        "--data", str(data), "--out", str(out), "--k", "8", "--seq-len", "32",
        "--batch-size", "2", "--shard-positions", "64", "--chunk-positions", "16",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_writer_resumes_byte_identical_on_s3(
    s3: S3Server, bucket: str, teacher_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "big.jsonl"
    texts = [CORPUS[i % len(CORPUS)] * (2 + i % 5) for i in range(24)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    env = deterministic_env(**s3.env(SOURCE_DATE_EPOCH="1700000000", LOGITSTORE_LEASE_SECONDS="8"))
    ref = tmp_path / "ref.zarr"
    subprocess.run(_write_cmd(teacher_dir, data, ref), env=env, check=True, capture_output=True)
    url = f"s3://{bucket}/killed.zarr"
    loc = ObjectLocation(url)
    proc = subprocess.Popen(_write_cmd(teacher_dir, data, url), env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(k.startswith("commits/c/") for k in loc.sizes()) >= 3:
            proc.kill()
            break
        time.sleep(0.05)
    assert proc.wait() == -9, "the writer finished before it could be killed; use more data"
    with pytest.raises(logitstore.IncompleteStoreError, match="rerun the same"):
        logitstore.open(url)
    # The killed job's lease is still there, so a second job is refused...
    with (
        pytest.raises(logitstore.StoreExistsError, match="another job is writing"),
        object_lease(url),
    ):
        pass
    time.sleep(8)  # ...until it runs out; then the same command resumes
    subprocess.run(_write_cmd(teacher_dir, data, url), env=env, check=True, capture_output=True)
    assert _objects(url) == _files(ref)
    assert logitstore.verify(url).ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_from_s3_replicas_give_identical_bytes(s3: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/served/teacher.zarr"
    _write(url)
    env = {**os.environ, **s3.env()}
    ports = [_free_port(), _free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "logitstore", "serve", url, "--port", str(p)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for p in ports
    ]
    try:
        bodies = []
        for p, proc in zip(ports, procs, strict=True):
            base = f"http://127.0.0.1:{p}/v1/stores/teacher.zarr"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{p}/v1/health", timeout=2).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.2)
            with urllib.request.urlopen(f"{base}/positions?start=100&stop=2900") as r:
                bodies.append(r.read())
            remote = logitstore.open(base)
            direct = logitstore.open(url)
            x, y = remote.read(0, N), direct.read(0, N)
            assert np.array_equal(x.ids, y.ids) and np.array_equal(x.probs, y.probs)
        assert bodies[0] == bodies[1] and len(bodies[0]) > 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


def test_dataset_reads_s3_in_dataloader_workers(bucket: str, tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    url = f"s3://{bucket}/train.zarr"
    _write(url)
    _write(tmp_path / "local.zarr")

    def samples(source: Any) -> list[dict[str, torch.Tensor]]:
        ds = logitstore.LogitDataset(source, seq_len=256, seed=3, block_positions=1024)
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=logitstore.collate)
        return list(loader)

    s3_batches = samples(url)  # the parent read the store before the workers forked
    local_batches = samples(tmp_path / "local.zarr")
    assert len(s3_batches) == len(local_batches) > 0
    for a, b in zip(s3_batches, local_batches, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_torchrun_ranks_write_one_s3_store(
    s3: S3Server, bucket: str, teacher_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "docs.jsonl"
    texts = [CORPUS[i % len(CORPUS)] * (1 + i % 4) for i in range(30)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    env = deterministic_env(**s3.env(SOURCE_DATE_EPOCH="1700000000"))
    ref = tmp_path / "one.zarr"
    subprocess.run(_write_cmd(teacher_dir, data, ref), env=env, check=True, capture_output=True)
    url = f"s3://{bucket}/ranks.zarr"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    job = subprocess.run(
        [*launch, "2", *_write_cmd(teacher_dir, data, url)[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert _objects(url) == _files(ref)  # no lease left, the bytes of one process
    assert logitstore.verify(url).ok


def test_generate_keeps_the_journal_of_an_s3_output_on_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from logitstore.write.journal import journal_path

    monkeypatch.setenv("LOGITSTORE_JOURNAL_DIR", str(tmp_path))
    a = journal_path("s3://bucket/runs/gen.zarr")
    assert a.parent == tmp_path and a.name.startswith("gen.zarr.") and a.suffix == ".jsonl"
    assert journal_path("s3://bucket/runs/gen.zarr/") == a  # the same store
    assert journal_path("s3://other/runs/gen.zarr") != a
    assert journal_path(tmp_path / "gen.zarr") == tmp_path / "gen.zarr.generating.jsonl"


def test_generate_writes_an_s3_store_like_a_local_one(
    bucket: str, teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGITSTORE_JOURNAL_DIR", str(tmp_path / "journals"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(", "for i in")))
    url = f"s3://{bucket}/gen.zarr"
    args = ["generate", "--teacher", str(teacher_dir), "--prompts", str(prompts),
            "--max-new-tokens", "6", "--soft", "topk", "--k", "4", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli_main([*args, "--out", url]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "gen.zarr")]) == 0
    assert _objects(url) == _files(tmp_path / "gen.zarr")
    assert not list((tmp_path / "journals").glob("*.jsonl"))  # removed once the store is done
