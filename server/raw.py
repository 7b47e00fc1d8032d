"""Raw store keys over HTTP (docs/PROTOCOL.md §3): any Zarr v3 client with an HTTP store
opens ``/v1/stores/NAME/zarr`` directly. Responses carry ``ETag`` and ``Last-Modified``, and
answer ``If-None-Match`` and single byte ranges."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from .deps import AppState
from .errors import ApiError

__all__ = ["StoreFile", "router", "store_file"]

_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_MAX_KEY = 512


@dataclass(frozen=True)
class StoreFile:
    """The file behind a raw key."""

    path: Path
    stat: os.stat_result


async def store_file(name: str, key: str, state: AppState) -> StoreFile:
    """The file of ``key`` in the store named in the path.

    Raises:
        ApiError: ``unknown_store``; ``bad_key`` for anything but a relative path of letters,
            digits, ``_ . -`` and ``/`` without ``.`` or ``..`` segments; ``no_such_key``
            for a key that is not a file of the store.
    """
    where = state.get(name).store.path
    if isinstance(where, str):  # a store in object storage: its keys are read there
        raise ApiError(
            "no_such_key",
            f"store {name!r} is kept in object storage ({where}); read its raw keys there",
        )
    root = Path(where).resolve()
    if len(key) > _MAX_KEY or not _KEY.match(key) or any(p in (".", "..") for p in key.split("/")):
        raise ApiError(
            "bad_key",
            f"keys are relative store paths of at most {_MAX_KEY} characters, without '.' or "
            "'..' segments",
        )
    try:
        path = (root / key).resolve()
        found = path.is_relative_to(root) and path.is_file()
        stat = path.stat() if found else None
    except OSError:  # e.g. a name too long for the file system
        stat = None
    if stat is None or path.name.endswith(".partial"):  # a write in progress is no key
        raise ApiError("no_such_key", f"store {name!r} has no key {key!r}")
    return StoreFile(path, stat)


router = APIRouter()


@router.api_route(
    "/v1/stores/{name}/zarr/{key:path}",
    methods=["GET", "HEAD"],
    summary="Raw store keys, with Range, ETag and Last-Modified (zarr over HTTP)",
)
async def raw(request: Request, file: Annotated[StoreFile, Depends(store_file)]) -> Response:
    path, stat = file.path, file.stat
    etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
    headers = {
        "ETag": etag,
        "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        "Accept-Ranges": "bytes",
        "Cache-Control": "no-cache",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    size = stat.st_size
    head = request.method == "HEAD"
    span = _parse_range(request.headers.get("range"), size)
    status, (first, last) = (200, (0, size - 1)) if span is None else (206, span)
    headers["Content-Length"] = str(last - first + 1)
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    if head:
        return Response(b"", status, headers=headers, media_type="application/octet-stream")
    # Streamed in pieces: a shard is tens of MiB, and slow clients must not each hold a whole
    # copy (four at 1 MB/s on a 200 MB key took the server to 896 MB when it was read whole).
    return StreamingResponse(
        _pieces(path, first, last - first + 1),
        status,
        headers=headers,
        media_type="application/octet-stream",
    )


_PIECE = 1 << 20


async def _pieces(path: Path, first: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of ``path`` from ``first``, read 1 MiB at a time off the event loop.
    A file that shrank under us ends the body early: the client sees fewer bytes than its
    Content-Length, never bytes of another version."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(f.seek, first)
        while length > 0:
            piece = await asyncio.to_thread(f.read, min(length, _PIECE))
            if not piece:
                return
            length -= len(piece)
            yield piece
    finally:
        f.close()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → inclusive (first, last); ``None`` for no
    (or an ignorable multi-range) header.

    Raises:
        ApiError: ``bad_range_header`` for a header that does not parse,
            ``range_not_satisfiable`` when nothing of the key is asked for.
    """
    if not header:
        return None
    # At most 19 digits a side (< 2**63): a longer number is no file offset, and int() of
    # thousands of digits is refused by Python (or is slow) rather than parsed.
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*", header)
    if m is None:
        if header.strip().startswith("bytes=") and "," in header:
            return None  # several ranges: RFC 9110 lets a server send the whole file
        raise ApiError(
            "bad_range_header",
            f"cannot parse Range header {header[:64]!r}{'…' if len(header) > 64 else ''}: "
            "expected bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX with at most 19 digits",
        )
    a, b = m.groups()
    if not a and not b:
        raise ApiError("bad_range_header", f"cannot parse Range header {header!r}")
    if not a:  # suffix: the last b bytes
        n = int(b)
        if n == 0 or size == 0:
            raise ApiError("range_not_satisfiable", f"empty suffix of a {size}-byte key")
        return max(0, size - n), size - 1
    first = int(a)
    last = min(int(b), size - 1) if b else size - 1
    if first >= size or (b and int(b) < first):
        raise ApiError(
            "range_not_satisfiable", f"range {header!r} is outside the key's {size} bytes"
        )
    return first, last
