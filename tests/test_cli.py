"""The command line, end to end: write → info → verify → show, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import logitstore
from logitstore.cli import main


def test_write_info_verify_show(teacher_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    argv = [
        "write",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data_file),
        "--out",
        str(out),
        "--k",
        "16",
        "--seq-len",
        "48",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "sequence(s)" in err and "wrote" in err

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    store = logitstore.open(out)
    assert info["state"] == "complete"
    assert info["num_positions"] == len(store) and info["num_sequences"] == store.num_sequences
    assert info["encoding"] == {
        "kind": "topk",
        "values": "u8",
        "temperature": 1.0,
        "k": 16,
        "samples": None,
    }
    assert info["tokenizer"]["vocab_hash"].startswith("sha256:")
    assert info["teacher"]["architecture"] == "GPT2LMHeadModel"
    assert info["bytes_per_position"] == info["bytes_on_disk"] / len(store)
    assert info["compression_ratio_vs_full_bf16"] > 1

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-16, values u8" in text and "B/position" in text

    assert main(["verify", str(out), "--no-progress"]) == 0
    capsys.readouterr()

    pos = int(store.offsets[1]) + 5
    assert main(["show", str(out), "--position", str(pos), "--top", "5"]) == 0
    shown = capsys.readouterr().out
    assert f"position {pos} = sequence 1, token 5" in shown
    assert "next token in the data" in shown and "residual" in shown
    batch = store.read(pos, pos + 1)
    best = int(batch.ids[0, np.argmax(batch.probs[0])])
    assert f"id {best:>6}" in shown  # the teacher's favourite is listed


def test_show_rejects_positions_outside_the_store(teacher_dir, data_file, tmp_path, capsys):
    out = tmp_path / "s"
    assert (
        main(
            [
                "write",
                "--teacher",
                str(teacher_dir),
                "--data",
                str(data_file),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["show", str(out), "--position", "999999"]) == 2
    assert "outside" in capsys.readouterr().err


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("logitstore")
    for cmd in ([], ["write"], ["info"], ["verify"], ["show"]):
        res = subprocess.run([str(exe), *cmd, "--help"], capture_output=True, text=True, check=True)
        assert "usage: logitstore" in res.stdout
    res = subprocess.run([str(exe), "write", "--help"], capture_output=True, text=True)
    assert "resumes" in res.stdout and "--encoding" in res.stdout


def _small_store(out: Path) -> None:
    enc = logitstore.Encoding("topk", "u8", k=4)
    ids = np.arange(64) % 50
    with logitstore.StoreWriter(
        out, encoding=enc, vocab_size=50, input_ids=ids, offsets=np.array([0, 30, 64])
    ) as w:
        import torch

        logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
        w.write(0, logitstore.encode_rows(logits, enc, 0, torch.arange(64)))


def test_exit_status_1_is_a_fault_in_the_store_2_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.zarr"
    _small_store(out)
    assert main(["show", str(out), "--position", "3"]) == 0
    shards = [p for p in (out / "values").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shards
    for p in shards:  # damaged: the checksums no longer match
        p.write_bytes(b"\xff" * p.stat().st_size)
    capsys.readouterr()
    assert main(["show", str(out), "--position", "3"]) == 1
    err = capsys.readouterr().err
    assert "values" in err and "Traceback" not in err
    assert main(["verify", str(out)]) == 1
    capsys.readouterr()
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2  # a wrong path is bad input
    assert "nope.zarr" in capsys.readouterr().err
