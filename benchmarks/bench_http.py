"""HTTP benchmark: `logitstore serve --workers 1` and `--workers 2` on loopback, read by one
client and by 8, 32 and 64 concurrent clients, for both streams: the row stream (PROTOCOL.md
§2, today's path for old clients) and the compressed stream (§2.1); and 64 streams whose
clients stop reading, for the server's memory.

The store is top-64 u8 rows of a real teacher (held-out stdlib text), tiled to
``--positions``. Baselines, in the same run: a plain TCP socket on 127.0.0.1 sending as many
bytes into a buffer right before each one-stream measurement (the ceiling for one stream,
taken beside it because this VM's speed drifts); the row stream beside the compressed one;
and, for many clients, the row stream served by a second server that reads the store through
zarr's own reader (``LOGITSTORE_LOCAL_READER=zarr``): the row stream as it was when issue 15
set the compressed stream's target (≥ 3× it), before local stores were read straight from
their shards. Every rate is given twice: per second
of wall clock (a share of a loaded machine) and per CPU-second of the processes measured
(server: the supervisor and its workers, from /proc; clients: ``time.process_time`` in each
client process), which is what the work costs.

    python benchmarks/bench_http.py            # ~10 minutes on 2 cores
    python benchmarks/bench_http.py --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
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
from benchlib.report import (
    md_table,
    one_thread_if_quick,
    pyplot,
    results_dir,
    run_meta,
    write_results,
)
from benchlib.stores import add_store_args, build_store

import logitstore
from logitstore.format.chunks import CHUNKS_MEDIA_TYPE
from logitstore.read.buffers import BufferPool
from logitstore.read.local import LOCAL_READER_ENV

STREAMS = {"rows": False, "chunks": True}  # RemoteStore(compressed=...)
#: the many-clients streams: (the server's local reader, RemoteStore(compressed=...))
MANY = {"rows": ("shards", False), "chunks": ("shards", True), "rows via zarr": ("zarr", False)}
_ROUTE = 'logitstore_response_bytes_total{route="/v1/stores/{name}/positions"}'


# -- processes and their CPU ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by the server: ``pid`` and its worker
    processes (Linux)."""
    return _cpu(pid) + sum(_cpu(c) for c in _children(pid))


def server_rss(pid: int) -> int:
    """Resident bytes of the server process ``pid`` and its children."""
    total = 0
    for p in (pid, *_children(pid)):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _stop_with_parent() -> None:
    """In the server's process before it starts: SIGTERM when this benchmark dies (Linux), so
    a benchmark killed by a timeout leaves no server (and no workers) behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """`logitstore serve --workers N` in a subprocess on a free port."""

    def __init__(self, store: Path, workers: int, reader: str = "shards") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        cmd = [sys.executable, "-m", "logitstore", "serve", str(store), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            preexec_fn=_stop_with_parent,
            env={**os.environ, LOCAL_READER_ENV: reader},
        )
        self.url = f"http://127.0.0.1:{self.port}/v1/stores/store"
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        time.sleep(1.0)  # every worker up (the first answer came from one)

    def cpu(self) -> float:
        return server_cpu(self.proc.pid)

    def streamed(self) -> float:
        """Bytes the server has handed to its sockets for position streams (/metrics)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        for line in text.splitlines():
            if line.startswith(_ROUTE + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the baseline -------------------------------------------------------------------------------


def raw_loopback(nbytes: int) -> tuple[float, float]:
    """Bytes/s of a plain TCP transfer of ``nbytes`` on 127.0.0.1 (the ceiling), and bytes per
    CPU-second of the sending and receiving threads together."""
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
            t0, c0, got = time.perf_counter(), time.process_time(), 0
            while got < nbytes:
                k = c.recv_into(buf)
                if not k:
                    break
                got += k
            t.join()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return nbytes / elapsed, nbytes / max(cpu, 1e-9)


# -- one stream ---------------------------------------------------------------------------------


def wire_rate(server: Server, n: int, accept: str, at_least: int) -> tuple[float, float, int]:
    """One stream of the whole store read into a buffer unparsed, requested again on the same
    connection until ``at_least`` bytes have come (so a small store measures the steady
    rate, not the first block's latency): bytes/s, bytes per CPU-second (server + this
    client), bytes of one response."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    s0, c0 = server.cpu(), time.process_time()
    t0 = time.perf_counter()
    buf = memoryview(bytearray(1 << 20))
    total = one = 0
    while total == 0 or total < at_least:
        conn.request(
            "GET", f"/v1/stores/store/positions?start=0&stop={n}", headers={"Accept": accept}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {resp.read()[:200]!r}")
        one = 0
        while k := resp.readinto(buf):
            one += k
        total += one
    elapsed = time.perf_counter() - t0
    cpu = server.cpu() - s0 + time.process_time() - c0
    conn.close()
    return total / elapsed, total / max(cpu, 1e-9), one


def one_stream(
    server: Server,
    n: int,
    span: int,
    repeats: int,
    wire_bytes: int,
    raws: list[tuple[float, float]],
) -> list[dict[str, Any]]:
    """Each stream on one connection, ``repeats`` times, each time right after raw TCP moves
    as many bytes (appended to ``raws``): this VM's speed drifts over minutes, so each
    stream is compared with the raw transfer beside it (``vs_raw``: the median of the
    pairs), then decoded through RemoteStore."""
    out = []
    for name, compressed in STREAMS.items():
        accept = CHUNKS_MEDIA_TYPE if compressed else "*/*"
        wire_rate(server, min(n, 4096), accept, 0)  # warm-up
        runs, pairs = [], []
        for _ in range(repeats):
            raw = raw_loopback(max(wire_bytes, 1 << 26))
            runs.append(wire_rate(server, n, accept, wire_bytes))
            raws.append(raw)
            pairs.append((runs[-1][0] / raw[0], runs[-1][1] / raw[1]))
        remote = logitstore.RemoteStore(server.url, compressed=compressed)
        alloc = BufferPool(keep=4).alloc
        remote.read(0, span, id_dtype=np.int32, alloc=alloc)
        times, cpu, mine = [], [], []
        for _ in range(repeats):
            c0, t0, p0 = server.cpu(), time.perf_counter(), time.process_time()
            for a in range(0, n, span):  # in blocks of int32 ids, as LogitDataset reads
                remote.read(a, min(a + span, n), id_dtype=np.int32, alloc=alloc)
            times.append(time.perf_counter() - t0)
            cpu.append(server.cpu() - c0)
            mine.append(time.process_time() - p0)
        remote.close()
        out.append(
            {
                "stream": name,
                "wire_bytes_per_position": runs[0][2] / n,
                "mb_per_s": statistics.median(r[0] for r in runs) / 1e6,
                "mb_per_cpu_s": statistics.median(r[1] for r in runs) / 1e6,
                "vs_raw": statistics.median(x[0] for x in pairs),
                "vs_raw_per_cpu_s": statistics.median(x[1] for x in pairs),
                "decoded_positions_per_s": n / statistics.median(times),
                "server_cpu_s_per_m": statistics.median(cpu) / n * 1e6,
                "client_cpu_s_per_m": statistics.median(mine) / n * 1e6,
                # what one client process decodes per second of its own CPU
                "decoded_positions_per_client_cpu_s": n / statistics.median(mine),
            }
        )
    return out


# -- many clients -------------------------------------------------------------------------------


#: ranges each client reads in the many-clients measurement, at least
MIN_READS = 4


def _client_process(
    url: str,
    threads: int,
    per_client: int,
    span: int,
    compressed: bool,
    seed: int,
    barrier: Any,
    results: Any,
) -> None:
    """``threads`` clients in one process, each reading random ``span``-position ranges
    (int32 ids, decoded into memory it reuses: as LogitDataset reads) until it has decoded
    ``per_client`` positions;
    reports (positions, CPU s, end time, retries, errors). Each client connects and reads
    one range before the clock starts: a trainer streams for hours, so the first read's
    one-off costs (connection, first-touch memory, lookup tables) are not its rate."""
    stores = [logitstore.RemoteStore(url, compressed=compressed) for _ in range(threads)]
    pools = [BufferPool(keep=4) for _ in range(threads)]  # as LogitDataset decodes blocks
    for s, pool in zip(stores, pools, strict=True):
        s.read(0, span, id_dtype=np.int32, alloc=pool.alloc)  # connected and warm
    done = [0] * threads
    failed: list[BaseException] = []

    def run(i: int) -> None:
        store, alloc = stores[i], pools[i].alloc
        rng = np.random.default_rng(seed * 1000 + i)
        try:
            while done[i] < per_client:
                a = int(rng.integers(0, len(store) - span))
                store.read(a, a + span, id_dtype=np.int32, alloc=alloc)
                done[i] += span
        except BaseException as e:  # reported to the parent, which stops the run
            failed.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    barrier.wait()
    c0 = time.process_time()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu, end = time.process_time() - c0, time.time()
    retried = sum(s.retried for s in stores)
    for s in stores:
        s.close()
    results.put((sum(done), cpu, end, retried, [repr(e) for e in failed]))


def many_clients(
    server: Server,
    n_clients: int,
    n_positions: int,
    span: int,
    stream: str,
    procs: int,
) -> dict[str, Any]:
    """``n_clients`` clients spread over ``procs`` processes (threads in each), every one
    reading random ``span``-position ranges; the total is about ``n_positions``, and at least
    ``MIN_READS`` ranges per client (with fewer, the clock measures start-up, not a rate)."""
    compressed = MANY[stream][1]
    procs = min(procs, n_clients)
    per_client = max(n_positions // n_clients, MIN_READS * span)
    ctx = mp.get_context("fork")  # the children never touch torch
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [n_clients // procs + (i < n_clients % procs) for i in range(procs)]
    children = [
        ctx.Process(
            target=_client_process,
            args=(server.url, k, per_client, span, compressed, i, barrier, results),
        )
        for i, k in enumerate(shares)
    ]
    for c in children:
        c.start()
    barrier.wait(timeout=300)  # every client connected
    s0, t0 = server.cpu(), time.time()
    got = [results.get(timeout=1800) for _ in children]
    server_s = server.cpu() - s0
    for c in children:
        c.join()
    errors = [e for g in got for e in g[4]]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[:3]}")
    positions = sum(g[0] for g in got)
    client_s = sum(g[1] for g in got)
    wall = max(g[2] for g in got) - t0
    return {
        "clients": n_clients,
        "client_processes": procs,
        "stream": stream,
        "positions": positions,
        "retried": sum(g[3] for g in got),
        "decoded_positions_per_s": positions / wall,
        "positions_per_cpu_s": positions / (client_s + server_s),
        "server_cpu_s_per_m": server_s / positions * 1e6,
        "client_cpu_s_per_m": client_s / positions * 1e6,
    }


def many_clients_pairs(
    servers: dict[str, Server], k: int, n: int, span: int, args: argparse.Namespace, workers: int
) -> list[dict[str, Any]]:
    """:func:`many_clients` for every stream of :data:`MANY` (from the server with its
    reader in ``servers``), ``args.repeats`` times in turns (each turn's streams measured
    back to back, the order rotated and reversed between turns, so all see the machine
    alike): each
    stream's median run (the lower of two middles), and its ratios to each row stream as
    the medians over the turns."""
    streams = [name for name in MANY if MANY[name][0] in servers]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in streams}
    for i in range(args.repeats):
        # each turn starts one stream later, and every other turn runs backwards: over 3
        # turns each stream takes each place once, and no two always run side by side
        turn = streams[i % len(streams) :] + streams[: i % len(streams)]
        for name in turn[:: 1 if i % 2 == 0 else -1]:
            server = servers[MANY[name][0]]
            r = many_clients(server, k, n, span, name, args.client_processes)
            runs[name].append(r)
            print(
                f"[http] --workers {workers}, {k:>2} client(s) {name}: "
                f"{r['decoded_positions_per_s']:,.0f} pos/s, "
                f"{r['positions_per_cpu_s']:,.0f} per CPU-s",
                file=sys.stderr,
                flush=True,
            )
    out = []
    for name in streams:
        ordered = sorted(runs[name], key=lambda r: r["decoded_positions_per_s"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["decoded_positions_per_s_runs"] = [r["decoded_positions_per_s"] for r in runs[name]]
        median["retried"] = sum(r["retried"] for r in runs[name])  # in every run, not one
        for base, suffix in (("rows", "vs_rows"), ("rows via zarr", "vs_zarr_rows")):
            for key in ("decoded_positions_per_s", "positions_per_cpu_s"):
                median[f"{key}_{suffix}"] = (
                    statistics.median(
                        r[key] / b[key] for r, b in zip(runs[name], runs[base], strict=True)
                    )
                    if base in runs
                    else None
                )
        out.append(median)
    return out


# -- slow readers -------------------------------------------------------------------------------


def stalled_streams(server: Server, n: int, streams: int, wire: dict[str, float]) -> list[dict]:
    """``streams`` requests for the whole store whose clients read the first bytes and then
    nothing: how much the server read ahead for them, and its memory."""
    out = []
    # chunks first: memory the row stream's larger blocks leave behind would raise its baseline
    for name in ("chunks", "rows"):
        accept = CHUNKS_MEDIA_TYPE if STREAMS[name] else "*/*"
        sent0, rss0 = server.streamed(), server_rss(server.proc.pid)
        socks = []
        for _ in range(streams):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            s.connect(("127.0.0.1", server.port))
            req = f"GET /v1/stores/store/positions?start=0&stop={n} HTTP/1.1\r\nHost: b\r\n"
            s.sendall(f"{req}Accept: {accept}\r\n\r\n".encode())
            got = 0
            while got < 1 << 16:  # under way; then this client reads no more
                k = len(s.recv(1 << 16))
                if not k:
                    raise RuntimeError("a stream ended before its range")
                got += k
            socks.append(s)
        sent, still = sent0, 0
        while still < 3:  # the same for 3 s: every stream waits for its client
            time.sleep(1.0)
            last, sent = sent, server.streamed()
            still = still + 1 if sent == last else 0
        rss = server_rss(server.proc.pid)
        for s in socks:
            s.close()
        time.sleep(1.0)
        out.append(
            {
                "stream": name,
                "streams": streams,
                "range_mb_per_stream": wire[name] * n / 1e6,
                "sent_mb_per_stream": (sent - sent0) / streams / 1e6,
                "rss_before_mb": rss0 / 1e6,
                "rss_stalled_mb": rss / 1e6,
                "rss_mb_per_stream": (rss - rss0) / streams / 1e6,
            }
        )
    return out


# -- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_store_args(p)
    p.add_argument("--span", type=int, default=1 << 16, help="positions per client request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32, 64])
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="server processes")
    p.add_argument("--client-processes", type=int, default=2, help="processes the clients use")
    p.add_argument("--stalled", type=int, default=64, help="streams whose clients stop reading")
    p.add_argument(
        "--no-zarr-baseline",
        action="store_true",
        help="skip the many-clients row stream served through zarr's reader (the row stream "
        "as issue 15 measured it)",
    )
    p.add_argument(
        "--wire-mb",
        type=int,
        default=1024,
        help="MiB each one-stream wire measurement (and raw TCP) moves, the whole store "
        "requested again on one connection until then (default 1024)",
    )
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument("--store", type=Path, help="serve this store instead of building one")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results stem (.md/.json/.png; default benchmarks/results/http, with --quick "
        "out/benchmarks-quick/results/http)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.sample_positions, args.repeats = 1 << 15, 1 << 12, 1
        args.clients, args.span, args.stalled, args.wire_mb = [1, 4], 1 << 12, 2, 0
        args.workers = [2]  # the multi-process path; one process serves the same code
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "http"
    one_thread_if_quick(args.quick)
    one: list[dict[str, Any]] = []
    many: list[dict[str, Any]] = []
    stalled: list[dict[str, Any]] = []
    raws: list[tuple[float, float]] = []  # raw TCP beside each one-stream measurement
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store_path = args.store or build_store(args, Path(tmp))
        n = len(logitstore.open(store_path))
        span = min(args.span, n // 2)
        for workers in args.workers:
            server = Server(store_path, workers)
            servers = {"shards": server}
            try:
                if not args.no_zarr_baseline:
                    servers["zarr"] = Server(store_path, workers, reader="zarr")
                for r in one_stream(server, n, span, args.repeats, args.wire_mb << 20, raws):
                    one.append({"workers": workers, **r})
                for k in args.clients:
                    pair = many_clients_pairs(servers, k, n, span, args, workers)
                    many += [{"workers": workers, **r} for r in pair]
                if workers == args.workers[0] and args.stalled:
                    wire = {
                        r["stream"]: r["wire_bytes_per_position"]
                        for r in one
                        if r["workers"] == workers
                    }
                    stalled = [
                        {"workers": workers, **r}
                        for r in stalled_streams(server, n, args.stalled, wire)
                    ]
            finally:
                for each in servers.values():
                    each.stop()
        raw = statistics.median(r[0] for r in raws)  # for the record: the pairs set vs_raw
        raw_cpu = statistics.median(r[1] for r in raws)
    for r in one:
        print(
            f"[http] --workers {r['workers']} {r['stream']}: {r['mb_per_s']:,.0f} MB/s on the "
            f"wire ({r['vs_raw']:.2f}x raw), {r['decoded_positions_per_s']:,.0f} decoded pos/s",
            file=sys.stderr,
        )
    write(args.out, one, many, stalled, argv, raw, raw_cpu)
    return 0


def write(
    out: Path,
    one: list[dict[str, Any]],
    many: list[dict[str, Any]],
    stalled: list[dict[str, Any]],
    argv: list[str],
    raw: float,
    raw_cpu: float,
) -> None:
    load = os.getloadavg()[0]
    body = [
        "Server and clients share the machine's cores (and, on a busy machine, other work: "
        f"load average {load:.1f} when this run ended). Wall-clock rates are the share of "
        "the cores each process got; **per CPU-second** rates divide by the CPU time the "
        "measured processes used (server: the supervisor and its workers; clients: their "
        "processes), which is what the work costs, and are the figures to judge a target by "
        "on a loaded machine. `rows` is the row stream (PROTOCOL.md §2: the server "
        "decompresses and ships rows as stored, what clients before the compressed stream "
        "read); `chunks` is the compressed stream (§2.1: the shards' own chunks, decoded by "
        "the client).",
        "",
        "## One stream",
        "",
        "MB/s on the wire: the whole store requested on one connection, each body read "
        "unparsed, again until `--wire-mb` MiB have come (the steady rate, not the first "
        "block's latency), each time right after raw TCP moves as many bytes on 127.0.0.1 "
        "(`vs raw TCP`: the median of these side-by-side ratios; this VM's speed drifts "
        "over minutes) "
        "(target for `chunks`: ≥ 0.5× raw). MB per "
        "CPU-s: server and client together, beside raw TCP's sender and receiver together. "
        "Decoded: `RemoteStore.read` of the whole store in blocks of `--span` positions, "
        "as LogitDataset reads (int32 ids, into memory it reuses), in this one client "
        "process.",
        "",
        *md_table(
            [
                "workers",
                "stream",
                "wire bytes/position",
                "MB/s on the wire",
                "vs raw TCP",
                "MB per CPU-s",
                "vs raw TCP per CPU-s",
                "decoded positions/s",
                "decoded positions per client CPU-s",
                "server CPU s per 1M positions",
                "client CPU s per 1M positions",
            ],
            [
                [
                    str(r["workers"]),
                    r["stream"],
                    f"{r['wire_bytes_per_position']:.1f}",
                    f"{r['mb_per_s']:,.0f}",
                    f"{r['vs_raw']:.2f}",
                    f"{r['mb_per_cpu_s']:,.0f}",
                    f"{r['vs_raw_per_cpu_s']:.2f}",
                    f"{r['decoded_positions_per_s']:,.0f}",
                    f"{r['decoded_positions_per_client_cpu_s']:,.0f}",
                    f"{r['server_cpu_s_per_m']:.3f}",
                    f"{r['client_cpu_s_per_m']:.3f}",
                ]
                for r in one
            ],
        ),
        "",
        f"Raw TCP on 127.0.0.1, median of this run's: {raw / 1e6:,.0f} MB/s, "
        f"{raw_cpu / 1e6:,.0f} MB per "
        "CPU-s (sender + receiver).",
        "",
        "## Many clients",
        "",
        "Clients spread over client processes (threads in each), every one reading random "
        "ranges of `--span` positions and decoding them (int32 ids, into memory each client "
        "reuses once nothing refers to it: as LogitDataset does), "
        f"at least {MIN_READS} ranges each, after one untimed range that connects and warms "
        "it (a trainer streams for hours: its first read's one-off costs are not its rate); "
        "aggregate decoded positions/s, beside "
        "the row stream at the same count (`rows`) and the row stream from a second server "
        "that reads the store through zarr's own reader (`rows via zarr`: the row stream as "
        "issue 15 measured it when it set the target for `chunks`, ≥ 3× that; local stores "
        "have since been read straight from their shards, which made `rows` itself cheaper "
        "on the server). Each cell is "
        "measured `--repeats` times, in turns with the other streams (the order rotated by "
        "one and reversed every other turn, so over 3 turns each stream takes each place "
        "once): the row is the median "
        "run (`runs`: every run's decoded positions/s, in thousands), and `vs rows` / "
        "`vs rows via zarr` the medians of the ratios of runs taken side by side. Per CPU-s: "
        "positions over the CPU time of the clients and the server together. `retried`: "
        "attempts the clients had to repeat in all the runs (errors hidden by retries; 0 means "
        "none).",
        "",
        *md_table(
            [
                "workers",
                "clients",
                "stream",
                "decoded positions/s",
                "vs rows",
                "vs rows via zarr",
                "positions per CPU-s",
                "vs rows per CPU-s",
                "vs rows via zarr per CPU-s",
                "server CPU s per 1M",
                "client CPU s per 1M",
                "retried",
                "runs (k positions/s)",
            ],
            [
                [
                    str(r["workers"]),
                    str(r["clients"]),
                    r["stream"],
                    f"{r['decoded_positions_per_s']:,.0f}",
                    _ratio(r["decoded_positions_per_s_vs_rows"]),
                    _ratio(r["decoded_positions_per_s_vs_zarr_rows"]),
                    f"{r['positions_per_cpu_s']:,.0f}",
                    _ratio(r["positions_per_cpu_s_vs_rows"]),
                    _ratio(r["positions_per_cpu_s_vs_zarr_rows"]),
                    f"{r['server_cpu_s_per_m']:.3f}",
                    f"{r['client_cpu_s_per_m']:.3f}",
                    str(r["retried"]),
                    " ".join(f"{x / 1e3:,.0f}" for x in r["decoded_positions_per_s_runs"]),
                ]
                for r in many
            ],
        ),
    ]
    if stalled:
        body += [
            "",
            "## Streams whose clients stop reading",
            "",
            f"{stalled[0]['streams']} requests for the whole store, each client reading the "
            "first bytes and then nothing (64 KiB receive buffer): what the server sent before "
            "every stream waited (the socket buffers take it; the rest stays on disk), and the "
            "server's resident memory with them all open (default `--block-positions`).",
            "",
            *md_table(
                [
                    "workers",
                    "stream",
                    "MB per whole range",
                    "MB sent per stream",
                    "server RSS before, MB",
                    "with the stalled streams, MB",
                    "RSS MB per stream",
                ],
                [
                    [
                        str(r["workers"]),
                        r["stream"],
                        f"{r['range_mb_per_stream']:.1f}",
                        f"{r['sent_mb_per_stream']:.1f}",
                        f"{r['rss_before_mb']:.0f}",
                        f"{r['rss_stalled_mb']:.0f}",
                        f"{r['rss_mb_per_stream']:.2f}",
                    ]
                    for r in stalled
                ],
            ),
        ]
    body += ["", f"![HTTP]({out.with_suffix('.png').name})"]
    data = {
        "one_stream": one,
        "clients": many,
        "stalled": stalled,
        "raw_tcp_bytes_per_s": raw,
        "raw_tcp_bytes_per_cpu_s": raw_cpu,
        "load_average": load,
    }
    write_results(out, "HTTP", run_meta("bench_http.py", argv), data, body)
    plot(out.with_suffix(".png"), many)


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def plot(path: Path, many: list[dict[str, Any]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "decoded_positions_per_s", "decoded positions/s (wall clock)"),
        (axes[1], "positions_per_cpu_s", "positions per CPU-second (clients + server)"),
    ):
        for workers in sorted({r["workers"] for r in many}):
            for stream, style in (("rows via zarr", ":"), ("rows", "--"), ("chunks", "-")):
                pts = [r for r in many if r["workers"] == workers and r["stream"] == stream]
                if not pts:  # --no-zarr-baseline
                    continue
                ax.plot(
                    [r["clients"] for r in pts],
                    [r[key] for r in pts],
                    style,
                    marker="o",
                    label=f"{stream}, --workers {workers}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
