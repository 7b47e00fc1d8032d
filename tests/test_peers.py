"""axolotl and DistillKit datasets: export a store, import it back exactly, and refuse bad
peer files naming the row and column. The peers' own loaders run in benchmarks/peers_check.py
(a separate environment); here the schemas are checked with pyarrow and datasets only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import logitstore
from logitstore.cli.main import main
from logitstore.errors import InputError
from logitstore.format.peers import DATA_FILE, ZERO_LOGPROB
from logitstore.tools.peers import export_peer
from logitstore.write.peer_import import import_peer

V = 300


def _store(
    path: Path, *, values: str = "fp32", kind: str = "topk", temperature: float = 0.7
) -> Path:
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 12, 1, 20]
    n = sum(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    input_ids = torch.randint(0, V, (n,), generator=gen).numpy()
    mask = (np.arange(n) % 3 != 0).astype(np.uint8)
    enc = logitstore.Encoding(kind, values, temperature=temperature, k=8, samples=16)  # type: ignore[arg-type]
    logits = torch.randn(n, V, generator=gen) * 3
    with logitstore.StoreWriter(
        path,
        encoding=enc,
        vocab_size=V,
        input_ids=input_ids,
        offsets=offsets,
        loss_mask=mask,
        teacher={"name": "tiny"},
    ) as w:
        w.write(0, logitstore.encode_rows(logits, enc, 0, torch.arange(n)))
    return path


def _same_store(a: Path, b: Path, *, exact: bool = True) -> None:
    sa, sb = logitstore.open(a), logitstore.open(b)
    assert np.array_equal(sa.offsets, sb.offsets)
    ra, rb = sa.read(0, len(sa)), sb.read(0, len(sb))
    assert np.array_equal(ra.input_ids, rb.input_ids)
    assert np.array_equal(ra.loss_mask, rb.loss_mask)
    # the same candidate sets (stored ascending by id in both)
    assert np.array_equal(np.where(ra.probs > 0, ra.ids, -1), np.where(rb.probs > 0, rb.ids, -1))
    if exact:
        assert np.array_equal(ra.probs, rb.probs)
        assert np.array_equal(ra.residual, rb.residual)
    else:
        np.testing.assert_allclose(rb.probs, ra.probs, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("fmt", ["axolotl", "distillkit"])
def test_fp32_round_trip_is_bit_exact_with_float64_logprobs(tmp_path: Path, fmt: str) -> None:
    src = _store(tmp_path / "s.zarr")
    rep = export_peer(logitstore.open(src), fmt, tmp_path / "x", logprob_dtype="float64")
    assert rep.positions == 40 and rep.rows == 4
    assert any("residual" in w for w in rep.warnings)
    md = import_peer(tmp_path / "x", fmt, tmp_path / "back.zarr")
    assert md.encoding.temperature == 0.7 and md.vocab_size == V
    assert md.teacher["imported"]["residual"].startswith("exact")
    _same_store(src, tmp_path / "back.zarr")
    assert logitstore.verify(tmp_path / "back.zarr").ok


def test_float32_logprobs_round_trip_within_float32_steps(tmp_path: Path) -> None:
    src = _store(tmp_path / "s.zarr")
    export_peer(logitstore.open(src), "distillkit", tmp_path / "x")
    import_peer(tmp_path / "x", "distillkit", tmp_path / "back.zarr")
    _same_store(src, tmp_path / "back.zarr", exact=False)


def test_quantised_and_sampled_stores_export_their_decoded_values(tmp_path: Path) -> None:
    for kind, values in (("topk", "u8"), ("sampled", "fp32")):
        src = _store(tmp_path / f"{kind}.zarr", kind=kind, values=values)
        rep = export_peer(
            logitstore.open(src), "axolotl", tmp_path / f"x-{kind}", logprob_dtype="float64"
        )
        assert any(values in w or "sampled" in w for w in rep.warnings)
        import_peer(tmp_path / f"x-{kind}", "axolotl", tmp_path / f"b-{kind}.zarr")
        a = logitstore.open(src).read(0, 40)
        b = logitstore.open(tmp_path / f"b-{kind}.zarr").read(0, 40)
        assert np.array_equal(np.where(a.probs > 0, a.ids, -1), np.where(b.probs > 0, b.ids, -1))
        np.testing.assert_allclose(b.probs, a.probs, rtol=1e-6)


def test_the_schemas_are_what_the_peers_read(tmp_path: Path) -> None:
    """Column names and Arrow types of axolotl 0.21.0's and DistillKit a61c2e7's layouts."""
    import datasets

    src = _store(tmp_path / "s.zarr")
    export_peer(logitstore.open(src), "axolotl", tmp_path / "ax")
    export_peer(logitstore.open(src), "distillkit", tmp_path / "dk")
    ax = pq.read_schema(tmp_path / "ax" / DATA_FILE)
    assert ax.field("target_token_ids").type == pa.list_(pa.list_(pa.int64()))
    assert ax.field("logprobs").type == pa.list_(pa.list_(pa.float32()))
    # as DistillKit's HfRepoDataset loads it: the directory, whose JSON files must not count
    dk = datasets.load_dataset(str(tmp_path / "dk"), split="train")
    row = dk[1]
    assert set(row) >= {"input_ids", "labels", "token_ids", "top_values"}
    assert len(row["token_ids"]) == len(row["input_ids"]) == 12
    assert len(row["token_ids"][0]) == 8
    # most likely first; labels >= 0 exactly where the store's mask counts
    assert row["top_values"][0] == sorted(row["top_values"][0], reverse=True)
    mask = logitstore.open(src).read(7, 19).loss_mask
    assert [x >= 0 for x in row["labels"]] == mask.tolist()
    assert "d: 300" in (tmp_path / "dk" / "distillkit.yaml").read_text()
    side = json.loads((tmp_path / "dk" / "logitstore.json").read_text())
    assert side["vocab_size"] == V and side["temperature"] == 0.7


def test_the_cli_exports_imports_and_verifies(tmp_path: Path, capsys: Any) -> None:
    src = _store(tmp_path / "s.zarr")
    assert (
        main(
            [
                "export",
                str(src),
                "--format",
                "distillkit",
                "--out",
                str(tmp_path / "x"),
                "--logprob-dtype",
                "float64",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "WARNING: LOST: the residual" in err and "mean" in err
    assert (
        main(
            [
                "import",
                str(tmp_path / "x"),
                "--format",
                "distillkit",
                "--out",
                str(tmp_path / "b.zarr"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "verified" in capsys.readouterr().err
    _same_store(src, tmp_path / "b.zarr")
    # --jsonl keeps working
    assert main(["export", str(src), "--jsonl", "--ids", "--out", str(tmp_path / "t.jsonl")]) == 0


def _peer_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _good_row(n: int = 3, k: int = 2) -> dict[str, Any]:
    return {
        "input_ids": list(range(n)),
        "labels": list(range(n)),
        "token_ids": [[t, t + 1] for t in range(n)],
        "top_values": [[-0.5, -1.5] for _ in range(n)],
    }


def test_a_peer_file_without_a_residual_gets_a_derived_flagged_one(tmp_path: Path) -> None:
    f = _peer_file(tmp_path / "p.parquet", [_good_row(), _good_row(4)])
    md = import_peer(f, "distillkit", tmp_path / "s.zarr", vocab_size=10)
    assert "INEXACT" in md.teacher["imported"]["residual"]
    b = logitstore.open(tmp_path / "s.zarr").read(0, 7)
    expected = 1 - (np.exp(-0.5) + np.exp(-1.5))
    np.testing.assert_allclose(b.residual, expected, rtol=1e-6)
    assert logitstore.verify(tmp_path / "s.zarr").ok


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r.pop("top_values"), r"column\(s\) 'top_values' missing; found"),
        (
            lambda r: r["top_values"].__setitem__(1, [-0.5]),
            r"row 1, column 'top_values': position 1 has 1 value\(s\) for 2 id",
        ),
        (
            lambda r: r["token_ids"].__setitem__(2, [3, 10]),
            r"row 1, column 'token_ids': position 2, candidate 1: id 10 is outside",
        ),
        (
            lambda r: r["top_values"].__setitem__(0, [float("nan"), -1.0]),
            r"row 1, column 'top_values': position 0, candidate 0: log-probability nan",
        ),
        (
            lambda r: r["top_values"].__setitem__(0, [float("inf"), -1.0]),
            r"row 1, column 'top_values': position 0, candidate 0",
        ),
        (
            lambda r: r["token_ids"].__setitem__(0, [4, 4]),
            r"row 1, column 'token_ids': position 0: id 4 appears twice",
        ),
        (
            lambda r: r.__setitem__("input_ids", [1]),
            r"row 1, column 'token_ids': has 3 positions but 'input_ids' only 1",
        ),
    ],
)
def test_bad_peer_files_name_the_row_and_column(tmp_path: Path, change: Any, match: str) -> None:
    bad = _good_row()
    change(bad)
    rows = [_good_row(), bad] if "top_values" in bad else [bad]
    f = _peer_file(tmp_path / "p.parquet", rows)
    if "top_values" not in bad:
        match = match  # the whole file lacks the column
    with pytest.raises(InputError, match=match):
        import_peer(f, "distillkit", tmp_path / "s.zarr", vocab_size=10)
    assert not (tmp_path / "s.zarr").exists()  # nothing that looks like a store


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("input_ids", 10, r"row 1, column 'input_ids': position 1: token 10 is outside"),
        ("input_ids", -1, r"row 1, column 'input_ids': position 1: token -1 is outside"),
        ("logitstore_residual", float("nan"), r"row 1, column 'logitstore_residual': position 1"),
        ("logitstore_residual", -0.5, r"row 1, column 'logitstore_residual': position 1"),
        ("logitstore_residual", 3.0, r"row 1, column 'logitstore_residual': position 1"),
        (
            "logitstore_residual",
            0.05,
            r"position 1: residual 0.05 with probabilities summing to 0.829661;",
        ),
    ],
)
def test_bad_tokens_and_residuals_name_the_row_and_column(
    tmp_path: Path, column: str, value: float, match: str
) -> None:
    """Checked before anything is written, like the candidates (not left for verify to find
    in a written store)."""
    residual = float(1 - np.exp(np.float32(-0.5)) - np.exp(np.float32(-1.5)))  # completes to 1
    rows = [_good_row() | {"logitstore_residual": [residual] * 3} for _ in range(2)]
    rows[1][column][1] = value
    f = _peer_file(tmp_path / "p.parquet", rows)
    with pytest.raises(InputError, match=match):
        import_peer(f, "distillkit", tmp_path / "s.zarr", vocab_size=10)
    assert not (tmp_path / "s.zarr").exists()
    rows[1][column] = rows[0][column]  # the good file imports, its residual kept exactly
    import_peer(_peer_file(f, rows), "distillkit", tmp_path / "s.zarr", vocab_size=10)
    assert logitstore.verify(tmp_path / "s.zarr").ok
    assert "exact" in logitstore.open(tmp_path / "s.zarr").metadata.teacher["imported"]["residual"]


def test_import_needs_a_vocabulary_size_for_a_peer_file(tmp_path: Path) -> None:
    f = _peer_file(tmp_path / "p.parquet", [_good_row()])
    with pytest.raises(InputError, match="pass --vocab-size"):
        import_peer(f, "distillkit", tmp_path / "s.zarr")
    assert (
        main(
            [
                "import",
                str(f),
                "--format",
                "axolotl",
                "--out",
                str(tmp_path / "s.zarr"),
                "--vocab-size",
                "10",
            ]
        )
        == 2
    )  # axolotl's columns are not there


def test_axolotl_rows_align_with_the_last_tokens(tmp_path: Path) -> None:
    """axolotl pads missing leading rows: they become empty, masked positions."""
    row = {
        "input_ids": [5, 6, 7, 8],
        "target_token_ids": [[1, 2], [3, 4]],
        "logprobs": [[-0.1, -3.0], [-0.2, -2.0]],
    }
    f = _peer_file(tmp_path / "p.parquet", [row])
    import_peer(f, "axolotl", tmp_path / "s.zarr", vocab_size=10)
    b = logitstore.open(tmp_path / "s.zarr").read(0, 4)
    assert b.loss_mask.tolist() == [False, False, True, True]
    assert b.ids[2].tolist() == [1, 2] and b.residual[0] == 1.0
    assert ZERO_LOGPROB < -50


def test_a_saved_hugging_face_dataset_imports(tmp_path: Path) -> None:
    """DistillKit's LocalDataset form: a ``save_to_disk`` folder."""
    import datasets

    datasets.Dataset.from_list([_good_row(), _good_row(5)]).save_to_disk(tmp_path / "ds")
    md = import_peer(tmp_path / "ds", "distillkit", tmp_path / "s.zarr", vocab_size=10)
    assert md.num_positions == 8 and md.num_sequences == 2


def test_an_axolotl_file_of_conversations_is_tokenised_with_the_chat_template(
    tmp_path: Path,
) -> None:
    """axolotl's own datasets hold `messages`, not tokens: --tokenizer renders them as
    `logitstore write` does, and the rows align with the last tokens."""
    from logitstore.write.chat import ChatTemplate, load_tokenizer
    from tests.chatkit import CONVERSATIONS, make_chat_teacher

    teacher = make_chat_teacher(tmp_path / "teacher")
    chat = ChatTemplate(load_tokenizer(str(teacher)))
    conv = CONVERSATIONS[0]
    ids, learn = chat.encode(conv, "test")
    n = len(ids) - 2  # two leading positions without rows
    row = {
        "messages": conv,
        "target_token_ids": [[1, 2] for _ in range(n)],
        "logprobs": [[-0.1, -3.0] for _ in range(n)],
    }
    f = _peer_file(tmp_path / "p.parquet", [row])
    with pytest.raises(InputError, match="needs --tokenizer"):
        import_peer(f, "axolotl", tmp_path / "s.zarr", vocab_size=500)
    md = import_peer(f, "axolotl", tmp_path / "s.zarr", vocab_size=500, tokenizer=str(teacher))
    assert md.tokenizer is not None and "chat_template_hash" in md.tokenizer
    b = logitstore.open(tmp_path / "s.zarr").read(0, len(ids))
    assert b.input_ids.tolist() == ids.tolist()
    expected = np.zeros(len(ids), dtype=bool)
    expected[:-1] = learn[1:]
    expected[:2] = False  # no rows there
    assert b.loss_mask.tolist() == expected.tolist()
    assert b.residual[:2].tolist() == [1.0, 1.0] and b.ids[2].tolist() == [1, 2]


def test_distillkit_compressed_rows_are_refused_with_the_way_out(tmp_path: Path) -> None:
    row = {"input_ids": [1, 2], "compressed_logprobs": [[1, 2]], "bytepacked_indices": [[3]]}
    f = _peer_file(tmp_path / "p.parquet", [row])
    with pytest.raises(InputError, match="decompress_to_sparse"):
        import_peer(f, "distillkit", tmp_path / "s.zarr", vocab_size=10)


def test_export_axolotl_with_the_conversations(tmp_path: Path, capsys: Any) -> None:
    src = _store(tmp_path / "s.zarr")
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
             for i in range(4)]  # fmt: skip
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    args = ["export", str(src), "--format", "axolotl", "--out", str(tmp_path / "x"),
            "--no-progress"]  # fmt: skip
    assert main([*args, "--messages", str(data)]) == 0
    table = pq.read_table(tmp_path / "x" / DATA_FILE)
    assert table.column("messages").to_pylist()[2] == convs[2]
    assert "axolotl.yaml" in capsys.readouterr().err
    data.write_text(json.dumps({"messages": convs[0]}) + "\n")
    assert main([*args, "--overwrite", "--messages", str(data)]) == 2
    assert "holds 1 conversation(s), but the store has 4" in capsys.readouterr().err


def test_axolotl_legacy_rows_of_token_id_entries_import(tmp_path: Path) -> None:
    """load_legacy's layout: per position a list of {"token": "token_id:N", "logprob": x}."""

    def entry(i: int, lp: float) -> dict[str, Any]:
        return {"token": f"token_id:{i}", "logprob": lp}

    row = {
        "input_ids": [5, 6, 7],
        "logprobs": [[entry(1, -0.1), entry(2, -3.0)], [entry(3, -0.2), entry(4, -2.0)]],
    }
    f = _peer_file(tmp_path / "p.parquet", [row])
    import_peer(f, "axolotl", tmp_path / "s.zarr", vocab_size=10)
    b = logitstore.open(tmp_path / "s.zarr").read(0, 3)
    assert b.ids[1:].tolist() == [[1, 2], [3, 4]] and not b.loss_mask[0]
    np.testing.assert_allclose(b.probs[2], np.exp([-0.2, -2.0]), rtol=1e-6)
    row["logprobs"][1][0] = {"token": "hello", "logprob": -0.2}
    f = _peer_file(tmp_path / "q.parquet", [row])
    with pytest.raises(InputError, match="token_id:N"):
        import_peer(f, "axolotl", tmp_path / "t.zarr", vocab_size=10)


def test_overwrite_replaces_only_an_export(tmp_path: Path) -> None:
    src = logitstore.open(_store(tmp_path / "s.zarr"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(logitstore.StoreExistsError, match="not an export"):
        export_peer(src, "axolotl", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()
    export_peer(src, "axolotl", tmp_path / "x")
    with pytest.raises(logitstore.StoreExistsError, match="--overwrite"):
        export_peer(src, "axolotl", tmp_path / "x")
    export_peer(src, "distillkit", tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "distillkit.yaml").exists()
    assert not (tmp_path / "x" / "axolotl.yaml").exists()
