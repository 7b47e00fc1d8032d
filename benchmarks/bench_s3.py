"""Object-storage benchmark: a store read from an S3-compatible server on loopback (a real
``moto_server`` process) beside the same store on local disk, and ``logitstore copy`` both
ways beside a local-to-local copy of the same store, all in one run.

Reads: random windows (decoded ``store.read``, positions/s) and a sequential scan in blocks
(which takes the read-ahead path), each from S3 and from disk; the ratio is S3 / disk. The
raw-array rows read the four per-position arrays with zarr alone through each Zarr store
layer the project could use — zarr's ``LocalStore``, ``FsspecStore`` (s3fs, what logitstore
uses) and ``ObjectStore`` (obstore, when installed) — which is how the store layer was picked.

moto keeps objects in memory in one Python process and shares the CPUs with the client, so
the absolute S3 figures are a floor for a real object store; the ratios say where the time
goes on this machine.

    python benchmarks/bench_s3.py            # default: a few minutes on 2 cores
    python benchmarks/bench_s3.py --quick
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from benchlib.report import md_table, one_thread_if_quick, results_dir, run_meta, write_results
from benchlib.stores import add_store_args, build_store

import logitstore

BUCKET = "bench"


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """A ``moto_server`` process on a free loopback port, answering."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"moto_server did not answer on {endpoint}")


def timed(fn: Any, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_rates(store: logitstore.StoreBase, window: int, block: int, reps: int) -> dict[str, float]:
    """positions/s of random ``window`` reads and of a scan in ``block`` reads."""
    n = len(store)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, n - window, size=8)

    def windows() -> None:
        for s in starts:
            store.read(int(s), int(s) + window)

    def scan() -> None:
        for s in range(0, n, block):
            store.read(s, min(s + block, n))

    return {
        "random": len(starts) * window / timed(windows, reps),
        "scan": n / timed(scan, max(1, reps // 2)),
    }


def raw_rates(group: zarr.Group, n: int, window: int, reps: int) -> float:
    """positions/s of random ``window`` reads of the four arrays with zarr alone."""
    arrays = [group[name] for name in ("ids", "values", "residual", "input_ids")]
    starts = np.random.default_rng(1).integers(0, n - window, size=8)

    def run() -> None:
        for s in starts:
            for a in arrays:
                a[int(s) : int(s) + window]

    return len(starts) * window / timed(run, reps)


def raw_layers(
    local: Path, url: str, endpoint: str, n: int, window: int, reps: int
) -> dict[str, float]:
    from zarr.storage import FsspecStore, LocalStore

    found = {
        "zarr LocalStore (disk)": raw_rates(
            zarr.open_group(LocalStore(str(local), read_only=True), mode="r"), n, window, reps
        ),
        "zarr FsspecStore (s3fs)": raw_rates(
            zarr.open_group(FsspecStore.from_url(url, read_only=True), mode="r"), n, window, reps
        ),
    }
    try:
        from obstore.store import S3Store
        from zarr.storage import ObjectStore
    except ImportError:
        return found
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = S3Store(
        bucket,
        prefix=prefix,
        endpoint=endpoint,
        region="us-east-1",
        client_options={"allow_http": True},
    )
    group = zarr.open_group(ObjectStore(s3, read_only=True), mode="r")
    found["zarr ObjectStore (obstore)"] = raw_rates(group, n, window, reps)
    return found


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_store_args(p)
    p.set_defaults(positions=1 << 19)
    p.add_argument("--window", type=int, default=2048, help="positions per random read")
    p.add_argument("--block", type=int, default=1 << 14, help="positions per scan read")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results stem (.md/.json; default benchmarks/results/s3, with --quick "
        "out/benchmarks-quick/results/s3)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.positions, args.sample_positions, args.reps = 1 << 14, 1 << 11, 2
        args.window, args.block = 1024, 4096
    if args.out is None:
        args.out = results_dir(args.quick) / "results" / "s3"
    one_thread_if_quick(args.quick)

    proc, endpoint = start_moto()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args, Path(tmp), endpoint)
    finally:
        proc.terminate()
        proc.wait()
    write(args, argv, result)


def run(args: argparse.Namespace, tmp: Path, endpoint: str) -> dict[str, Any]:
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    local = build_store(args, tmp)
    url = f"s3://{BUCKET}/bench/store.zarr"
    up = logitstore.copy_store(local, url)
    down = logitstore.copy_store(url, tmp / "back")
    same = logitstore.copy_store(local, tmp / "same")
    copies = {
        "disk → S3": up.mb_per_s,
        "S3 → disk": down.mb_per_s,
        "disk → disk (baseline)": same.mb_per_s,
    }
    nbytes = up.bytes_copied
    disk, s3 = logitstore.open(local), logitstore.open(url)
    n = len(disk)
    reads = {
        "disk": read_rates(disk, args.window, args.block, args.reps),
        "S3": read_rates(s3, args.window, args.block, args.reps),
    }
    layers = raw_layers(local, url, endpoint, n, args.window, args.reps)
    return {
        "positions": n,
        "store_bytes": nbytes,
        "copy_mb_s": copies,
        "reads": reads,
        "raw": layers,
    }


def write(args: argparse.Namespace, argv: list[str], r: dict[str, Any]) -> None:
    meta = run_meta("bench_s3.py", argv)
    disk, s3 = r["reads"]["disk"], r["reads"]["S3"]
    base = r["copy_mb_s"]["disk → disk (baseline)"]
    raw_disk = r["raw"]["zarr LocalStore (disk)"]
    body = [
        f"A top-64 u8 store of {r['positions']:,} positions ({r['store_bytes'] / 1e6:.1f} MB) "
        "on local disk and in a moto S3 server on loopback (one Python process, sharing the "
        "CPUs with the client).",
        "",
        "## Reads through logitstore (decoded)",
        "",
        *md_table(
            ["read", "disk positions/s", "S3 positions/s", "S3 / disk"],
            [
                [
                    f"random {args.window}-position windows"
                    if kind == "random"
                    else f"scan in {args.block}-position blocks (read-ahead)",
                    f"{disk[kind]:,.0f}",
                    f"{s3[kind]:,.0f}",
                    f"{s3[kind] / disk[kind]:.3f}",
                ]
                for kind in ("random", "scan")
            ],
        ),
        "",
        "## logitstore copy (verify not included)",
        "",
        *md_table(
            ["copy", "MB/s", "vs disk → disk"],
            [[k, f"{v:.1f}", f"{v / base:.3f}"] for k, v in r["copy_mb_s"].items()],
        ),
        "",
        f"## Zarr store layers, raw arrays, random {args.window}-position windows",
        "",
        *md_table(
            ["store layer", "positions/s", "vs LocalStore"],
            [[k, f"{v:,.0f}", f"{v / raw_disk:.3f}"] for k, v in r["raw"].items()],
        ),
        "",
        "logitstore reads object storage through FsspecStore: obstore's ObjectStore is faster "
        "where it is installed, but a DataLoader worker forked after the parent read through "
        "it hangs (its runtime does not survive fork), and botocore reads every standard AWS "
        "source (profiles, ~/.aws/config, AWS_ENDPOINT_URL).",
    ]
    write_results(args.out, "S3 (loopback moto) vs local disk", meta, r, body)
    print("\n".join(body))


if __name__ == "__main__":
    main()
