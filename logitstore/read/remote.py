"""Reading a store served over HTTP by ``logitstore serve``: the same interface as a local
store (:class:`logitstore.read.store.StoreBase`), only slower by the network.

Rows arrive as stored and are decoded by the same code as local reads, so results are
bit-identical. Streams are verified block by block (PROTOCOL.md); a dropped connection or a
restarting server is retried with exponential backoff and the read resumes after the last
verified block.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import (
    CorruptStoreError,
    LogitStoreError,
    PositionError,
    ProtocolError,
    RemoteError,
    StoreNotFoundError,
)
from ..format.chunks import CHUNKS_MEDIA_TYPE, ChunkParser, alloc_columns
from ..format.codec import Batch, decode_rows
from ..format.direct import Alloc
from ..format.fused import check_decoder
from ..format.metadata import StoreMetadata
from ..format.protocol import ERROR_TYPES, StreamParser
from ..format.schema import COLUMN_ORDER, StoredRows, empty_rows, rows_from_columns
from ..format.validate import check_offsets
from .buffers import BufferPool
from .store import StoreBase, check_range

if TYPE_CHECKING:
    import tokenizers

__all__ = ["RemoteStore"]

#: reads of at most this many positions decompress into memory the thread reuses
POOLED_POSITIONS = 1 << 17

#: for a refusal without a known JSON code (ERROR_TYPES), by HTTP status; other 4xx: RemoteError
_BY_STATUS: dict[int, type[LogitStoreError]] = {404: StoreNotFoundError, 416: PositionError}


class RemoteStore(StoreBase):
    """A store at ``http(s)://host:port/v1/stores/NAME``. Use :func:`logitstore.open`.

    Args:
        url: the store's URL, as ``logitstore serve`` prints it.
        token: bearer token (default: the ``LOGITSTORE_TOKEN`` environment variable).
        timeout: seconds to wait on the socket.
        retries: attempts after a failure (connection refused or reset, a 5xx without a known
            error code, a broken stream), with exponential backoff from ``backoff`` seconds.
            A refusal with a known code (PROTOCOL.md §4) is final, and raises at once.
        compressed: ask for the compressed stream (PROTOCOL.md §2.1): the store's own
            chunks, decoded here, which spares the server's CPU and the network. A server
            that cannot send it answers with the row stream; both give the same bits.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.25,
        compressed: bool = True,
    ) -> None:
        check_decoder()  # a bad setting is refused before anything is read
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LogitStoreError(f"not an http(s) store URL: {url!r}")
        self.path = url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._base = parts.path
        self._token = token if token is not None else os.environ.get("LOGITSTORE_TOKEN")
        self._timeout, self._retries, self._backoff = timeout, retries, backoff
        self._accept = f"{CHUNKS_MEDIA_TYPE}, */*" if compressed else "*/*"
        #: failed attempts that were retried (connection refused or reset, unknown 5xx, cut stream)
        self.retried = 0
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        answer = self._get("")  # the server's refusals raise their own errors here
        try:
            info = json.loads(answer)
            meta = info["metadata"]
        except (ValueError, KeyError, TypeError):  # JSON, but not a logitstore answer
            raise RemoteError(
                f"{self.path} does not answer as a logitstore store (no JSON metadata); is "
                "it the URL `logitstore serve` printed?"
            ) from None
        self.info: dict[str, Any] = info
        self.metadata = StoreMetadata.from_dict(meta)
        # Ask in pieces the server accepts (it answers 413 above its cap).
        self._request_positions = min(
            int(info.get("server", {}).get("max_positions", 1 << 20)), 1 << 20
        )
        raw = self._get("/offsets")
        if len(raw) % 8:
            raise CorruptStoreError(f"{self.path}/offsets: {len(raw)} bytes, not int64s")
        self.offsets = check_offsets(
            np.frombuffer(raw, dtype="<i8").astype(np.int64), self.metadata, f"{self.path}"
        )

    # -- HTTP -----------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_local", "_conns", "_conns_lock"):  # connections stay in their process
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._conns, self._conns_lock = [], threading.Lock()

    def close(self) -> None:
        """Close every connection this object opened (they reopen on the next request)."""
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __del__(self) -> None:
        if hasattr(self, "_conns_lock"):
            self.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._conns_lock:
                self._conns = [c for c in self._conns if c is not conn]

    def _request(self, path: str, accept: str = "*/*") -> http.client.HTTPResponse:
        """``GET path``; a refusal raises the exception its JSON code names (ERROR_TYPES)."""
        headers = {"Accept": accept}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        conn = self._connection()
        reused = conn.sock is not None
        try:
            conn.request("GET", self._base + path, headers=headers)
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            # The server closed this idle keep-alive connection (its timeout, or a restart)
            # before it read the request: not a failure, so sent again at once on a new one,
            # with no backoff and not counted in ``retried``. (GET is idempotent.)
            self._drop_connection()
            conn = self._connection()
            conn.request("GET", self._base + path, headers=headers)
            resp = conn.getresponse()
        if resp.status < 400:
            return resp
        body = resp.read().decode(errors="replace")
        code, message = _error_of(body)
        cls = ERROR_TYPES.get(code) if code is not None else None
        if cls is None and resp.status >= 500:  # a proxy, or a server going down: retried
            raise http.client.HTTPException(f"server error {resp.status}")
        if cls is None:  # not a logitstore answer (a proxy's?): go by the status
            cls = _BY_STATUS.get(resp.status, RemoteError)
        raise cls(f"{self.path}{path}: HTTP {resp.status}: {message}")

    def _retrying(self, attempt: Any) -> Any:
        delay = self._backoff
        for i in range(self._retries + 1):
            try:
                return attempt()
            except ProtocolError as e:  # a cut or damaged stream
                failure: Exception = e
            except LogitStoreError:  # the server's answer (StoreNotFoundError is an OSError too)
                self._drop_connection()  # a stream's error record may leave its body unread
                raise
            except (OSError, http.client.HTTPException) as e:  # no answer, or a 5xx without one
                failure = e
            self._drop_connection()
            self.retried += 1
            if i == self._retries:
                raise RemoteError(
                    f"{self.path}: giving up after {self._retries + 1} attempts: {failure}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _get(self, path: str) -> bytes:
        def attempt() -> bytes:
            data: bytes = self._request(path).read()
            return data

        result: bytes = self._retrying(attempt)
        return result

    # -- the store interface ----------------------------------------------------------------------

    def read_stored(self, start: int, stop: int) -> StoredRows:
        """Positions ``[start, stop)`` as stored, streamed and verified (PROTOCOL.md)."""
        return self._rows(start, stop, np.empty)

    def _decode(self, start: int, stop: int, id_dtype: type, alloc: Alloc) -> Batch:
        # The stored rows are only the decoder's input here: chunks decompress into memory
        # this thread reuses (a pool per thread, as reads on other threads share the store).
        # Reads above a Dataset block or so take fresh memory, so a pool never holds more.
        if stop - start > POOLED_POSITIONS:
            return super()._decode(start, stop, id_dtype, alloc)
        pool = getattr(self._local, "rows_pool", None)
        if pool is None:
            pool = self._local.rows_pool = BufferPool(keep=2 * len(COLUMN_ORDER))
        return decode_rows(self.metadata, self._rows(start, stop, pool.alloc), id_dtype, alloc)

    def _rows(self, start: int, stop: int, alloc: Alloc) -> StoredRows:
        """:meth:`read_stored`, the compressed stream's chunks decoded into memory from
        ``alloc``."""
        start, stop = check_range(start, stop, len(self))
        md, n = self.metadata, stop - start
        parts: list[StoredRows] = []  # row-stream blocks, joined at the end
        # Once the server sends chunks: the whole result by column, which they decode into.
        into: dict[str, np.ndarray] = {}
        position = start

        def attempt(piece_stop: int) -> None:
            nonlocal position
            resp = self._request(f"/positions?start={position}&stop={piece_stop}", self._accept)

            def read_exactly(k: int) -> bytes:
                buf = bytearray(k)
                view, got = memoryview(buf), 0
                while got < k:
                    r = resp.readinto(view[got:])
                    if not r:
                        raise ProtocolError(f"stream cut short after position {position}")
                    got += r
                return buf  # type: ignore[return-value]  # writable, so arrays are too

            # The server chose: its compressed chunks (PROTOCOL.md §2.1), or rows (§2).
            chunked = (resp.getheader("Content-Type") or "").startswith(CHUNKS_MEDIA_TYPE)
            if chunked and not into:
                into.update(alloc_columns(md, n, alloc))
                at = 0
                for part in parts:  # rows an earlier attempt got from a row stream
                    _put(into, part, at)
                    at += len(part.input_ids)
                parts.clear()
            if chunked:
                blocks = ChunkParser(read_exactly, md, position, piece_stop, into, start).rows()
            else:
                blocks = StreamParser(read_exactly, md, position, piece_stop).blocks()
            for block_start, rows in blocks:  # verified: a retry resumes after each
                if not into:
                    parts.append(rows)
                elif not chunked:  # a row stream after chunks (another server's answer)
                    _put(into, rows, block_start - start)
                position = block_start + len(rows.input_ids)
            if resp.read(1):  # the end record is the last byte; reading on frees the connection
                raise ProtocolError("data after the end record")

        for piece_stop in range(
            start + self._request_positions, stop + self._request_positions, self._request_positions
        ):
            stop_here = min(piece_stop, stop)
            if position < stop_here:
                self._retrying(lambda s=stop_here: attempt(s))
        if into:  # every end record checked: the whole range has come
            return rows_from_columns(md, into, n)
        if len(parts) == 1:
            return parts[0]
        return _concat(parts, md, n)

    def tokenizer(self) -> tokenizers.Tokenizer | None:
        import tokenizers

        try:
            raw = self._get("/tokenizer")
        except StoreNotFoundError:
            return None
        return tokenizers.Tokenizer.from_str(raw.decode("utf-8"))

    def loss_mask_positions(self) -> int | None:
        count = self.info.get("loss_mask_positions")  # the server counted it once, at start
        return None if count is None else int(count)

    def committed(self) -> np.ndarray:
        return np.ones(self.metadata.num_shards, dtype=bool)  # the server serves complete stores

    def nbytes_stored(self) -> int:
        return int(self.info["bytes_on_disk"])


def _put(into: dict[str, np.ndarray], part: StoredRows, at: int) -> None:
    """Copy ``part``'s columns into ``into`` (arrays by column name) from row ``at``."""
    for name, src in zip(COLUMN_ORDER, part, strict=True):  # StoredRows' field order
        if src is not None and name in into:  # tokens-only rows carry an empty `values`
            into[name][at : at + len(src)] = src


def _concat(parts: list[StoredRows], md: StoreMetadata, n: int) -> StoredRows:
    if not parts:
        return empty_rows(md)
    joined = [None if c[0] is None else np.concatenate(c) for c in zip(*parts, strict=True)]
    rows = StoredRows(*joined)  # type: ignore[arg-type]  # input_ids and values are never None
    if len(rows.input_ids) != n:  # the parser checked every block's range; this cannot differ
        raise ProtocolError(f"received {len(rows.input_ids)} positions, expected {n}")
    return rows


def _error_of(body: str) -> tuple[str | None, str]:
    """The JSON error body's ``(code, message)``; ``(None, the body's start)`` for another body."""
    try:
        error = json.loads(body)["error"]
        code, message = error.get("code"), error["message"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, body[:200]
    return (code if isinstance(code, str) else None), str(message)
