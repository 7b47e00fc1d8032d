"""Every benchmark script runs: its --quick mode, as a real subprocess, writes its results
into a temporary directory, and the ratio against the baseline measured in the same run is a
finite number. A change that breaks a benchmark fails here, not months later in a rerun.

The quick runs take about 5 to 20 s each on 2 cores (tiny sizes, and a teacher trained for a
second in the scratch directory where a study needs one); none touches benchmarks/results or
the cached teacher.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))

#: script → (arguments after --quick, with {out} for the scratch directory; the Markdown
#: table it writes, relative to {out}; the columns that hold ratios against a baseline)
QUICK: dict[str, tuple[list[str], str, list[str]]] = {
    "bench_write.py": (
        ["--out", "{out}/write"],
        "write.md",
        ["store/memmap", "fsync time ×"],
    ),
    "bench_batching.py": (["--out", "{out}/batching"], "batching.md", ["vs sequential"]),
    "bench_read.py": (
        ["--out", "{out}/read"],
        "read.md",
        ["per CPU s vs previous decoder", "per CPU s vs memmap", "wall vs memmap", "CPU vs CE"],
    ),
    "bench_http.py": (
        ["--out", "{out}/http"],
        "http.md",
        ["vs raw TCP", "vs raw TCP per CPU-s", "vs rows", "vs rows per CPU-s"],
    ),
    "bench_loss.py": (["--out", "{out}/loss"], "loss.md", ["vs CE only", "peak vs CE"]),
    "bench_ranks.py": (["--out", "{out}/ranks"], "ranks.md", ["vs 1 × 1"]),
    "bench_s3.py": (["--out", "{out}/s3"], "s3.md", ["S3 / disk", "vs disk → disk"]),
    "probe_server.py": (["--out", "{out}/probe"], "probe.md", ["growth / 50 MiB limit"]),
    "tradeoff.py": (
        ["--out-dir", "{out}"],
        "results/tradeoff.md",
        ["gap closed (CE → online KD)"],
    ),
    "methods.py": (
        ["--out-dir", "{out}"],
        "results/methods.md",
        ["gap closed (CE → online KD)"],
    ),
    # the store and both exports; the peers' own loaders run only in a full run
    "peers_check.py": (["--out", "{out}"], "results/peers.md", []),
    "peers.py": (["--out-dir", "{out}"], "results/peers_layouts.md", ["read vs .npy (CPU-s)"]),
}


def run_quick(script: str, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n{tail}"


def column(markdown: str, header: str) -> list[str]:
    """The non-empty cells under ``header`` in the Markdown tables of ``markdown``."""
    cells: list[str] = []
    index = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            index = None
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if index is None:
            index = row.index(header) if header in row else -1
        elif index >= 0 and not set(row[index]) <= set("-:") and row[index]:
            cells.append(row[index])
    return cells


def as_number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_each_script_has_a_quick_run_here() -> None:
    assert set(SCRIPTS) == {*QUICK, "teacher.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_run_writes_its_table_with_finite_ratios(script: str, tmp_path: Path) -> None:
    args, table, ratio_columns = QUICK[script]
    run_quick(script, [a.format(out=tmp_path) for a in args])
    md = (tmp_path / table).read_text()
    assert (tmp_path / table).with_suffix(".json").is_file()
    for header in ratio_columns:
        cells = column(md, header)
        assert cells, f"{table} has no {header!r} column with values:\n{md}"
        assert all(math.isfinite(as_number(c)) for c in cells), f"{header}: {cells}"


@pytest.mark.slow
def test_quick_teacher_trains_saves_and_reloads(tmp_path: Path) -> None:
    run_quick("teacher.py", ["--out", str(tmp_path / "teacher")])
    report = json.loads((tmp_path / "teacher" / "report.json").read_text())
    vocab = report["model"]["vocab_size"]
    # Better than a uniform guess over the vocabulary: it learnt something in its second.
    assert report["metrics"]["held_out_loss"] < math.log(vocab)
    measured = report["training"]["bf16_autocast"]["measured"]  # the bf16-vs-fp32 timing
    assert math.isfinite(measured["bf16_s"] / measured["fp32_s"])
    assert report["reload_check"]["argmax_agreement"] >= 0.98
    assert (tmp_path / "teacher" / "model.safetensors").is_file()


def test_no_benchmark_imports_another_or_edits_sys_path() -> None:
    """Scripts share benchlib; none imports a sibling script (a script run as
    ``python benchmarks/X.py`` finds benchlib without path edits)."""
    scripts = {Path(s).stem for s in SCRIPTS}
    problems = []
    for path in sorted(BENCH.rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                if isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.path":
                    problems.append(f"{where}:{node.lineno} uses sys.path")
                continue
            for name in names:
                if name.split(".")[0] in scripts | {"common", "benchmarks"}:
                    problems.append(f"{where}:{node.lineno} imports {name}")
    assert not problems, "\n".join(problems)
