"""Probes a running `logitstore serve` the way an attacker would (issue 17, items 1-2), and
records what they cost: the server's memory after a flood of header lines sent without a
token, and whether a new client is answered while many half-sent requests are held open.

The server runs in a subprocess with its open-file limit pinned at 1,024 (soft and hard), as
on a default Linux box, so half-sent connections could exhaust it. Results go to
benchmarks/results/probe_server.{json,md} with the command that produced them.

    python benchmarks/probe_server.py            # 128 MiB of headers, 1,100 connections
    python benchmarks/probe_server.py --quick    # 8 MiB, 300 connections (the test suite)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "v1" / "topk-u8.zarr"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _get(url: str, timeout: float = 5.0) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status, time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - t0


def header_flood(port: int, mib: int) -> dict[str, object]:
    """Send ``mib`` MiB of header lines on one connection; what came back, and when."""
    line = b"X-Probe: " + b"a" * 1000 + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1/stores HTTP/1.1\r\nHost: x\r\n")
        try:
            while sent < mib << 20:
                s.sendall(line * 64)
                sent += len(line) * 64
        except OSError:  # the server closed the connection: the point of the limit
            pass
        with contextlib.suppress(OSError):
            answer = s.recv(4096)
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return {"header_bytes_sent": sent, "answer": status_line}


def half_sent(port: int, count: int, url: str) -> dict[str, object]:
    """Hold ``count`` connections with half a request each; then ask as a new client."""
    socks = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /v1/stores HTTP/1.1\r\nHost: x\r\nX-Half: ")
            socks.append(s)
        except OSError:
            break
    time.sleep(0.5)
    status, seconds = _get(url)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return {
        "opened": len(socks),
        "closed_by_server": closed,
        "new_client_status": status,
        "new_client_seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 MiB and 300 connections")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "probe_server",
        help="results path stem: writes STEM.json and STEM.md",
    )
    args = ap.parse_args(argv)
    mib, conns = (8, 300) if args.quick else (128, 1100)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(shutil.copytree(GOLDEN, Path(tmp) / "probe.zarr"))
        port = _free_port()
        cmd = [sys.executable, "-m", "logitstore", "serve", str(store), "--port", str(port)]
        proc = subprocess.Popen(
            cmd, preexec_fn=_pin_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}/v1/stores"
        try:
            for _ in range(200):
                try:
                    _get(url, 1.0)
                    break
                except OSError:
                    time.sleep(0.1)
            for _ in range(20):  # warm up
                _get(url)
            rss0 = _rss_mib(proc.pid)
            flood = header_flood(port, mib)
            time.sleep(0.3)
            rss1 = _rss_mib(proc.pid)
            held = half_sent(port, conns, url)
            rss2 = _rss_mib(proc.pid)
            after = _get(url)
        finally:
            proc.terminate()
            proc.wait(10)
    result = {
        "command": "python benchmarks/probe_server.py" + (" --quick" if args.quick else ""),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "server_fd_limit": 1024,
        "rss_mib_before": round(rss0, 1),
        "header_flood_mib": mib,
        **{f"flood_{k}": v for k, v in flood.items()},
        "rss_mib_after_flood": round(rss1, 1),
        "half_sent_connections": conns,
        **{f"half_{k}": v for k, v in held.items()},
        "rss_mib_after_half_sent": round(rss2, 1),
        "status_after": after[0],
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| probe | RSS before (MiB) | RSS after (MiB) | growth / 50 MiB limit | new client |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| {mib} MiB of header lines, no token | {rss0:.1f} | {rss1:.1f} | "
        f"{(rss1 - rss0) / 50:.3f} | answered {flood['answer']!r} |",
        f"| {conns} half-sent requests held (server fd limit 1,024) | {rss0:.1f} | {rss2:.1f} "
        f"| {(rss2 - rss0) / 50:.3f} | HTTP {held['new_client_status']} in "
        f"{held['new_client_seconds']} s; {held['closed_by_server']} probes closed by the server |",
    ]
    args.out.with_suffix(".md").write_text(f"`{result['command']}`\n\n" + "\n".join(table) + "\n")
    ok = (
        rss1 - rss0 < 50
        and rss2 - rss0 < 50
        and held["new_client_status"] == 200
        and after[0] == 200
        and str(flood["answer"]).startswith("HTTP/1.1 431")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
