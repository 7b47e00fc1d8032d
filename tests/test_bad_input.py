"""Bad input gets a clear error before any teacher time is spent, and loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding
from logitstore.cli import main

from .conftest import make_teacher


def _write(teacher_dir: Path, data: list[Path], out: Path, *extra: str) -> list[str]:
    return [
        "write",
        "--teacher",
        str(teacher_dir),
        "--data",
        *map(str, data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _expect_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 3)
    return path


def test_empty_file(teacher_dir, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    _expect_error(capsys, _write(teacher_dir, [empty], out), "empty.txt", "empty")
    assert not out.exists()


def test_invalid_jsonl_line_names_file_and_line(teacher_dir, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "unterminated\n')
    _expect_error(capsys, _write(teacher_dir, [bad], tmp_path / "o"), "bad.jsonl:3", "invalid JSON")


def test_jsonl_line_without_text(teacher_dir, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    _expect_error(capsys, _write(teacher_dir, [bad], tmp_path / "o"), "bad.jsonl:1", "'text'")


def test_unsupported_suffix_and_missing_file(teacher_dir, tmp_path, capsys) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    _expect_error(capsys, _write(teacher_dir, [csv], tmp_path / "o"), ".csv", ".txt", ".jsonl")
    _expect_error(
        capsys,
        _write(teacher_dir, [tmp_path / "nope.txt"], tmp_path / "o"),
        "nope.txt",
        "does not exist",
    )


def test_document_shorter_than_two_tokens(teacher_dir, good, tmp_path, capsys) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text(
        json.dumps({"text": "long enough text here"}) + "\n" + json.dumps({"text": "a"}) + "\n"
    )
    _expect_error(
        capsys, _write(teacher_dir, [good, short], tmp_path / "o"), "short.jsonl:2", "at least 2"
    )


def test_tokenizer_larger_than_model_vocab(tmp_path, good, capsys) -> None:
    from transformers import GPT2LMHeadModel

    path = make_teacher(tmp_path / "t")
    model = GPT2LMHeadModel.from_pretrained(path)
    model.resize_token_embeddings(200)  # fewer outputs than the tokenizer's 320 tokens
    model.save_pretrained(path)
    _expect_error(capsys, _write(path, [good], tmp_path / "o"), "320 tokens", "only 200")


def test_k_larger_than_vocab(teacher_dir, good, tmp_path, capsys) -> None:
    _expect_error(
        capsys,
        _write(teacher_dir, [good], tmp_path / "o", "--k", "1000"),
        "--k 1000",
        "vocabulary (320 tokens)",
    )


@pytest.mark.parametrize(
    ("device", "fragment"),
    [("tpu", "unknown device 'tpu'")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device is available")]),
)
def test_unknown_or_missing_device(teacher_dir, good, tmp_path, capsys, device, fragment) -> None:
    argv = _write(teacher_dir, [good], tmp_path / "o")
    argv[argv.index("--device") + 1] = device
    _expect_error(capsys, argv, fragment)


def test_bad_numbers(teacher_dir, good, tmp_path, capsys) -> None:
    _expect_error(
        capsys,
        _write(teacher_dir, [good], tmp_path / "o", "--seq-len", "1"),
        "--seq-len must be at least 2",
    )
    _expect_error(
        capsys, _write(teacher_dir, [good], tmp_path / "o", "--seq-len", "500"), "reads at most 64"
    )
    _expect_error(capsys, _write(teacher_dir, [good], tmp_path / "o", "--k", "0"), "k >= 1")
    _expect_error(
        capsys, _write(teacher_dir, [good], tmp_path / "o", "--temperature", "0"), "temperature"
    )
    _expect_error(
        capsys,
        _write(teacher_dir, [good], tmp_path / "o", "--encoding", "sampled", "--samples", "0"),
        "samples",
    )
    _expect_error(
        capsys, _write(teacher_dir, [good], tmp_path / "o", "--batch-size", "0"), "--batch-size"
    )
    assert not (tmp_path / "o").exists()


def test_missing_teacher(tmp_path, good, capsys) -> None:
    _expect_error(
        capsys, _write(tmp_path / "no-such-model", [good], tmp_path / "o"), "cannot load teacher"
    )


def test_nan_logits_are_named_and_leave_an_incomplete_store(tmp_path: Path) -> None:
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, 16)
        out[ids == 5] = float("nan")
        return out

    teacher = logitstore.Teacher(fn=fn, vocab_size=16, device=torch.device("cpu"))
    ids = np.arange(40) % 7  # token 5 first appears at position 5
    seqs = logitstore.sequences_from_token_ids([ids], 10)
    with pytest.raises(logitstore.TeacherError, match="position 5 are NaN"):
        logitstore.capture(
            teacher, seqs, tmp_path / "s", Encoding("topk", "u8", k=4), progress=False
        )
    with pytest.raises(logitstore.IncompleteStoreError):
        logitstore.open(tmp_path / "s")


def test_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    seqs = logitstore.sequences_from_token_ids([[1, 2, 99]], 10)
    with pytest.raises(logitstore.InputError, match="token id 99 at position 2"):
        logitstore.StoreWriter(
            tmp_path / "s",
            encoding=Encoding("topk", "u8", k=2),
            vocab_size=16,
            input_ids=seqs.input_ids,
            offsets=seqs.offsets,
        )
    assert not (tmp_path / "s").exists()


def test_reading_bad_ranges(tmp_path: Path) -> None:
    with pytest.raises(logitstore.StoreNotFoundError):
        logitstore.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):  # the builtin is caught too
        logitstore.open(tmp_path / "missing")
