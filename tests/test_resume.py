"""Commit protocol: a writer killed at any moment resumes to the same bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import logitstore
from logitstore import Encoding

from .conftest import CORPUS, deterministic_env, dies_at_call, kill_when

SMALL = {"progress": False, "shard_positions": 64, "chunk_positions": 16}  # many shards


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture()
def big_data(tmp_path: Path) -> Path:
    path = tmp_path / "big.jsonl"
    texts = [CORPUS[i % len(CORPUS)] * (2 + i % 5) for i in range(60)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _write_cmd(teacher_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "logitstore",
        "write",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--k",
        "8",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--shard-positions",
        "64",
        "--chunk-positions",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return deterministic_env(SOURCE_DATE_EPOCH="1700000000")


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["topk", "sampled"])
def test_killed_writer_resumes_byte_identical(teacher_dir, big_data, tmp_path, encoding) -> None:
    extra = ("--encoding", encoding, "--samples", "16")
    ref = tmp_path / "ref"
    subprocess.run(
        _write_cmd(teacher_dir, big_data, ref, *extra), env=_env(), check=True, capture_output=True
    )
    out = tmp_path / "out"
    commits = out / "commits" / "c"
    kills = [
        kill_when(
            _write_cmd(teacher_dir, big_data, out, *extra),
            _env(),
            lambda n=n: commits.is_dir() and len(list(commits.iterdir())) >= n,
        )
        for n in (2, 5)  # kill twice, at different points
    ]
    assert kills == [True, True], "the writer finished before it could be killed; use more data"
    with pytest.raises(logitstore.IncompleteStoreError, match="rerun the same"):
        logitstore.open(out)
    partial = logitstore.open(out, allow_incomplete=True)
    assert partial.metadata.state == "writing"
    subprocess.run(
        _write_cmd(teacher_dir, big_data, out, *extra), env=_env(), check=True, capture_output=True
    )
    assert _files(out) == _files(ref)
    assert logitstore.verify(out).ok


def test_resume_with_other_settings_is_refused(teacher, tmp_path) -> None:
    seqs = logitstore.sequences_from_token_ids([list(range(1, 200))], 32)
    out = tmp_path / "s"
    enc = Encoding("topk", "u8", k=4)
    with pytest.raises(RuntimeError, match="teacher died"):
        logitstore.capture(dies_at_call(teacher, 3), seqs, out, enc, batch_size=1, **SMALL)
    assert logitstore.open(out, allow_incomplete=True).metadata.state == "writing"
    before = _files(out)
    with pytest.raises(logitstore.ResumeMismatchError, match="other data or settings"):
        logitstore.capture(teacher, seqs, out, Encoding("topk", "u8", k=5), **SMALL)
    other = logitstore.sequences_from_token_ids([list(range(2, 201))], 32)
    with pytest.raises(logitstore.ResumeMismatchError):
        logitstore.capture(teacher, other, out, enc, **SMALL)
    assert _files(out) == before  # refusing loses nothing
    logitstore.capture(teacher, seqs, out, enc, **SMALL)
    assert logitstore.open(out).metadata.state == "complete"


def test_complete_store_is_not_overwritten_without_flag(teacher, tmp_path) -> None:
    seqs = logitstore.sequences_from_token_ids([list(range(1, 50))], 32)
    out = logitstore.capture(
        teacher, seqs, tmp_path / "s", Encoding("topk", "u8", k=4), progress=False
    )
    before = _files(out)
    # The same write again (a scheduler's rerun) finds it complete: nothing changes.
    logitstore.capture(teacher, seqs, out, Encoding("topk", "u8", k=4), progress=False)
    assert _files(out) == before
    with pytest.raises(logitstore.StoreExistsError, match="--overwrite"):
        logitstore.capture(teacher, seqs, out, Encoding("topk", "u7", k=4), progress=False)
    assert _files(out) == before
    logitstore.capture(
        teacher, seqs, out, Encoding("topk", "fp16", k=4), progress=False, overwrite=True
    )
    assert logitstore.open(out).encoding.values == "fp16"


def test_a_directory_that_is_not_a_store_is_never_touched(teacher, tmp_path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    seqs = logitstore.sequences_from_token_ids([list(range(1, 50))], 32)
    for overwrite in (False, True):
        with pytest.raises(logitstore.StoreExistsError, match="not a logitstore store"):
            logitstore.capture(
                teacher,
                seqs,
                target,
                Encoding("topk", "u8", k=4),
                progress=False,
                overwrite=overwrite,
            )
    assert (target / "notes.txt").read_text() == "keep me"


def test_a_teacher_retrained_in_place_does_not_resume_an_old_store(tmp_path) -> None:
    from .conftest import make_teacher

    path = make_teacher(tmp_path / "t")
    old = logitstore.load_teacher(str(path), "cpu")
    seqs = logitstore.sequences_from_token_ids([list(range(1, 200))], 32)
    enc = Encoding("topk", "u8", k=4)
    with pytest.raises(RuntimeError, match="teacher died"):
        logitstore.capture(dies_at_call(old, 3), seqs, tmp_path / "s", enc, batch_size=1, **SMALL)
    make_teacher(path, head_scale=9.0)  # same config and tokenizer, other weights
    new = logitstore.load_teacher(str(path), "cpu")
    assert new.provenance()["weights_digest"] != old.provenance()["weights_digest"]
    with pytest.raises(logitstore.ResumeMismatchError):
        logitstore.capture(new, seqs, tmp_path / "s", enc, batch_size=1, **SMALL)
