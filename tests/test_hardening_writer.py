"""A writer that never tracebacks (issue 17, items 9–13): clean errors for bad text and bad
``--out`` paths, a documented cap on one document's length, a finished store rerun exits 0,
and commits forced to disk (``fsync``) by default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.cli import main


def _write(teacher_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
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
        "48",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_rerunning_a_finished_write_exits_0(
    teacher_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.zarr"
    assert main(_write(teacher_dir, data_file, out)) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_write(teacher_dir, data_file, out)) == 0
    assert "already complete" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # other settings: still refused, naming the way out
    assert main(_write(teacher_dir, data_file, out, "--temperature", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err


def _bad_text(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "def f(x):\\n    return \\ud800 + x\\n"}\n')
    return path


def test_a_lone_surrogate_is_a_clean_input_error(
    teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_write(teacher_dir, _bad_text(tmp_path), tmp_path / "s.zarr")) == 2
    err = capsys.readouterr().err
    assert "surrogate" in err and "bad.jsonl:1" in err and "Traceback" not in err, err


def test_out_whose_parent_is_a_file_is_a_clean_error(
    teacher_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    assert main(_write(teacher_dir, data_file, tmp_path / "file" / "s.zarr")) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_out_in_a_read_only_directory_is_a_clean_error(
    teacher_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(_write(teacher_dir, data_file, ro / "s.zarr")) == 2
    finally:
        ro.chmod(0o755)
    assert "cannot" in capsys.readouterr().err


def test_out_a_symlink_with_overwrite_leaves_nothing_behind(
    teacher_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real.zarr"
    assert main(_write(teacher_dir, data_file, real)) == 0
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    code = main(_write(teacher_dir, data_file, link, "--overwrite", "--temperature", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "symbolic link" in err, err
    assert not list(tmp_path.glob(".*creating*")), list(tmp_path.iterdir())
    assert logitstore.verify(real).ok


def test_a_document_over_the_cap_is_refused_by_name(
    teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from logitstore.write import inputs

    monkeypatch.setattr(inputs, "MAX_DOCUMENT_CHARS", 1000)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "x = 1\n"}) + "\n" + json.dumps({"text": "y" * 5000}))
    assert main(_write(teacher_dir, data, tmp_path / "s.zarr")) == 2
    err = capsys.readouterr().err
    assert "long.jsonl:2" in err and "1,000" in err and "split" in err, err


def test_commits_are_fsynced_by_default(tmp_path: Path, monkeypatch) -> None:
    from logitstore.write import durable

    synced: list[str] = []
    real = durable.sync_file

    def spy(path: Path | str) -> None:
        synced.append(str(path))
        real(path)

    monkeypatch.setattr("logitstore.write.writer.sync_file", spy)
    rows = _rows(64)
    seqs = logitstore.sequences_from_token_ids([np.arange(64) % 16], 64)
    enc = logitstore.Encoding("topk", "fp32", k=4)
    for fsync in (True, False):
        synced.clear()
        out = tmp_path / f"s{fsync}.zarr"
        with logitstore.StoreWriter(
            out,
            encoding=enc,
            vocab_size=16,
            input_ids=seqs.input_ids,
            offsets=seqs.offsets,
            shard_positions=32,
            chunk_positions=16,
            fsync=fsync,
        ) as w:
            w.write(0, rows)
        keys = [os.path.relpath(s, out) for s in synced]
        shards = [k for k in keys if "/c/" in k and not k.startswith("commits")]
        commits = [k for k in keys if k.startswith("commits/c/")]
        assert (len(shards), len(commits)) == ((6, 2) if fsync else (0, 0)), synced
        assert logitstore.verify(out).ok


def _rows(n: int):  # type: ignore[no-untyped-def]
    import torch

    from logitstore.write.encode import encode_rows

    logits = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    return encode_rows(logits, logitstore.Encoding("topk", "fp32", k=4), 0, torch.arange(n))


def test_out_with_a_name_too_long_for_the_file_system_is_a_clean_error(
    teacher_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_write(teacher_dir, data_file, tmp_path / ("a" * 300 + ".zarr"))) == 2
    assert "--out" in capsys.readouterr().err
