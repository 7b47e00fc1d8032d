"""Capture under torchrun: real torchrun processes (gloo on CPU) writing one store.

Every store a job of several ranks writes is compared byte for byte with the store one
process writes from the same command (one intra-op thread, a pinned ``created_at``), after
a plain run, a run whose rank was SIGKILLed and resumed with another number of ranks,
``generate``, and two "nodes" joined by a c10d rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.write.distributed import assign_shards, rank_device, shard_costs
from logitstore.write.lock import store_lock

from .conftest import CORPUS, deterministic_env

STORE_ARGS = ["--shard-positions", "64", "--chunk-positions", "16", "--device", "cpu"]


def _files(root: Path | str) -> dict[str, bytes]:
    root = Path(root)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _env() -> dict[str, str]:
    return deterministic_env(SOURCE_DATE_EPOCH="1700000000")


def _write_args(teacher_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        "write",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--encoding",
        "sampled",
        "--samples",
        "16",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        *STORE_ARGS,
    ]


def _torchrun(nproc: int, args: list[str], *launch: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(launch or ("--standalone",)),
        "--nproc-per-node",
        str(nproc),
        "-m",
        "logitstore",
        *args,
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [CORPUS[i % len(CORPUS)] * (1 + i % 4) for i in range(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def reference(teacher_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store one process writes: what every distributed run must equal."""
    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    _run(
        [sys.executable, "-m", "logitstore", *_write_args(teacher_dir, data, out), "--no-progress"]
    )
    return out


# -- the plan: pure functions ----------------------------------------------------------------


def test_shards_are_split_into_contiguous_runs_of_equal_cost() -> None:
    cost = np.array([1, 1, 1, 1, 4, 4, 1, 1, 1, 1], dtype=float)
    owner = assign_shards(cost, np.ones(10, bool), 2)
    assert owner.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]  # 8 vs 8, not 5 shards each
    assert (np.diff(owner) >= 0).all()
    # Committed shards are nobody's; a resume with 3 ranks splits what is left.
    todo = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    owner = assign_shards(np.ones(10), todo, 3)
    assert owner.tolist() == [-1, -1, 0, 0, 1, 1, 1, 2, -1, 2]
    assert assign_shards(np.ones(2), np.ones(2, bool), 4).tolist() == [1, 3]  # idle ranks
    assert (assign_shards(np.ones(3), np.zeros(3, bool), 2) == -1).all()
    # Shards in blocks of 2 (one group of the batch plan each): no cut inside a block.
    owner = assign_shards(np.ones(7), np.array([1, 1, 1, 1, 1, 1, 0], bool), 2, unit=2)
    assert owner.tolist() == [0, 0, 1, 1, 1, 1, -1]


def test_ranks_share_at_most_the_batch_of_a_sequence_across_their_cut() -> None:
    from logitstore.write.capture import plan_batches

    rng = np.random.default_rng(0)
    lens = rng.integers(2, 40, 400)  # (S,)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    plan = plan_batches(lens, 4, "length", align=64)
    sp, ns = 64, -(-int(offsets[-1]) // 64)
    owner = assign_shards(np.ones(ns), np.ones(ns, bool), 3, unit=3)  # 4 x 40 tokens: 3 shards
    first, last = owner[offsets[:-1] // sp], owner[(offsets[1:] - 1) // sp]  # (S,)
    runs = [
        sum(bool(np.isin(b, np.flatnonzero((first <= r) & (last >= r))).any()) for b in plan)
        for r in range(3)
    ]
    assert sum(runs) <= len(plan) + 2  # two cuts: at most one batch run twice at each


def test_shard_cost_counts_the_padded_tokens_of_each_shard() -> None:
    offsets = np.array([0, 10, 12, 40])  # sequences of 10, 2 and 28 tokens
    widths = np.array([10, 10, 28])  # the short one ran padded to 10
    cost = shard_costs(offsets, widths, 16, 3)
    assert cost.sum() == pytest.approx(48)
    assert cost[0] == pytest.approx(10 + 10 + 28 * 4 / 28)


def test_a_rank_runs_on_its_local_gpu_or_the_cpu() -> None:
    from logitstore.write.distributed import Ranks

    r = Ranks(3, 4, 1, store=None)
    assert rank_device("cpu", r) == "cpu"
    assert rank_device(None, None) is None and rank_device("cuda:1", None) == "cuda:1"
    with pytest.raises(logitstore.TeacherError, match="cuda:LOCAL_RANK"):
        rank_device("cuda:2", r)


# -- one job per store -------------------------------------------------------------------------


def test_a_second_job_on_a_store_is_refused(teacher: logitstore.Teacher, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from logitstore.write.lock import store_lock\n"
            "with store_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        seqs = logitstore.sequences_from_token_ids([list(range(1, 50))], 32)
        enc = logitstore.Encoding("topk", "u8", k=4)
        with pytest.raises(logitstore.StoreExistsError, match=f"another job.*pid {holder.pid}"):
            logitstore.capture(teacher, seqs, out, enc, progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.communicate()
    # The lock dies with its holder: no stale lock after a kill.
    seqs = logitstore.sequences_from_token_ids([list(range(1, 50))], 32)
    logitstore.capture(teacher, seqs, out, logitstore.Encoding("topk", "u8", k=4), progress=False)
    with store_lock(out), store_lock(out):  # nested in one process: generate calls capture
        pass


# -- --device-map auto ----------------------------------------------------------------------


def test_device_map_auto_places_the_teacher_and_writes_the_same_store(
    teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("accelerate")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    placed = logitstore.load_teacher(str(teacher_dir), device_map="auto")
    plain = logitstore.load_teacher(str(teacher_dir), "cpu")
    seqs = logitstore.sequences_from_token_ids([list(range(1, 60)), list(range(5, 30))], 32)
    enc = logitstore.Encoding("topk", "u8", k=4)
    a = logitstore.capture(placed, seqs, tmp_path / "a", enc, progress=False)
    b = logitstore.capture(plain, seqs, tmp_path / "b", enc, progress=False)
    assert placed.device.type == "cpu"  # no GPU here: accelerate keeps every layer on the CPU
    assert _files(a) == _files(b)


def test_device_map_without_accelerate_or_with_a_device_is_a_clear_error(
    teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # not importable, as if not installed
    with pytest.raises(logitstore.TeacherError, match=r"pip install 'logitstore\[multigpu\]'"):
        logitstore.load_teacher(str(teacher_dir), device_map="auto")
    with pytest.raises(logitstore.TeacherError, match="drop --device cpu"):
        logitstore.load_teacher(str(teacher_dir), "cpu", device_map="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(logitstore.TeacherError, match="torchrun"):
        logitstore.load_teacher(str(teacher_dir), device_map="auto")


# -- real torchrun jobs --------------------------------------------------------------------


def _worker(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker process of ``rank`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_loses_only_uncommitted_shards_and_three_ranks_finish_the_job(
    teacher_dir: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed.zarr"
    job = subprocess.Popen(
        _torchrun(2, [*_write_args(teacher_dir, data, out), "--no-progress"]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    commits = out / "commits" / "c"
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and job.poll() is None:
        if commits.is_dir() and len(list(commits.iterdir())) >= 3:
            killed = _worker(job.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    _, err = job.communicate(timeout=120)
    assert killed is not None, "the job finished before a rank could be killed; use more data"
    assert job.returncode != 0, err[-2000:]  # torchrun tore the job down
    partial = logitstore.open(out, allow_incomplete=True)
    assert partial.metadata.state == "writing"
    done = np.flatnonzero(partial.committed())
    assert 0 < len(done) < partial.metadata.num_shards
    ref = _files(reference)
    for s in done:  # every committed shard is intact: the reference's bytes
        for name in ("ids", "values"):
            assert (out / name / "c" / str(s) / "0").read_bytes() == ref[f"{name}/c/{s}/0"]
    # Resume with another number of ranks: only what was not committed is written.
    logs = tmp_path / "logs"
    _run(
        _torchrun(
            3,
            _write_args(teacher_dir, data, out),
            "--standalone",
            "--log-dir",
            str(logs),
            "-r",
            "3",
        )
    )
    assert _files(out) == _files(reference)
    assert logitstore.verify(out).ok
    # One progress bar, the whole job's, on rank 0; the other ranks print nothing.
    by_rank = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert set(by_rank) == {"0", "1", "2"}
    assert "write killed.zarr: 100%" in by_rank["0"]  # every rank's positions, on rank 0
    assert by_rank["1"].strip() == "" and by_rank["2"].strip() == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_joined_by_c10d_write_one_store(
    teacher_dir: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nodes.zarr"
    rdzv = [
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv-id",
        "logitstore-test",
    ]
    cmd = _torchrun(1, [*_write_args(teacher_dir, data, out), "--no-progress"], *rdzv)
    nodes = [
        subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert _files(out) == _files(reference)


@pytest.mark.slow
def test_generate_under_torchrun_killed_and_resumed_equals_one_process(
    teacher_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    texts = [c[: 8 + 2 * i] for i, c in enumerate(CORPUS * 5)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    def args(out: Path) -> list[str]:
        return [
            "generate",
            "--teacher",
            str(teacher_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "16",
            "--num-samples",
            "2",
            "--batch-size",
            "2",
            "--soft",
            "topk",
            "--k",
            "4",
            "--no-progress",
            *STORE_ARGS,
        ]

    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    _run([sys.executable, "-m", "logitstore", *args(one)])
    # Two ranks, each appending finished batches to its own journal; rank 1 is killed.
    job = subprocess.Popen(
        _torchrun(2, args(two)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    journal = tmp_path / "two.zarr.generating.rank1.jsonl"
    deadline, killed = time.monotonic() + 240, None
    while time.monotonic() < deadline and job.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 3:  # header + 2 batches
            killed = _worker(job.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    job.communicate(timeout=120)
    assert killed is not None, "generation finished before a rank could be killed"
    assert job.returncode != 0 and not two.exists()
    kept = [p.read_bytes().count(b"\n") - 1 for p in tmp_path.glob("two.zarr.generating*")]
    assert len(kept) == 2 and sum(kept) >= 2  # the finished batches are kept
    # Three ranks take over what is left, from both journals; the store is the one-process one.
    _run(_torchrun(3, args(two)))
    assert _files(two) == _files(one)
    assert not list(tmp_path.glob("*.generating*"))  # every rank's journal is gone


@pytest.mark.gpu
@pytest.mark.slow
def test_two_ranks_on_two_gpus_write_the_single_gpu_store(
    teacher_dir: Path, data: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")

    def args(out: Path) -> list[str]:  # --device cuda: each rank takes cuda:LOCAL_RANK
        a = [*_write_args(teacher_dir, data, out), "--no-progress"]
        a[a.index("--device") + 1] = "cuda"
        return a

    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    _run([sys.executable, "-m", "logitstore", *args(one)])
    _run(_torchrun(2, args(two)))
    assert logitstore.verify(two).ok
    assert _files(two) == _files(one)


@pytest.mark.gpu
def test_device_map_auto_places_the_teacher_on_the_gpus(
    teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("accelerate")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    placed = logitstore.load_teacher(str(teacher_dir), device_map="auto")
    assert placed.device.type == "cuda"
    seqs = logitstore.sequences_from_token_ids([list(range(1, 60)), list(range(5, 30))], 32)
    enc = logitstore.Encoding("topk", "u8", k=4)
    a = logitstore.capture(placed, seqs, tmp_path / "a", enc, progress=False)
    assert logitstore.verify(a).ok
    if torch_device_count() == 1:  # all on one GPU: the store of --device cuda
        plain = logitstore.load_teacher(str(teacher_dir), "cuda")
        b = logitstore.capture(plain, seqs, tmp_path / "b", enc, progress=False)
        assert _files(a) == _files(b)


def torch_device_count() -> int:
    import torch

    return int(torch.cuda.device_count())
