"""The same teacher distributions written in the layouts other tools store them in, and read
back into torch tensors: what benchmarks/peers.py measures beside logitstore's own store.

Every layout writes from the teacher's logits, ``(c, V)`` float32 chunks in position order
(what each tool starts from: its own top-k over the teacher's output), and reads back into
torch tensors a loss can take: ids int64 ``(c, k)``, values float32 ``(c, k)`` (probabilities
or log-probabilities, as the layout stores them) and the residual ``(c,)`` where one is
stored. The peers' layouts, from their own sources (docs/PEERS.md):

- **axolotl** (0.21.0, ``integrations/kd/chat_template.py``; what ``logitstore export
  --format axolotl`` writes): Parquet, one row per sequence, ``target_token_ids``
  list<list<int64>> and ``logprobs`` list<list<float32>>, most likely first, zstd.
  ``axolotl int32`` is the same with int32 ids.
- **DistillKit raw rows** (a61c2e7, ``compression/compressor.py`` passes ``token_ids`` /
  ``top_values`` rows through; what ``logitstore export --format distillkit`` writes):
  the same with DistillKit's column names and ``labels``.
- **Megatron-LM offline KD** (NVIDIA/Megatron-LM, ``megatron/training/distillation/
  logits_saver.py``, added by PR #5019, read by ``cached_logits_loss.py``): per training
  iteration one ``torch.save`` of ``{'values': [fp16 (S, B, k) log-probs], 'indices_low':
  [uint16 (S, B, k)], 'bit_17': [bool (S, B, k)]}`` (one entry per micro-batch; ids split
  into their low 16 bits and a 17th bit), compressed with ``zstandard`` at level 3, one tar
  member ``{iteration}.pt.zst`` each after a ``_meta.json`` member. Rebuilt here with
  S = 256, B = 8 (2,048 positions per iteration, one micro-batch).
- **naive**: int32 ids + fp16 log-probs as raw ``.npy``, and the same in a compressed
  ``.npz``.
- **raw .npy** (the read-speed baseline): int32 ids, fp32 probabilities, fp32 residual.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import logitstore
from logitstore import Encoding, encode_rows

__all__ = ["LAYOUTS", "Decoded", "Layout", "RunInfo", "topk_logprobs"]

#: positions per Parquet row group (as ``logitstore export`` writes them)
_GROUP = 1 << 16
#: Megatron rebuild: sequence length × micro-batch of one training iteration
_MEGATRON_S, _MEGATRON_B = 256, 8


@dataclass(frozen=True)
class RunInfo:
    """What every layout needs beside the logits: the top-k width, the vocabulary, and the
    sequences (``offsets`` into the concatenated ``input_ids``)."""

    k: int
    vocab: int
    input_ids: np.ndarray  # (N,)
    offsets: np.ndarray  # (S + 1,)


@dataclass(frozen=True)
class Decoded:
    """One chunk read back: ids int64 ``(c, k)``, values float32 ``(c, k)``, residual
    ``(c,)`` or None; ``logprobs`` says what the values are."""

    ids: torch.Tensor
    values: torch.Tensor
    residual: torch.Tensor | None
    logprobs: bool

    def probs(self) -> torch.Tensor:
        """The values as float64 probabilities."""
        v = self.values.double()
        return v.exp() if self.logprobs else v


Writer = Callable[[Iterable[torch.Tensor], RunInfo, Path], None]
Reader = Callable[[Path, RunInfo], list[Decoded]]


@dataclass(frozen=True)
class Layout:
    name: str
    stores: str  # what is on disk, in a few words
    target: str  # the training target a student of this tool gets (peer_targets)
    write: Writer
    read: Reader
    teacher_bytes: Callable[[Path], int]  # bytes of the per-position teacher data


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely ids, most likely first, and their fp32 log-probabilities:
    ``(c, k)`` int64 and float32 from ``(c, V)`` logits (every peer's capture step)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (c, V)
    values, ids = torch.topk(logp, k, dim=-1)  # (c, k) most likely first
    return ids, values


def _files_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- logitstore ------------------------------------------------------------------------


def _write_store(values: Any) -> Writer:  # an Encoding value type: "u8", ...
    def write(chunks: Iterable[torch.Tensor], info: RunInfo, path: Path) -> None:
        enc = Encoding("topk", values, k=info.k)
        with logitstore.StoreWriter(
            path / "store",
            encoding=enc,
            vocab_size=info.vocab,
            input_ids=info.input_ids,
            offsets=info.offsets,
        ) as w:
            start = 0
            for logits in chunks:
                n = len(logits)
                w.write(start, encode_rows(logits, enc, 0, torch.arange(start, start + n)))
                start += n

    return write


def _read_store(path: Path, info: RunInfo, chunk: int = 8192) -> list[Decoded]:
    store = logitstore.open(path / "store")
    out = []
    for a in range(0, len(store), chunk):
        b = store.read(a, min(a + chunk, len(store)))
        out.append(
            Decoded(
                torch.from_numpy(b.ids),
                torch.from_numpy(b.probs),
                torch.from_numpy(b.residual),
                False,
            )
        )
    return out


def _store_bytes(path: Path) -> int:
    from benchlib.stores import teacher_bytes

    return teacher_bytes(path / "store")


# -- raw .npy and naive layouts ----------------------------------------------------------


def _write_npy(chunks: Iterable[torch.Tensor], info: RunInfo, path: Path) -> None:
    ids, probs, res = [], [], []
    for logits in chunks:
        i, lp = topk_logprobs(logits, info.k)
        full = torch.log_softmax(logits.float(), -1).exp()  # (c, V) for the exact tail
        ids.append(i.to(torch.int32).numpy())
        probs.append(lp.exp().numpy())
        res.append(full.scatter_(-1, i, 0.0).sum(-1).numpy())
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "ids.npy", np.concatenate(ids))
    np.save(path / "probs.npy", np.concatenate(probs))
    np.save(path / "residual.npy", np.concatenate(res))


def _read_npy(path: Path, info: RunInfo, chunk: int = 8192) -> list[Decoded]:
    ids, probs, res = (np.load(path / f"{n}.npy") for n in ("ids", "probs", "residual"))
    return [
        Decoded(
            torch.from_numpy(ids[a : a + chunk].astype(np.int64)),
            torch.from_numpy(probs[a : a + chunk]),
            torch.from_numpy(res[a : a + chunk]),
            False,
        )
        for a in range(0, len(ids), chunk)
    ]


def _naive_arrays(chunks: Iterable[torch.Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, logp = [], []
    for logits in chunks:
        i, lp = topk_logprobs(logits, k)
        ids.append(i.to(torch.int32).numpy())
        logp.append(lp.to(torch.float16).numpy())
    return np.concatenate(ids), np.concatenate(logp)


def _write_naive(chunks: Iterable[torch.Tensor], info: RunInfo, path: Path) -> None:
    ids, logp = _naive_arrays(chunks, info.k)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "ids.npy", ids)
    np.save(path / "logprobs.npy", logp)


def _write_npz(chunks: Iterable[torch.Tensor], info: RunInfo, path: Path) -> None:
    ids, logp = _naive_arrays(chunks, info.k)
    path.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path / "topk.npz", ids=ids, logprobs=logp)


def _decoded_naive(ids: np.ndarray, logp: np.ndarray, chunk: int = 8192) -> list[Decoded]:
    return [
        Decoded(
            torch.from_numpy(ids[a : a + chunk].astype(np.int64)),
            torch.from_numpy(logp[a : a + chunk].astype(np.float32)),
            None,
            True,
        )
        for a in range(0, len(ids), chunk)
    ]


def _read_naive(path: Path, info: RunInfo) -> list[Decoded]:
    return _decoded_naive(np.load(path / "ids.npy"), np.load(path / "logprobs.npy"))


def _read_npz(path: Path, info: RunInfo) -> list[Decoded]:
    with np.load(path / "topk.npz") as z:
        return _decoded_naive(z["ids"], z["logprobs"])


# -- Parquet rows (axolotl, DistillKit) ------------------------------------------------


def _parquet_writer(ids_col: str, values_col: str, id_type: Any, labels: bool) -> Writer:
    def write(chunks: Iterable[torch.Tensor], info: RunInfo, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.mkdir(parents=True, exist_ok=True)
        ids_all, logp_all = [], []
        for logits in chunks:
            i, lp = topk_logprobs(logits, info.k)
            ids_all.append(i.numpy().astype(id_type))
            logp_all.append(lp.numpy())
        ids, logp = np.concatenate(ids_all), np.concatenate(logp_all)
        off, k = info.offsets, info.k
        writer = None
        s = 0
        while s < len(off) - 1:  # row groups of whole sequences, as `logitstore export`
            e = max(int(np.searchsorted(off, off[s] + _GROUP, "right")) - 1, s + 1)
            e = min(e, len(off) - 1)
            a, b = int(off[s]), int(off[e])
            outer = pa.array((off[s : e + 1] - a).astype(np.int32))
            inner = pa.array(np.arange(0, (b - a + 1) * k, k, dtype=np.int32))
            cols = {"input_ids": pa.ListArray.from_arrays(outer, info.input_ids[a:b])}
            if labels:
                cols["labels"] = pa.ListArray.from_arrays(outer, info.input_ids[a:b])
            for name, arr in ((ids_col, ids[a:b]), (values_col, logp[a:b])):
                cols[name] = pa.ListArray.from_arrays(
                    outer, pa.ListArray.from_arrays(inner, arr.reshape(-1))
                )
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(path / "train.parquet", table.schema, compression="zstd")
            writer.write_table(table)
            s = e
        assert writer is not None
        writer.close()

    return write


def _parquet_reader(ids_col: str, values_col: str) -> Reader:
    def read(path: Path, info: RunInfo) -> list[Decoded]:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path / "train.parquet")
        out = []
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=[ids_col, values_col])
            ids = t.column(ids_col).combine_chunks().flatten().flatten().to_numpy()
            val = t.column(values_col).combine_chunks().flatten().flatten().to_numpy()
            with warnings.catch_warnings():
                # Arrow's buffers are read-only; a loss only reads them, so none is copied.
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                values = torch.from_numpy(val.reshape(-1, info.k))
            out.append(
                Decoded(
                    torch.from_numpy(ids.astype(np.int64).reshape(-1, info.k)),
                    values,
                    None,
                    True,
                )
            )
        return out

    return read


def _parquet_bytes(*columns: str) -> Callable[[Path], int]:
    """The compressed bytes of ``columns``' column chunks (the file's footer says them)."""

    def size(path: Path) -> int:
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path / "train.parquet").metadata
        total = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in columns:
                    total += col.total_compressed_size
        return total

    return size


# -- Megatron-LM offline KD --------------------------------------------------------------


def _write_megatron(chunks: Iterable[torch.Tensor], info: RunInfo, path: Path) -> None:
    import zstandard

    path.mkdir(parents=True, exist_ok=True)
    per_iter = _MEGATRON_S * _MEGATRON_B
    ids_all, logp_all = [], []
    for logits in chunks:
        i, lp = topk_logprobs(logits, info.k)
        ids_all.append(i)
        logp_all.append(lp)
    ids, logp = torch.cat(ids_all), torch.cat(logp_all)
    meta = json.dumps({"saver": {"k": info.k, "p": None, "min_k": 1, "save_dtype": "fp16"}})
    zc = zstandard.ZstdCompressor(level=3)
    with tarfile.open(path / "logits_cp0_dp0.tar", "w") as tar:
        _add_member(tar, "_meta.json", meta.encode())
        for it, a in enumerate(range(0, len(ids), per_iter)):
            i, lp = ids[a : a + per_iter], logp[a : a + per_iter]
            b = _MEGATRON_B if len(i) == per_iter else 1
            i = i.reshape(b, -1, info.k).transpose(0, 1)  # (S, B, k): Megatron's order
            lp = lp.reshape(b, -1, info.k).transpose(0, 1)
            buf = io.BytesIO()
            torch.save(
                {
                    "values": [lp.to(torch.float16).contiguous()],
                    "indices_low": [(i & 0xFFFF).to(torch.uint16).contiguous()],
                    "bit_17": [(i >> 16).to(torch.bool).contiguous()],
                },
                buf,
            )
            _add_member(tar, f"{it}.pt.zst", zc.compress(buf.getvalue()))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def _read_megatron(path: Path, info: RunInfo) -> list[Decoded]:
    import zstandard

    zd = zstandard.ZstdDecompressor()
    out = []
    with tarfile.open(path / "logits_cp0_dp0.tar", "r") as tar:
        for member in tar:
            if not member.name.endswith(".pt.zst"):
                continue
            f = tar.extractfile(member)
            assert f is not None
            d = torch.load(io.BytesIO(zd.decompress(f.read())), weights_only=True)
            for v, lo, hi in zip(d["values"], d["indices_low"], d["bit_17"], strict=True):
                ids = (hi.long() << 16) | lo.long()  # (S, B, k), as unpack_indices
                out.append(
                    Decoded(
                        ids.transpose(0, 1).reshape(-1, info.k),
                        v.float().transpose(0, 1).reshape(-1, info.k),
                        None,
                        True,
                    )
                )
    return out


LAYOUTS: list[Layout] = [
    Layout(
        "raw .npy (baseline)",
        "int32 ids, fp32 probs, fp32 residual",
        "exact residual (logitstore)",
        _write_npy,
        _read_npy,
        _files_bytes,
    ),
    Layout(
        "logitstore topk u8",
        "Zarr v3, u8 values, id gaps, exact residual",
        "exact residual (logitstore)",
        _write_store("u8"),
        _read_store,
        _store_bytes,
    ),
    Layout(
        "axolotl Parquet",
        "int64 ids + fp32 log-probs, zstd",
        "renormalised top-k (axolotl; DistillKit default)",
        _parquet_writer("target_token_ids", "logprobs", np.int64, labels=False),
        _parquet_reader("target_token_ids", "logprobs"),
        _parquet_bytes("target_token_ids", "logprobs"),
    ),
    Layout(
        "axolotl Parquet, int32 ids",
        "int32 ids + fp32 log-probs, zstd",
        "renormalised top-k (axolotl; DistillKit default)",
        _parquet_writer("target_token_ids", "logprobs", np.int32, labels=False),
        _parquet_reader("target_token_ids", "logprobs"),
        _parquet_bytes("target_token_ids", "logprobs"),
    ),
    Layout(
        "DistillKit raw rows",
        "int64 ids + fp32 log-probs, zstd",
        "renormalised top-k (axolotl; DistillKit default)",
        _parquet_writer("token_ids", "top_values", np.int64, labels=True),
        _parquet_reader("token_ids", "top_values"),
        _parquet_bytes("token_ids", "top_values"),
    ),
    Layout(
        "Megatron-LM offline KD",
        "fp16 log-probs + u16 ids + bool bit 17, torch.save, zstd 3, tar",
        "derived residual (Megatron ghost token; DistillKit symmetric_uniform)",
        _write_megatron,
        _read_megatron,
        _files_bytes,
    ),
    Layout(
        "naive int32 + fp16 .npy",
        "int32 ids + fp16 log-probs, uncompressed",
        "derived residual (Megatron ghost token; DistillKit symmetric_uniform)",
        _write_naive,
        _read_naive,
        _files_bytes,
    ),
    Layout(
        "naive int32 + fp16 .npz",
        "int32 ids + fp16 log-probs, np.savez_compressed",
        "derived residual (Megatron ghost token; DistillKit symmetric_uniform)",
        _write_npz,
        _read_npz,
        _files_bytes,
    ),
]
