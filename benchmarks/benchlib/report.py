"""What every benchmark script shares: where results go, the record of how and where a run
happened, Markdown tables, results files and plots, and the progress log."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import logitstore

__all__ = [
    "BENCH_DIR",
    "QUICK_DIR",
    "REPO_ROOT",
    "compose_results_md",
    "log",
    "md_table",
    "one_thread_if_quick",
    "pyplot",
    "results_dir",
    "run_meta",
    "write_results",
]

BENCH_DIR = Path(__file__).resolve().parent.parent  # benchmarks/
REPO_ROOT = BENCH_DIR.parent
# --quick results land here (git-ignored), never over the committed ones in benchmarks/.
QUICK_DIR = REPO_ROOT / "out" / "benchmarks-quick"


def results_dir(quick: bool) -> Path:
    """The default directory a run writes into: benchmarks/ (whose results/, RESULTS.md and
    results.json are committed) for a real run, out/benchmarks-quick/ for a --quick one."""
    return QUICK_DIR if quick else BENCH_DIR


def one_thread_if_quick(quick: bool) -> None:
    """A --quick run computes with one torch thread. Its models are tiny, and two OpenMP
    threads wait on each other at every op: with the 2 cores shared with other processes, a
    training step of the quick teacher took 536 ms on two threads and 10 ms on one."""
    if quick:
        torch.set_num_threads(1)


def log(tag: str, message: str) -> None:
    """``[tag HH:MM:SS] message`` on stderr, so stdout stays clean for printed reports."""
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_meta(script: str, argv: list[str]) -> dict[str, Any]:
    """Command, date, machine and library versions, for the results files."""
    return {
        "command": " ".join(["python", f"benchmarks/{script}", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "versions": {
            "torch": torch.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
            "logitstore": logitstore.__version__,
            "numba": _numba(),
        },
    }


def _numba() -> str:
    """numba's version and the decoder this run uses (numba's kernel, or NumPy's)."""
    from logitstore.format import fused

    try:
        version = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return f"{version} (decoder: {fused.decoder()})"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, first column left-aligned, the rest right-aligned."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [f"| {' | '.join(r)} |" for r in (header, align, *rows)]


def write_results(
    out: Path, title: str, meta: dict[str, Any], data: dict[str, Any], body: list[str]
) -> None:
    """``out``.json (meta + data) and ``out``.md (a header naming the run, then ``body``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, **data}, indent=2))
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    head = [
        f"# {title} — {meta['date']}",
        "",
        f"`{meta['command']}` on {meta['machine']}; {versions}.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(head + body) + "\n")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (with a word) if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[dev]')", file=sys.stderr)
        return None
    return plt


def compose_results_md(bench_dir: Path) -> None:
    """``bench_dir``/RESULTS.md: the trade-off study (tradeoff.py) with its plots, then the
    distillation-methods comparison (methods.py), each as its script last wrote it."""
    results = bench_dir / "results"
    parts = []
    if (results / "tradeoff.md").exists():
        parts.append(
            (results / "tradeoff.md").read_text() + "\n![KL frontier](results/tradeoff_kl.png)\n"
            "![students](results/tradeoff_student.png)\n"
        )
    if (results / "methods.md").exists():
        parts.append((results / "methods.md").read_text().replace("# ", "## ", 1))
    (bench_dir / "RESULTS.md").write_text("\n".join(parts))
