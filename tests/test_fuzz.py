"""Fuzzing the defensive open (issue 17): mutated ``zarr.json`` files and shard indexes
give only ``LogitStoreError`` subclasses — from open, read, the Dataset, ``info``,
``verify`` and ``serve`` — within bounded memory (traced peak) and time (a deadline per
example, so a hang fails). Examples are few and the store tiny, to keep this fast."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import logitstore
from logitstore.cli import main

GOLDEN = Path(__file__).parent / "golden" / "v1"
SOURCES = ["topk-u8-masked.zarr", "sampled-8.zarr", "full-fp16.zarr"]
META = ("attributes", "logitstore")
LAYOUT = (*META, "layout")
#: the most memory one example may trace: the stores are a few KiB
PEAK_BYTES = 64 << 20

NASTY: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    7,
    2**31,
    2**63,
    10**30,
    -(10**12),
    1.5,
    4.0,
    8.0,
    [3, 1],
    [9, 4],
    "little",
    float("1e300"),
    "",
    "uint16",
    "big",
    "x" * 300,
    [],
    [1, 2],
    [[1]],
    {},
    {"name": "bytes"},
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document a value can be replaced."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def damaged_store(draw: st.DrawFn) -> tuple[str, list[tuple[str, Any]]]:
    """A source store and a list of mutations to apply to a copy of it."""
    source = draw(st.sampled_from(SOURCES))
    root = GOLDEN / source
    json_files = sorted(str(p.relative_to(root)) for p in root.rglob("zarr.json"))
    shard_files = sorted(
        str(p.relative_to(root))
        for name in ("input_ids", "ids", "values", "residual", "loss_mask")
        for p in (root / name / "c").rglob("*")
        if p.is_file()
    )
    edits: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()) or not shard_files:
            # Half the edits go to the group's metadata, where most of the meaning is.
            name = "zarr.json" if draw(st.booleans()) else draw(st.sampled_from(json_files))
            doc = json.loads((root / name).read_text())
            places = list(_paths(doc))
            if name == "zarr.json" and draw(st.booleans()):  # the keys a reader sizes by
                informative = ("teacher", "tokenizer", "tool", "generation", "created_at")
                places = [
                    p
                    for p in places
                    if p[:2] == ("attributes", "logitstore")
                    and not (len(p) > 2 and p[2] in informative)
                ]
            where = draw(st.sampled_from(places))
            edits.append(("json", (name, where, draw(st.sampled_from(NASTY)), draw(st.booleans()))))
        else:
            name = draw(st.sampled_from(shard_files))
            entry = draw(st.integers(0, 3))
            word = draw(st.sampled_from([0, 1, 3, 2**32, 2**63, 2**64 - 1]))
            which = draw(st.integers(0, 1))
            edits.append(("index", (name, entry, which, word, draw(st.booleans()))))
    return source, edits


def _apply(source: str, edits: list[tuple[str, Any]], into: Path) -> Path:
    store = Path(shutil.copytree(GOLDEN / source, into / "s.zarr"))
    for kind, args in edits:
        if kind == "json":
            name, where, value, delete = args
            path = store / name
            doc = json.loads(path.read_text())
            try:
                doc = _set(doc, tuple(where), value, delete)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit removed this place
            path.write_text(json.dumps(doc))
        else:
            name, entry, which, word, fix_crc = args
            path = store / name
            data = bytearray(path.read_bytes())
            per = _index_entries(GOLDEN / source, name.split("/")[0])
            start = len(data) - 4 - 16 * per  # the index: per (offset, nbytes) pairs, CRC
            at = start + 16 * (entry % per) + 8 * which
            if start < 0:
                continue
            data[at : at + 8] = struct.pack("<Q", word)
            if fix_crc:  # a valid checksum: only the reader's own checks can catch it
                data[-4:] = struct.pack("<I", crc32c.crc32c(bytes(data[start:-4])))
            path.write_bytes(bytes(data))
    return store


def _index_entries(source: Path, array: str) -> int:
    """Inner chunks per shard of ``array`` in the unmutated source store."""
    doc = json.loads((source / array / "zarr.json").read_text())
    shard = doc["chunk_grid"]["configuration"]["chunk_shape"][0]
    inner = doc["codecs"][0]["configuration"]["chunk_shape"][0]
    return int(shard) // int(inner)


def _exercise(store: Path) -> None:
    """Everything a user does with a store; only LogitStoreError may come out."""
    from logitstore.read.dataset import LogitDataset

    try:
        s = logitstore.open(store)
        s.read(0, len(s))
        for i in range(s.num_sequences):
            s.sequence(i)
    except logitstore.LogitStoreError:
        pass
    try:
        ds = LogitDataset(store, seq_len=4, shuffle=False)
        for _, _item in zip(range(4), iter(ds), strict=False):
            pass
    except logitstore.LogitStoreError:
        pass
    with contextlib.suppress(logitstore.LogitStoreError):
        logitstore.store_info(logitstore.open(store))
    assert main(["info", str(store)]) in (0, 1, 2)
    report = logitstore.verify(store)  # never raises
    assert isinstance(report.ok, bool)


@pytest.fixture(scope="module", autouse=True)
def _traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


@settings(
    max_examples=40,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@example(("topk-u8-masked.zarr", [("json", ("zarr.json", (*LAYOUT, "shard_positions"), 8.0, 0))]))
@example(("topk-u8-masked.zarr", [("json", ("zarr.json", (*META, "extensions"), [[1]], 0))]))
@example(("topk-u8-masked.zarr", [("json", ("offsets/zarr.json", ("shape",), [3, 1], 0))]))
@example(("sampled-8.zarr", [("index", ("ids/c/0/0", 0, 0, 2**64 - 1, True))]))
@given(damaged_store())
def test_mutated_stores_raise_only_logitstore_errors(case: tuple[str, list[Any]]) -> None:
    source, edits = case
    with tempfile.TemporaryDirectory() as tmp:
        store = _apply(source, edits, Path(tmp))
        tracemalloc.reset_peak()
        _exercise(store)
        peak = tracemalloc.get_traced_memory()[1]
    assert peak < PEAK_BYTES, f"{peak >> 20} MiB traced for {edits}"


@settings(
    max_examples=8,
    deadline=15000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(damaged_store())
def test_serving_mutated_stores_answers_json_or_refuses_to_start(
    case: tuple[str, list[Any]],
) -> None:
    from tests.test_hardening_server import in_process

    source, edits = case
    with tempfile.TemporaryDirectory() as tmp:
        store = _apply(source, edits, Path(tmp))
        try:
            server = in_process(store)
            port = server.__enter__()
        except logitstore.LogitStoreError:
            return  # serve refused the store with the reader's error
        try:
            base = f"http://127.0.0.1:{port}/v1/stores/s.zarr"
            for path in ("", "/offsets", "/positions?start=0&stop=9", "/sequences/0"):
                try:
                    with urllib.request.urlopen(base + path, timeout=10) as r:
                        r.read()
                except urllib.error.HTTPError as e:
                    body = json.loads(e.read())
                    assert e.code < 500 or body["error"]["code"] == "store_error", body
            try:
                remote = logitstore.open(base)
                remote.read(0, len(remote))
            except logitstore.LogitStoreError:
                pass
        finally:
            server.__exit__(None, None, None)
