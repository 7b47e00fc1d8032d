"""HTTP benchmark: one `logitstore serve` process on loopback, read by one client and by 8 and
32 concurrent clients, beside raw bytes of the same size over the same loopback, for both
streams: the row stream (PROTOCOL.md §2) and the compressed stream (§2.1).

The store is top-64 u8 rows of the shipped teacher (held-out stdlib text), tiled to
``--positions``. Baselines, in the same run: a plain TCP socket on 127.0.0.1 sending as many
bytes as the larger stream of the whole store takes, to a client that receives them into a
buffer; and the row stream beside the compressed one. The server's CPU time is read from
/proc around each measurement.

    python benchmarks/bench_http.py            # default: a couple of minutes on 2 cores
    python benchmarks/bench_http.py --quick
"""

from __future__ import annotations

import argparse
import os
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
from logitstore.format.chunks import CHUNKS_MEDIA_TYPE


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


STREAMS = {"rows": False, "chunks": True}  # RemoteStore(compressed=...)


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the server process has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wire_rate(port: int, n: int, accept: str) -> tuple[float, int]:
    """Bytes/s and bytes of one stream of the whole store, read into a buffer unparsed."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", f"/v1/stores/store/positions?start=0&stop={n}", headers={"Accept": accept})
    resp = conn.getresponse()
    buf = memoryview(bytearray(1 << 20))
    t0, total = time.perf_counter(), 0
    while k := resp.readinto(buf):
        total += k
    elapsed = time.perf_counter() - t0
    conn.close()
    return total / elapsed, total


def clients(url: str, n_clients: int, n_positions: int, span: int, compressed: bool) -> float:
    """Aggregate decoded positions/s of ``n_clients`` threads, each reading ``span``-position
    ranges with ``read`` until ``n_positions`` positions have been read in total."""
    per_client = max(n_positions // n_clients, span)
    done = [0] * n_clients

    def run(i: int) -> None:
        store = logitstore.RemoteStore(url, compressed=compressed)
        rng = np.random.default_rng(i)
        while done[i] < per_client:
            a = int(rng.integers(0, len(store) - span))
            store.read(a, a + span)
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
    p.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument("--store", type=Path, help="serve this store instead of building one")
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
        args.clients = [1, 8]
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "http"
    one_thread_if_quick(args.quick)
    one: list[dict[str, Any]] = []
    many: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store_path = args.store or build_store(args, Path(tmp))
        local = logitstore.open(store_path)
        n = len(local)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = serve(store_path, port)
        try:
            url = f"http://127.0.0.1:{port}/v1/stores/store"
            for name, compressed in STREAMS.items():
                accept = CHUNKS_MEDIA_TYPE if compressed else "*/*"
                wire_rate(port, min(n, 4096), accept)  # warm-up
                rates, nbytes = [], 0
                for _ in range(args.repeats):
                    rate, nbytes = wire_rate(port, n, accept)
                    rates.append(rate)
                remote = logitstore.RemoteStore(url, compressed=compressed)
                remote.read(0, 4096)
                times, cpu, mine = [], [], []
                for _ in range(args.repeats):
                    c0, t0, p0 = server_cpu(proc.pid), time.perf_counter(), time.process_time()
                    for a in range(0, n, args.span):  # in blocks, as LogitDataset reads
                        remote.read(a, min(a + args.span, n))
                    times.append(time.perf_counter() - t0)
                    cpu.append(server_cpu(proc.pid) - c0)
                    mine.append(time.process_time() - p0)
                remote.close()
                one.append(
                    {
                        "stream": name,
                        "wire_bytes_per_position": nbytes / n,
                        "mb_per_s": statistics.median(rates) / 1e6,
                        "decoded_positions_per_s": n / statistics.median(times),
                        "server_cpu_s_per_m": statistics.median(cpu) / n * 1e6,
                        "client_cpu_s_per_m": statistics.median(mine) / n * 1e6,
                        # what one client process could decode with a core to itself
                        "decoded_positions_per_client_cpu_s": n / statistics.median(mine),
                    }
                )
            wire = max(r["wire_bytes_per_position"] for r in one) * n
            raw = statistics.median(raw_loopback(int(wire)) for _ in range(args.repeats))
            for r in one:
                r["vs_raw"] = r["mb_per_s"] * 1e6 / raw
            keys = raw_keys(port, store_path, args.repeats)
            for k in args.clients:
                for name, compressed in STREAMS.items():
                    c0 = server_cpu(proc.pid)
                    rate = clients(url, k, n, min(args.span, n // 2), compressed)
                    used = server_cpu(proc.pid) - c0
                    many.append(
                        {
                            "clients": k,
                            "stream": name,
                            "decoded_positions_per_s": rate,
                            # clients() reads k × max(n // k, span) positions in all
                            "server_cpu_s_per_m": used
                            / (k * max(n // k, min(args.span, n // 2)))
                            * 1e6,
                        }
                    )
                rows_rate = many[-2]["decoded_positions_per_s"]
                many[-1]["vs_rows"] = many[-1]["decoded_positions_per_s"] / rows_rate
                many[-2]["vs_rows"] = 1.0
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    for r in one:
        print(
            f"[http] {r['stream']}: {r['mb_per_s']:,.0f} MB/s on the wire ({r['vs_raw']:.2f}x raw),"
            f" {r['decoded_positions_per_s']:,.0f} decoded pos/s, server "
            f"{r['server_cpu_s_per_m']:.2f} CPU s per 1M positions",
            file=sys.stderr,
        )
    for r in many:
        print(
            f"[http] {r['clients']:>2} client(s) {r['stream']}: "
            f"{r['decoded_positions_per_s']:,.0f} decoded pos/s ({r['vs_rows']:.2f}x rows)",
            file=sys.stderr,
        )
    write(args.out, one, many, keys, argv, raw)
    return 0


def write(
    out: Path,
    one: list[dict[str, Any]],
    many: list[dict[str, Any]],
    keys: dict[str, Any],
    argv: list[str],
    raw: float,
) -> None:
    body = [
        "Server and clients share the machine's 2 cores (and, on a busy machine, other "
        "work: compare within a run). `rows` is the row stream (PROTOCOL.md §2, what clients "
        "before 0.3 read: the server decompresses and ships rows as stored); `chunks` is the "
        "compressed stream (§2.1: the shards' own chunks, decoded by the client).",
        "",
        "## One stream",
        "",
        "Wall-clock rates on a loaded machine measure the share of the cores each process "
        "got; the CPU columns (from /proc and `time.process_time`) are what the work costs. "
        "MB/s on the wire: one request for the whole store, its body read unparsed. Decoded: "
        "`RemoteStore.read` of the whole store in blocks of `--span` positions (as "
        "LogitDataset reads).",
        "",
        *md_table(
            [
                "stream",
                "wire bytes/position",
                "MB/s on the wire",
                "vs raw TCP",
                "decoded positions/s",
                "server CPU s per 1M positions",
                "client CPU s per 1M positions",
                "decoded positions per client CPU s",
            ],
            [
                [
                    r["stream"],
                    f"{r['wire_bytes_per_position']:.1f}",
                    f"{r['mb_per_s']:,.0f}",
                    f"{r['vs_raw']:.2f}",
                    f"{r['decoded_positions_per_s']:,.0f}",
                    f"{r['server_cpu_s_per_m']:.3f}",
                    f"{r['client_cpu_s_per_m']:.3f}",
                    f"{r['decoded_positions_per_client_cpu_s']:,.0f}",
                ]
                for r in one
            ],
        ),
        "",
        f"Raw TCP on 127.0.0.1, same run: {raw / 1e6:,.0f} MB/s. Raw keys (every shard file "
        f"fetched whole from /zarr/KEY): {keys['mb_per_s']:,.0f} MB/s.",
        "",
        "## Many clients (threads of one process, each reading random ranges, decoded)",
        "",
        *md_table(
            ["clients", "stream", "decoded positions/s", "vs rows", "server CPU s per 1M"],
            [
                [
                    str(r["clients"]),
                    r["stream"],
                    f"{r['decoded_positions_per_s']:,.0f}",
                    f"{r['vs_rows']:.2f}",
                    f"{r['server_cpu_s_per_m']:.3f}",
                ]
                for r in many
            ],
        ),
    ]
    data = {"one_stream": one, "clients": many, "raw_keys": keys, "raw_tcp_bytes_per_s": raw}
    write_results(out, "HTTP", run_meta("bench_http.py", argv), data, body)


if __name__ == "__main__":
    sys.exit(main())
