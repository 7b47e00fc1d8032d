"""The streaming wire format for position ranges (docs/PROTOCOL.md): framing for the server,
parsing and verification for the client. Rows travel exactly as stored (FORMAT.md §5), and
the client decodes them with the same code as a local reader, so both give the same bits.

    stream = header block* end
    header = b"LGSTRM01" | u32 json_len | json           (start, stop, dtypes, identity)
    block  = b"BLK0" | u64 start | u32 n | u32 payload_len | payload | u32 crc32c(payload)
    end    = b"END0" | u64 stop | u64 positions_sent
    error  = b"ERR0" | u32 json_len | json                (in place of a block or the end)

All integers little-endian. ``payload`` is input_ids ‖ gaps ‖ values ‖ residual ‖ loss_mask
(gaps, residual and loss_mask as present in the store) for ``n`` rows.

:data:`ERROR_TYPES` names the exception a client raises for each JSON error code a server
sends (PROTOCOL.md §4).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any, NoReturn

import crc32c
import numpy as np

from ..errors import (
    CorruptStoreError,
    LogitStoreError,
    PositionError,
    ProtocolError,
    RemoteError,
    StoreNotFoundError,
    StreamMismatchError,
)
from .metadata import StoreMetadata
from .schema import IDS, LOSS_MASK, RESIDUAL, Column, StoredRows, columns, rows_from_columns

__all__ = [
    "ERROR_TYPES",
    "MAGIC",
    "ProtocolError",
    "StreamMismatchError",
    "StreamParser",
    "encode_block",
    "encode_end",
    "encode_error",
    "encode_header",
    "read_error_record",
    "read_header",
]

MAGIC = b"LGSTRM01"
_BLOCK = struct.Struct("<4sQII")  # tag, start, n, payload_len
_END = struct.Struct("<4sQQ")  # tag, stop, positions_sent
_CRC = struct.Struct("<I")

#: JSON error code (PROTOCOL.md §4) → the exception a client raises for it. An answer with a
#: known code is final: retrying gets the same answer (even ``store_error``, a 500: the store
#: on the server's disk is damaged). Other 5xx, refused connections and cut streams are retried.
ERROR_TYPES: dict[str, type[LogitStoreError]] = {
    "unknown_store": StoreNotFoundError,
    "no_such_key": StoreNotFoundError,
    "no_tokenizer": StoreNotFoundError,
    "unknown_sequence": StoreNotFoundError,
    "not_found": StoreNotFoundError,
    "bad_range": PositionError,
    "range_not_satisfiable": PositionError,
    "range_too_large": PositionError,
    "unauthorized": RemoteError,
    "forbidden": RemoteError,
    "bad_request": RemoteError,
    "bad_key": RemoteError,
    "bad_range_header": RemoteError,
    "method_not_allowed": RemoteError,
    "headers_too_large": RemoteError,
    "body_too_large": RemoteError,
    "store_error": CorruptStoreError,
}


def _header_fields(md: StoreMetadata, start: int, stop: int) -> dict[str, Any]:
    """What a stream's header says: the request, and the store's columns (PROTOCOL.md §2)."""
    names = {c.name for c in columns(md)}
    return {
        "start": start,
        "stop": stop,
        "identity": md.identity,
        "width": md.layout.width,
        "id_dtype": md.layout.id_dtype,
        "value_dtype": md.layout.value_dtype,
        "has_gaps": IDS in names,
        "has_residual": RESIDUAL in names,
        "has_loss_mask": LOSS_MASK in names,
    }


def encode_header(
    md: StoreMetadata,
    start: int,
    stop: int,
    *,
    magic: bytes = MAGIC,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A stream's opening: ``magic``, the header's length, and its JSON (the request and
    store fields, plus ``extra`` — the compressed stream's ``columns``)."""
    fields = _header_fields(md, start, stop) | (extra or {})
    body = json.dumps(fields, separators=(",", ":")).encode()
    return magic + struct.pack("<I", len(body)) + body


def encode_block(start: int, rows: StoredRows) -> bytes:
    parts = [np.ascontiguousarray(a).tobytes() for a in rows if a is not None]
    payload = b"".join(parts)
    n = len(rows.input_ids)
    return b"".join(
        [_BLOCK.pack(b"BLK0", start, n, len(payload)), payload, _CRC.pack(crc32c.crc32c(payload))]
    )


def encode_end(stop: int, sent: int) -> bytes:
    return _END.pack(b"END0", stop, sent)


def encode_error(code: str, message: str) -> bytes:
    """A failure after the stream's headers went out (PROTOCOL.md §2): a code of §4."""
    body = json.dumps({"error": {"code": code, "message": message[:4096]}}).encode()
    return b"ERR0" + struct.pack("<I", len(body)) + body


def read_header(
    read_exactly: Callable[[int], bytes],
    magic: bytes,
    what: str,
    md: StoreMetadata,
    start: int,
    stop: int,
) -> dict[str, Any]:
    """A stream's opening (PROTOCOL.md §2 and §2.1): ``magic``, a length and a JSON header,
    checked against the request and the store. Both streams' parsers start with it.

    Raises:
        ProtocolError: another magic, an implausible length, a header that is no JSON object.
        StreamMismatchError: a header for another request or store.
    """
    found = read_exactly(len(magic))
    if found != magic:
        raise ProtocolError(f"not a logitstore {what}: starts with {found[:8]!r}")
    (size,) = struct.unpack("<I", read_exactly(4))
    if size > 1 << 16:
        raise ProtocolError(f"stream header of {size} bytes is implausibly large")
    try:
        info: Any = json.loads(read_exactly(size))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"stream header is not JSON: {e}") from None
    if not isinstance(info, dict):
        raise ProtocolError(f"{what} header is not a JSON object")
    # A server older than format 1.1 sends no has_loss_mask: it serves no masked store.
    info.setdefault("has_loss_mask", False)
    want = _header_fields(md, start, stop)
    wrong = {k: (info.get(k), v) for k, v in want.items() if info.get(k) != v}
    if wrong:
        raise StreamMismatchError(
            f"stream header does not match the request and store (found, expected): {wrong}"
        )
    return info


class StreamParser:
    """Reads one stream through ``read_exactly(n) -> bytes`` and checks everything: magic,
    header against the request and the store, contiguous blocks, CRC-32C of every block, and
    the end record. ``blocks()`` yields ``(start, StoredRows)``; ``position`` is where the
    verified data stops, so a broken connection can resume from there."""

    def __init__(
        self, read_exactly: Callable[[int], bytes], md: StoreMetadata, start: int, stop: int
    ) -> None:
        self._read = read_exactly
        self.md, self.start, self.stop = md, start, stop
        self.position = start
        self._header()

    def _header(self) -> None:
        read_header(self._read, MAGIC, "stream", self.md, self.start, self.stop)
        self._columns: tuple[Column, ...] = columns(self.md)
        self._row_nbytes = sum(c.row_nbytes for c in self._columns)

    def blocks(self) -> Any:
        while True:
            head = self._read(4)
            if head == b"END0":
                stop, sent = struct.unpack("<QQ", self._read(16))
                if stop != self.stop or sent != self.stop - self.start or self.position != stop:
                    raise ProtocolError(
                        f"stream ended at {self.position} (end record: stop {stop}, sent {sent});"
                        f" expected {self.stop}"
                    )
                return
            if head == b"ERR0":
                self._error()
            if head != b"BLK0":
                raise ProtocolError(f"expected a block or the end record, found {head!r}")
            start, n, size = struct.unpack("<QII", self._read(16))
            expected = n * self._row_nbytes
            if n == 0 or start != self.position or size != expected or start + n > self.stop:
                raise ProtocolError(
                    f"block at {start} of {n} rows ({size} bytes) does not follow position "
                    f"{self.position} with {expected} bytes"
                )
            payload = self._read(size)
            (crc,) = _CRC.unpack(self._read(4))
            if crc32c.crc32c(payload) != crc:
                raise ProtocolError(f"block at {start}: CRC-32C mismatch (corrupted in transit)")
            yield start, self._rows(payload, n)
            self.position = start + n

    def _error(self) -> None:
        read_error_record(self._read, self.position)

    def _rows(self, payload: bytes, n: int) -> StoredRows:
        buf = memoryview(payload)
        arrays: dict[str, np.ndarray] = {}
        at = 0
        for col in self._columns:  # the columns, in order, as the header promised
            size = n * col.row_nbytes
            arrays[col.name] = np.frombuffer(buf[at : at + size], col.stored_dtype).reshape(
                col.shape(n)
            )
            at += size
        return rows_from_columns(self.md, arrays, n)


def read_error_record(read_exactly: Callable[[int], bytes], position: int) -> NoReturn:
    """The rest of an ``ERR0`` record: the server failed mid-stream at ``position`` and said
    why. Raises that code's error (final), or ProtocolError (retried) for an unknown code."""
    (size,) = struct.unpack("<I", read_exactly(4))
    if size > 1 << 16:
        raise ProtocolError(f"stream error record of {size} bytes is implausibly large")
    try:
        err = json.loads(read_exactly(size))["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ProtocolError(f"stream error record is malformed: {e}") from None
    cls = ERROR_TYPES.get(code)
    if cls is None:  # not a code this client knows: retried like a cut stream
        raise ProtocolError(f"the server stopped the stream at {position}: {message}")
    raise cls(f"the server stopped the stream at position {position} ({code}): {message}")
