"""Golden stores of format v1, checked in: the reader must decode them to these exact values,
and today's writer must store the same integers. A failure here means the bytes changed:
that is a format change (docs/FORMAT.md change log and version), not a test to update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import logitstore
import logitstore.format.metadata
from logitstore.format.schema import column
from logitstore.format.storage import per_position_codecs

from .golden.make_golden import HERE, INPUT, MASK, STORES, TABLE, write

U8 = lambda c: ((c - 0.5) / 255) ** 2  # noqa: E731  FORMAT.md §5.2, written out independently


def test_topk_u8_decodes_to_hand_computed_values() -> None:
    store = logitstore.open(HERE / "topk-u8.zarr")
    assert len(store) == 9 and store.offsets.tolist() == [0, 5, 9]
    raw = {
        name: np.asarray(zarr.open_array(str(HERE / "topk-u8.zarr" / name))[:])
        for name in ("input_ids", "ids", "values", "residual")
    }
    assert raw["input_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 11, 1]
    # position 0 reads token 0: p = 1/2, 1/4, 1/8, 1/16 on ids 0..3, 1/16 outside.
    # u8 code = floor(sqrt(p) * 255) + 1: sqrt(1/2)*255 = 180.3 → 181; 127.5 → 128;
    # sqrt(1/8)*255 = 90.2 → 91; 63.75 → 64.
    assert raw["ids"][0].tolist() == [0, 1, 1, 1]
    assert raw["values"][0].tolist() == [181, 128, 91, 64]
    assert raw["residual"][0] == np.float32(0.0625)
    # position 1 reads token 1: ids 3, 7, 11 (gaps 3, 4, 4) and one padding slot.
    assert raw["ids"][1].tolist() == [3, 4, 4, 0]
    assert raw["values"][1].tolist() == [91, 91, 221, 0]
    assert raw["residual"][1] == 0
    # position 3 reads token 3: ids 4, 5, 8 with 1/2, 1/4, 1/4.
    assert raw["ids"][3].tolist() == [4, 1, 3, 0]
    assert raw["values"][3].tolist() == [181, 128, 128, 0]

    batch = store.read(0, 2)
    assert batch.ids.tolist() == [[0, 1, 2, 3], [3, 7, 11, 0]]
    expected0 = U8(np.array([181, 128, 91, 64]))
    expected0 *= (1 - 0.0625) / expected0.sum()
    np.testing.assert_allclose(batch.probs[0], expected0, rtol=1e-6)
    expected1 = U8(np.array([91, 91, 221]))
    np.testing.assert_allclose(batch.probs[1], [*(expected1 / expected1.sum()), 0], rtol=1e-6)


def test_topk_fp32_is_exact() -> None:
    batch = logitstore.open(HERE / "topk-fp32.zarr").read(0, 9)
    for row, token in enumerate(np.concatenate(INPUT)):
        p = TABLE[token]
        top = np.argsort(-p, kind="stable")[:4]
        real = p[top] > 0
        assert sorted(batch.ids[row][: real.sum()].tolist()) == sorted(top[real].tolist())
        np.testing.assert_allclose(batch.probs[row][: real.sum()], p[np.sort(top[real])], rtol=1e-6)
        np.testing.assert_allclose(batch.residual[row], 1 - p[top].sum(), atol=1e-7)


def test_sampled_counts_add_up_and_hit_only_possible_tokens() -> None:
    store = logitstore.open(HERE / "sampled-8.zarr")
    counts = np.asarray(zarr.open_array(str(HERE / "sampled-8.zarr" / "values"))[:])
    assert (counts.sum(1) == 8).all()
    batch = store.read(0, len(store))
    for row, token in enumerate(np.concatenate(INPUT)):
        hit = batch.probs[row] > 0
        assert (TABLE[token][batch.ids[row][hit]] > 0).all()


@pytest.mark.parametrize("name", list(STORES))
def test_the_writer_still_stores_the_same_integers(name: str, tmp_path: Path) -> None:
    # The golden stores were written as 1.0/1.1; today's writer writes 1.2 where an array's
    # codec chain changed (FORMAT.md §4, §10). The integers, and everything else in each
    # array's metadata, are the same; each store's chains are its version's table.
    fresh = write(name, tmp_path / name)
    golden = HERE / f"{name}.zarr"
    old_md, new_md = logitstore.open(golden).metadata, logitstore.open(fresh).metadata
    for array in ("input_ids", "ids", "values", "residual", "loss_mask", "offsets", "commits"):
        if not (golden / array).exists():
            assert not (fresh / array).exists()
            continue
        a = zarr.open_array(str(golden / array))
        b = zarr.open_array(str(fresh / array))
        col = column(old_md, array)
        if col is not None:
            for arr, md in ((a, old_md), (b, new_md)):
                inner = arr.metadata.codecs[0].codecs[1:]
                assert list(inner) == per_position_codecs(col, md.format_version), array
        a_meta, b_meta = a.metadata.to_dict(), b.metadata.to_dict()
        if col is not None:
            for meta in (a_meta, b_meta):
                meta["codecs"][0]["configuration"].pop("codecs")
        assert a_meta == b_meta, array
        np.testing.assert_array_equal(a[:], b[:], err_msg=array)
    old, new = old_md.to_dict(), new_md.to_dict()
    for volatile in ("created_at", "tool", "identity", "format_version"):
        old.pop(volatile), new.pop(volatile)
    assert old == new
    assert new_md.format_version == max(old_md.format_version, EXPECTED_VERSION[name])


#: the version today's writer records for each golden store: 1.2 where it has an ``ids``,
#: ``residual`` or 1-byte ``values`` array, else the lowest describing its features
EXPECTED_VERSION = {
    "topk-u8": "1.2",
    "topk-fp32": "1.2",
    "sampled-8": "1.2",
    "full-fp16": "1.0",
    "topk-u8-masked": "1.2",
    "tokens-masked": "1.1",
}


def test_the_writer_records_the_lowest_version_that_describes_the_store(tmp_path: Path) -> None:
    for name, version in EXPECTED_VERSION.items():  # today's writer, not the golden files
        md = logitstore.open(write(name, tmp_path / name)).metadata
        assert md.format_version == version, name
        if version != "1.1" and not name.endswith("-masked"):
            assert (md.extensions, md.generation) == ((), None), name
            assert "generation" not in md.to_dict()


def test_old_layout_stores_read_bit_identically_to_new_ones(tmp_path: Path) -> None:
    """The golden stores keep the 1.0/1.1 codec chains: read through today's reader they
    give exactly what the same store written today (1.2 chains) gives."""
    for name in STORES:
        golden = logitstore.open(HERE / f"{name}.zarr")
        fresh = logitstore.open(write(name, tmp_path / name))
        assert golden.metadata.format_version in ("1.0", "1.1"), name
        old, new = golden.read(0, len(golden)), fresh.read(0, len(fresh))
        for a, b in zip(old, new, strict=True):
            if a is None or b is None:
                assert a is b, name
            else:
                assert a.dtype == b.dtype, name
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_the_loss_mask_is_stored_and_read_as_written() -> None:
    path = HERE / "topk-u8-masked.zarr"
    store = logitstore.open(path)
    assert store.metadata.format_version == "1.1"
    assert store.metadata.extensions == ("loss_mask",)
    assert np.asarray(zarr.open_array(str(path / "loss_mask"))[:]).tolist() == MASK.tolist()
    batch = store.read(0, len(store))
    assert batch.loss_mask is not None and batch.loss_mask.tolist() == MASK.astype(bool).tolist()
    # the distributions are the unmasked store's, bit for bit
    plain = logitstore.open(HERE / "topk-u8.zarr").read(0, len(store))
    for a, b in zip(batch[:4], plain[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    assert store.metadata.identity != logitstore.open(HERE / "topk-u8.zarr").metadata.identity


def test_a_tokens_only_store_has_no_teacher_arrays() -> None:
    path = HERE / "tokens-masked.zarr"
    store = logitstore.open(path)
    assert set(store.metadata.extensions) == {"loss_mask", "tokens_only"}
    assert not any((path / a).exists() for a in ("ids", "values", "residual"))
    batch = store.read(2, 9)
    assert batch.input_ids.tolist() == [2, 3, 4, 5, 0, 11, 1]
    assert batch.ids.shape == (7, 0) and batch.probs.shape == (7, 0)
    assert (
        batch.loss_mask is not None and batch.loss_mask.tolist() == MASK[2:].astype(bool).tolist()
    )
    assert logitstore.verify(path).ok


@pytest.mark.parametrize("name", ["topk-u8-masked", "tokens-masked"])
def test_a_1_0_reader_refuses_1_1_stores_by_their_extensions(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a reader of format 1.0 does: it implements no extension (FORMAT.md §3).
    monkeypatch.setattr(logitstore.format.metadata, "_EXTENSIONS_UNDERSTOOD", frozenset())
    with pytest.raises(logitstore.UnsupportedVersionError, match="requires extensions"):
        logitstore.open(HERE / f"{name}.zarr")
