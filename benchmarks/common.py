"""What every benchmark script shares: the record of how and where it ran, and tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import logitstore

__all__ = ["compose_results_md", "md_table", "pyplot", "run_meta", "write_results"]


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
        },
    }


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
        import sys

        print("matplotlib is not installed: no plot (pip install -e '.[dev]')", file=sys.stderr)
        return None
    return plt


def compose_results_md(bench_dir: Path) -> None:
    """benchmarks/RESULTS.md: the trade-off study (tradeoff.py) with its plots, then the
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
