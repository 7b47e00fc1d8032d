"""HTTP benchmark: one `logitstore serve` process on loopback, read by one client and by 8 and
32 concurrent clients, beside raw bytes of the same size over the same loopback.

The store is top-64 u8 rows of the shipped teacher (held-out stdlib text), tiled to
``--positions``. Baseline: a plain TCP socket on 127.0.0.1 sends the same number of bytes a
stream of the whole store takes, to a client that receives them into a buffer, in the same run.

    python benchmarks/bench_http.py            # default: a couple of minutes on 2 cores
    python benchmarks/bench_http.py --quick
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib.report import md_table, one_thread_if_quick, results_dir, run_meta, write_results
from benchlib.stores import add_store_args, build_store

import logitstore
from logitstore.format.schema import StoredRows


def raw_loopback(nbytes: int) -> float:
    """Bytes/s of a plain TCP transfer of ``nbytes`` on 127.0.0.1 (the ceiling)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        chunk = b"\0" * (1 << 20)

        def send() -> None:
            conn, _ = srv.accept()
            with conn:
                left = nbytes
                while left > 0:
                    left -= conn.send(chunk[: min(left, len(chunk))])

        t = threading.Thread(target=send)
        t.start()
        buf = memoryview(bytearray(1 << 20))
        with socket.create_connection(("127.0.0.1", port)) as c:
            t0, got = time.perf_counter(), 0
            while got < nbytes:
                k = c.recv_into(buf)
                if not k:
                    break
                got += k
            elapsed = time.perf_counter() - t0
        t.join()
    return nbytes / elapsed


def serve(store: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "logitstore", "serve", str(store), "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def raw_keys(port: int, store: Path, repeats: int) -> dict[str, Any]:
    """The server as a file server: every shard file fetched whole from /zarr/KEY (what a zarr
    client does), compressed bytes/s; positions/s as the stored positions over the time."""
    import http.client

    keys = [
        str(p.relative_to(store))
        for p in store.rglob("*")
        if p.is_file() and "/c/" in str(p.relative_to(store))
    ]
    times, total = [], 0
    for _ in range(repeats):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        t0, total = time.perf_counter(), 0
        for key in keys:
            conn.request("GET", f"/v1/stores/store/zarr/{key}")
            total += len(conn.getresponse().read())
        times.append(time.perf_counter() - t0)
        conn.close()
    t = statistics.median(times)
    n = len(logitstore.open(store))
    return {
        "clients": 1,
        "what": "raw keys (compressed shard files)",
        "mb_per_s": total / t / 1e6,
        "positions_per_s": n / t,
    }


def clients(url: str, n_clients: int, n_positions: int, span: int, decode: bool) -> float:
    """Aggregate positions/s of ``n_clients`` threads, each reading ``span``-position ranges
    until ``n_positions`` positions have been read in total."""
    per_client = max(n_positions // n_clients, span)
    done = [0] * n_clients

    def run(i: int) -> None:
        store = logitstore.open(url)
        assert isinstance(store, logitstore.RemoteStore)
        rng = np.random.default_rng(i)
        while done[i] < per_client:
            a = int(rng.integers(0, len(store) - span))
            (store.read if decode else store.read_stored)(a, a + span)
            done[i] += span
        store.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_store_args(p)
    p.add_argument("--span", type=int, default=1 << 16, help="positions per concurrent request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results stem (.md/.json; default benchmarks/results/http, with --quick "
        "out/benchmarks-quick/results/http)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.sample_positions, args.repeats = 1 << 18, 1 << 13, 1
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "http"
    one_thread_if_quick(args.quick)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store_path = build_store(args, Path(tmp))
        local = logitstore.open(store_path)
        n = len(local)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = serve(store_path, port)
        try:
            url = f"http://127.0.0.1:{port}/v1/stores/store"
            remote = logitstore.open(url)
            assert isinstance(remote, logitstore.RemoteStore)
            remote.read_stored(0, 4096)  # warm-up
            stream_bytes = 0
            for decode in (False, True):
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    got = remote.read(0, n) if decode else remote.read_stored(0, n)
                    times.append(time.perf_counter() - t0)
                if not decode:
                    assert isinstance(got, StoredRows)
                    stream_bytes = sum(a.nbytes for a in got if a is not None)
                t = statistics.median(times)
                rows.append(
                    {
                        "clients": 1,
                        "what": "read (decoded)" if decode else "read_stored",
                        "positions_per_s": n / t,
                        "mb_per_s": stream_bytes / t / 1e6,
                    }
                )
            remote.close()
            raw = statistics.median(raw_loopback(stream_bytes) for _ in range(args.repeats))
            rows.append(
                {
                    "clients": 1,
                    "what": "raw TCP, same bytes",
                    "mb_per_s": raw / 1e6,
                    "positions_per_s": raw / (stream_bytes / n),
                }
            )
            rows.append(raw_keys(port, store_path, args.repeats))
            for k in (8, 32):
                rate = clients(url, k, n, min(args.span, n // 2), decode=False)
                rows.append(
                    {
                        "clients": k,
                        "what": "read_stored, aggregate",
                        "positions_per_s": rate,
                        "mb_per_s": rate * stream_bytes / n / 1e6,
                    }
                )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    for r in rows:
        print(
            f"[http] {r['clients']:>2} client(s) {r['what']}: {r['positions_per_s']:,.0f} pos/s, "
            f"{r['mb_per_s']:,.0f} MB/s",
            file=sys.stderr,
        )
    write(args.out, rows, argv, raw)
    return 0


def write(out: Path, rows: list[dict[str, Any]], argv: list[str], raw: float) -> None:
    body = [
        "Server and clients share the machine's 2 cores.",
        "",
        *md_table(
            ["clients", "what", "positions/s", "MB/s", "vs raw TCP"],
            [
                [
                    str(r["clients"]),
                    r["what"],
                    f"{r['positions_per_s']:,.0f}",
                    f"{r['mb_per_s']:,.0f}",
                    f"{r['mb_per_s'] * 1e6 / raw:.2f}",
                ]
                for r in rows
            ],
        ),
    ]
    write_results(out, "HTTP", run_meta("bench_http.py", argv), {"rows": rows}, body)


if __name__ == "__main__":
    sys.exit(main())
