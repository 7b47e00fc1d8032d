"""The HTTP service over a real socket: a real `logitstore serve` process, real clients."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitstore
from logitstore import Encoding
from logitstore.errors import CorruptStoreError, PositionError, RemoteError, StoreNotFoundError

VOCAB = 300
TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`logitstore serve` in a subprocess, on a free port."""

    def __init__(self, stores: list[Path], *extra: str, port: int | None = None) -> None:
        self.stores, self.extra = stores, extra
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        cmd = [
            sys.executable,
            "-m",
            "logitstore",
            "serve",
            *map(str, self.stores),
            "--port",
            str(self.port),
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, _, _ = self.get("/v1/health")
                if status == 200:
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/v1/stores/{name}"

    def get(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        token: str | None = TOKEN,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=h)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _table_teacher() -> logitstore.Teacher:
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    return logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    seqs = logitstore.sequences_from_token_ids(
        [rng.integers(0, VOCAB, rng.integers(2, 400)) for _ in range(150)], 128
    )
    mask = rng.integers(0, 2, len(seqs.input_ids)).astype(np.uint8)
    out = {}
    for name, enc in (
        ("topk", Encoding("topk", "u8", k=16)),
        ("full", Encoding("full", "fp16")),
        ("sampled", Encoding("sampled", "count", samples=32)),
        ("masked", Encoding("topk", "u8", k=16)),  # format 1.1: with a loss mask
        ("tokens", Encoding("none", "none")),  # format 1.1: tokens only, with a loss mask
    ):
        out[name] = logitstore.capture(
            _table_teacher(),
            seqs,
            root / name,
            enc,
            progress=False,
            chunk_positions=256,
            shard_positions=4096,
            loss_mask=mask if name in ("masked", "tokens") else None,
        )
    return out


@pytest.fixture(scope="module")
def server(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tokens = tmp_path_factory.mktemp("tok") / "tokens"
    tokens.write_text(f"other-token\n{TOKEN}\n")
    srv = Server(
        list(stores.values()),
        "--token-file",
        str(tokens),
        "--max-positions",
        "20000",
        "--block-positions",
        "1000",
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGITSTORE_TOKEN", TOKEN)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _same(a: logitstore.Batch, b: logitstore.Batch) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_remote_reads_are_bit_identical_to_local(server: Server, stores) -> None:
    before = {name: _files(p) for name, p in stores.items()}
    rng = np.random.default_rng(1)
    for name, path in stores.items():
        remote, local = logitstore.open(server.url(name)), logitstore.open(path)
        assert len(remote) == len(local) and np.array_equal(remote.offsets, local.offsets)
        assert remote.metadata == local.metadata
        for _ in range(12):
            a, b = sorted(int(x) for x in rng.integers(0, len(local) + 1, 2))
            assert _same(remote.read(a, b), local.read(a, b)), (name, a, b)
        assert _same(remote.sequence(7), local.sequence(7))
    assert {name: _files(p) for name, p in stores.items()} == before  # read-only


@pytest.mark.parametrize("name", ["topk", "masked", "tokens"])
def test_dataset_over_http_yields_the_local_samples(server: Server, stores, name: str) -> None:
    remote = logitstore.LogitDataset(server.url(name), 64, seed=3, block_positions=4096)
    local = logitstore.LogitDataset(stores[name], 64, seed=3, block_positions=4096)
    masked = 0
    for got, want in zip(remote, local, strict=True):
        assert all(torch.equal(got[k], want[k]) for k in got)
        masked += int((~got["loss_mask"] & (got["attention_mask"] > 0)).sum())
    assert (masked > 0) == (name != "topk")


def test_endpoints(server: Server, stores) -> None:
    status, _, body = server.get("/v1/health", token=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    listed = json.loads(server.get("/v1/stores")[2])["stores"]
    assert {s["name"] for s in listed} == set(stores)
    info = json.loads(server.get("/v1/stores/topk")[2])
    local = logitstore.store_info(logitstore.open(stores["topk"]))
    local.pop("path")
    assert info.pop("server") == {"max_positions": 20000}
    assert info == local
    status, _, body = server.get("/v1/stores/topk/offsets")
    assert np.array_equal(np.frombuffer(body, "<i8"), logitstore.open(stores["topk"]).offsets)
    status, _, body = server.get("/v1/stores/topk/tokenizer")
    assert status == 404 and json.loads(body)["error"]["code"] == "no_tokenizer"
    status, _, body = server.get("/v1/stores/topk/sequences/2")
    assert status == 200 and body.startswith(b"LGSTRM01")
    metrics = server.get("/metrics")[2].decode()
    assert 'logitstore_requests_total{route="/v1/stores/{name}",status="200"}' in metrics
    assert "logitstore_request_seconds_bucket" in metrics


def test_a_raw_key_larger_than_a_piece_streams_whole_and_in_ranges(tmp_path: Path, stores) -> None:
    # Raw keys are streamed 1 MiB at a time (server/raw.py): bodies that span several pieces,
    # and ranges that start and end inside them, come back exact.
    import shutil

    path = tmp_path / "topk"
    shutil.copytree(stores["topk"], path)
    blob = np.random.default_rng(0).integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes()
    (path / "values" / "c" / "9").mkdir(parents=True)
    (path / "values" / "c" / "9" / "0").write_bytes(blob)
    srv = Server([path]).start()
    try:
        key = "/v1/stores/topk/zarr/values/c/9/0"
        status, headers, body = srv.get(key)
        assert status == 200 and body == blob and int(headers["content-length"]) == len(blob)
        for spec, want in (
            ("bytes=1048570-2097160", blob[1048570:2097161]),
            ("bytes=-1048580", blob[-1048580:]),
        ):
            status, headers, body = srv.get(key, {"Range": spec})
            assert status == 206 and body == want, spec
            assert int(headers["content-length"]) == len(want)
    finally:
        srv.stop()


def test_raw_keys_support_range_etag_and_zarr(server: Server, stores) -> None:
    key = "/v1/stores/topk/zarr/values/c/0/0"
    raw = (stores["topk"] / "values" / "c" / "0" / "0").read_bytes()
    status, headers, body = server.get(key)
    assert status == 200 and body == raw and headers["accept-ranges"] == "bytes"
    etag = headers["etag"]
    assert "last-modified" in headers
    assert server.get(key, {"If-None-Match": etag})[0] == 304
    for spec, want in (
        ("bytes=10-19", raw[10:20]),
        ("bytes=5-", raw[5:]),
        ("bytes=-7", raw[-7:]),
        ("bytes=0-999999999", raw),
    ):
        status, headers, body = server.get(key, {"Range": spec})
        assert status == 206 and body == want, spec
        assert headers["content-range"].endswith(f"/{len(raw)}")
    status, headers, body = server.get(key, method="HEAD")
    assert status == 200 and int(headers["content-length"]) == len(raw) and body == b""
    import zarr  # any zarr client opens the store over HTTP, with the token

    group = zarr.open_group(
        server.url("topk") + "/zarr",
        mode="r",
        storage_options={"headers": {"Authorization": f"Bearer {TOKEN}"}},
    )
    local = zarr.open_group(str(stores["topk"]), mode="r")
    assert np.array_equal(group["ids"][100:900], local["ids"][100:900])


def test_auth(server: Server) -> None:
    assert server.get("/v1/stores", token=None)[0] == 401
    status, _, body = server.get("/v1/stores", token="wrong")
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
    assert server.get("/v1/stores", token="other-token")[0] == 200
    with pytest.raises(logitstore.LogitStoreError, match="403"):
        logitstore.RemoteStore(server.url("topk"), token="wrong")


HOSTILE = [
    ("/v1/stores/nope", 404, "unknown_store"),
    ("/v1/stores/topk/positions?start=-1&stop=5", 400, "bad_range"),
    ("/v1/stores/topk/positions?start=9&stop=5", 400, "bad_range"),
    ("/v1/stores/topk/positions?start=0&stop=999999999", 416, "range_not_satisfiable"),
    ("/v1/stores/topk/positions?start=0&stop=25000", 413, "range_too_large"),
    ("/v1/stores/topk/positions?start=abc&stop=5", 400, "bad_request"),
    ("/v1/stores/topk/positions?start=1e3&stop=5", 400, "bad_request"),
    ("/v1/stores/topk/positions?stop=5", 400, "bad_request"),
    (f"/v1/stores/topk/positions?start=0&stop={10**40}", 416, "range_not_satisfiable"),
    ("/v1/stores/topk/sequences/100000", 416, "range_not_satisfiable"),
    ("/v1/stores/topk/sequences/-3", 416, "range_not_satisfiable"),
    ("/v1/stores/topk/zarr/../../../etc/passwd", 400, "bad_key"),
    ("/v1/stores/topk/zarr/%2e%2e/%2e%2e/etc/passwd", 400, "bad_key"),
    ("/v1/stores/topk/zarr/values/..%2f..%2fzarr.json", 400, "bad_key"),
    ("/v1/stores/topk/zarr//etc/passwd", 400, "bad_key"),
    ("/v1/stores/topk/zarr/nope", 404, "no_such_key"),
    ("/v1/nothing-here", 404, "not_found"),
    ("/v1/stores/topk/zarr/" + "a" * 300, 404, "no_such_key"),  # too long for the file system
    ("/v1/stores/topk/zarr/" + "a" * 600, 400, "bad_key"),
]


@pytest.mark.parametrize(("path", "status", "code"), HOSTILE)
def test_hostile_requests_get_a_clear_4xx(server: Server, path: str, status: int, code) -> None:
    got, headers, body = server.get(path)
    assert got == status, body
    if code is not None:
        err = json.loads(body)["error"]
        assert err["code"] == code and err["message"]
    else:
        assert headers["content-type"].startswith("application/json")


def test_hostile_headers_and_methods(server: Server) -> None:
    key = "/v1/stores/topk/zarr/values/c/0/0"
    assert server.get(key, {"Range": "bytes=zz"})[0] == 400
    assert server.get(key, {"Range": "bytes=99999999-"})[0] == 416
    assert server.get(key, {"Range": "bytes=0-1,5-6"})[0] == 200  # multi-range: whole file
    status, _, body = server.get("/v1/stores", method="POST")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_every_route_from_the_openapi_schema(server: Server, data: st.DataObject) -> None:
    schema = json.loads(server.get("/openapi.json")[2])
    path = data.draw(st.sampled_from(sorted(schema["paths"])))
    op = schema["paths"][path].get("get") or next(iter(schema["paths"][path].values()))
    values = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.text(max_size=30),
        st.sampled_from(["topk", "full", "0", "-1", "..", "%00", "1e9"]),
    )
    query = []
    for param in op.get("parameters", []):
        raw = data.draw(values)
        value = quote(raw.encode("utf-8", "surrogatepass"), safe="-._~")
        if param["in"] == "path":
            path = path.replace("{" + param["name"] + "}", value or "x")
        elif data.draw(st.booleans()):
            query.append(f"{param['name']}={value}")
    url = path + ("?" + "&".join(query) if query else "")
    status, _, body = server.get(url)
    assert status < 500, (url, body[:200])
    if status >= 400:
        assert "error" in json.loads(body), url


def test_concurrent_clients(server: Server, stores) -> None:
    local = logitstore.open(stores["topk"])
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            remote = logitstore.open(server.url("topk"))
            for _ in range(4):
                a = int(rng.integers(0, len(local) - 2000))
                assert _same(remote.read(a, a + 2000), local.read(a, a + 2000))
        except BaseException as e:
            errors.append(e)

    # daemon threads: a hung client fails the test instead of keeping pytest from exiting
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    assert not hung, f"{hung} of {len(threads)} clients still running after 120 s"
    assert not errors, errors[:3]


def test_a_keep_alive_connection_the_server_closed_is_replaced_without_a_retry(stores) -> None:
    """A trainer whose step outlasts the server's keep-alive timeout (or a server restarted
    between reads) finds its idle connection closed: the next read opens a new one at once,
    with no backoff and no retry counted; a server that is really gone is still an error."""
    srv = Server([stores["topk"]]).start()
    try:
        remote = logitstore.RemoteStore(srv.url("topk"), retries=0)
        local = logitstore.open(stores["topk"])
        assert _same(remote.read(0, 100), local.read(0, 100))  # the connection is kept
        srv.stop()  # the idle connection dies with the server...
        srv.start()  # ...and the same port answers again
        t0 = time.monotonic()
        assert _same(remote.read(100, 300), local.read(100, 300))  # retries=0: no retry allowed
        assert remote.retried == 0 and time.monotonic() - t0 < 5
        srv.stop()
        with pytest.raises(RemoteError):
            remote.read(0, 10)
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_client_resumes_when_the_server_restarts_mid_stream(stores) -> None:
    srv = Server([stores["topk"]], "--block-positions", "16").start()
    try:
        # The row stream of 16-position blocks is slow enough to be cut mid-way; the
        # compressed stream's resume is tested with a cutting proxy (test_chunk_stream.py).
        remote = logitstore.RemoteStore(srv.url("topk"), retries=8, backoff=0.2, compressed=False)
        local = logitstore.open(stores["topk"])
        n = len(local)
        result: dict[str, object] = {}

        def read() -> None:
            try:
                result["batch"] = remote.read(0, n)
            except BaseException as e:
                result["error"] = e

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(0.5)  # tens of thousands of 16-position blocks: the stream is still going
        srv.stop()
        time.sleep(0.5)
        srv.start()
        t.join(timeout=120)
        assert not t.is_alive(), "the read still runs after 120 s"
        assert "error" not in result, result.get("error")
        assert remote.retried >= 1  # the stream really was cut, and resumed
        assert _same(result["batch"], local.read(0, n))  # type: ignore[arg-type]
    finally:
        srv.stop()


def test_serve_refuses_bad_stores(tmp_path: Path, stores, capsys) -> None:
    from logitstore.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no logitstore store" in capsys.readouterr().err
    assert main(["serve", str(stores["topk"]), "--token-file", str(tmp_path / "none")]) == 2
    assert "--token-file" in capsys.readouterr().err


def _streamed_bytes(srv: Server) -> int:
    text = srv.get("/metrics", token=None)[2].decode()
    for line in text.splitlines():
        if line.startswith('logitstore_response_bytes_total{route="/v1/stores/{name}/positions"}'):
            return int(line.split()[-1])
    return 0


@pytest.mark.slow
def test_a_stream_stops_when_its_client_goes_away(stores) -> None:
    srv = Server([stores["topk"]], "--block-positions", "16").start()
    try:
        n = len(logitstore.open(stores["topk"]))
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(
                f"GET /v1/stores/topk/positions?start=0&stop={n} HTTP/1.1\r\n"
                "Host: localhost\r\n\r\n".encode()
            )
            got = 0
            while got < 50_000:
                got += len(s.recv(65536))
        time.sleep(1.0)
        first = _streamed_bytes(srv)
        time.sleep(1.0)
        assert _streamed_bytes(srv) == first  # nothing more is read or sent
        row = 2 + 16 * 2 + 16 + 4  # input id, 16 gaps, 16 u8 values, residual
        assert first < n * row / 2  # it stopped long before the end
    finally:
        srv.stop()


def test_unauthenticated_paths_do_not_mint_metric_series(server: Server) -> None:
    for path in ("/made-up-1", '/quote"d', "/v1/stores"):
        assert server.get(path, token=None)[0] == 401
    metrics = server.get("/metrics")[2].decode()
    assert 'route="unauthenticated",status="401"' in metrics
    assert "made-up" not in metrics and 'quote"d' not in metrics


# -- what a client raises for each error code, over the socket (PROTOCOL.md §4) --------------

#: a backoff no test waits for: an answer that was retried would take minutes
NEVER = 30.0


def test_a_refusal_raises_the_exception_its_code_names_at_once(server: Server) -> None:
    t0 = time.monotonic()
    with pytest.raises(StoreNotFoundError, match="404: no store named 'nope'"):
        logitstore.RemoteStore(server.url("nope"), backoff=NEVER)  # unknown_store
    with pytest.raises(RemoteError, match="HTTP 403"):
        logitstore.RemoteStore(server.url("topk"), token="wrong", backoff=NEVER)  # forbidden
    with pytest.raises(RemoteError, match="HTTP 401"):
        logitstore.RemoteStore(server.url("topk"), token="", backoff=NEVER)  # unauthorized
    remote = logitstore.RemoteStore(server.url("topk"), backoff=NEVER)
    assert remote.tokenizer() is None  # no_tokenizer: the store has none, final
    assert remote.retried == 0
    assert time.monotonic() - t0 < 20


@pytest.mark.slow
def test_a_413_is_a_position_error_and_not_retried(stores) -> None:
    srv = Server([stores["topk"]], "--max-positions", "20000").start()
    try:
        remote = logitstore.RemoteStore(srv.url("topk"), backoff=0.05)
        assert _same(remote.read(0, 5000), logitstore.open(stores["topk"]).read(0, 5000))
        # The server comes back with a smaller cap than the client was told: it asks for
        # more positions than the server now takes.
        srv.stop()
        srv.extra = ("--max-positions", "100")
        srv.start()
        with pytest.raises(PositionError, match="HTTP 413: 5000 positions asked for"):
            remote.read(0, 5000)
        assert remote.retried <= 1  # the connection the restart cut; never the 413
    finally:
        srv.stop()


def _store_with_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    teacher = _table_teacher()
    teacher.tokenizer = SimpleNamespace(get_vocab=tok.get_vocab, backend_tokenizer=tok)
    seqs = logitstore.sequences_from_token_ids([np.arange(200) % VOCAB], 64)
    return logitstore.capture(teacher, seqs, out, Encoding("topk", "u8", k=4), progress=False)


def test_a_damaged_store_is_a_store_error_and_not_retried(tmp_path: Path) -> None:
    path = _store_with_tokenizer(tmp_path / "tok")
    srv = Server([path]).start()
    try:
        remote = logitstore.RemoteStore(srv.url("tok"), backoff=NEVER)
        assert remote.tokenizer() is not None
        chunks = [p for p in (path / "tokenizer").rglob("*") if p.name != "zarr.json"]
        for chunk in (p for p in chunks if p.is_file()):  # damage on the server's disk
            chunk.write_bytes(b"\xff" * chunk.stat().st_size)
        status, _, body = srv.get("/v1/stores/tok/tokenizer")
        assert status == 500 and json.loads(body)["error"]["code"] == "store_error"
        t0 = time.monotonic()
        with pytest.raises(CorruptStoreError, match="HTTP 500: array 'tokenizer' is damaged"):
            remote.tokenizer()
        assert remote.retried == 0 and time.monotonic() - t0 < 10
    finally:
        srv.stop()


def test_serve_refuses_limits_that_are_not_positive(stores, capsys) -> None:
    from logitstore.cli import main

    assert main(["serve", str(stores["topk"]), "--block-positions", "0"]) == 2
    assert "--block-positions must be a positive number" in capsys.readouterr().err


def test_the_server_process_never_loads_torch(server: Server) -> None:
    # Last in the file: by now the module's server has answered on every route.
    assert server.proc is not None
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc")
    assert "/torch/" not in maps.read_text()
