"""A stored inner chunk's bytes checked and decoded (FORMAT.md §4): its trailing CRC-32C, then
the codec its array names, straight into the memory it belongs in when the caller has it.
The chunks come from a shard on this disk (shards.py) or from the compressed stream
(chunks.py, PROTOCOL.md §2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import crc32c
import numpy as np
from numcodecs import blosc
from numcodecs.zstd import Zstd

from ..errors import CorruptStoreError, ProtocolError

__all__ = [
    "CHUNK_CODECS",
    "crc_ok",
    "decode_chunk",
    "decode_chunk_into",
    "decode_part",
    "into_place",
]

#: the compressors a reader decodes (each inner chunk: bytes → one of these → crc32c)
CHUNK_CODECS = ("zstd", "blosc")
_ZSTD = Zstd()


def crc_ok(data: bytes | memoryview) -> bool:
    """Whether a stored chunk's trailing CRC-32C (little-endian) matches the bytes before it
    (``False`` for a chunk too short to hold one)."""
    view = memoryview(data)  # slices without copying the chunk
    return len(view) >= 4 and crc32c.crc32c(view[:-4]) == int.from_bytes(view[-4:], "little")


def _checked_body(data: bytes) -> memoryview:
    # The compressed bytes of a stored chunk, after its trailing CRC-32C is checked.
    if len(data) < 4:
        raise ProtocolError(f"a chunk of {len(data)} bytes has no room for its checksum")
    if not crc_ok(data):
        raise ProtocolError("chunk CRC-32C mismatch (its bytes changed after they were written)")
    return memoryview(data)[:-4]


def _declared_size(body: memoryview, codec: str) -> int | None:
    """The decoded size a compressed chunk's own header declares, or ``None`` if it declares
    none: blosc's ``nbytes`` (header bytes 4-7), a zstd frame's content size (RFC 8878
    §3.1.1.1)."""
    if codec == "blosc":
        return int.from_bytes(body[4:8], "little") if len(body) >= 16 else None
    if len(body) < 6 or bytes(body[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = body[4]
    fcs, single, dictionary = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    at = 5 + (1 - single) + (0, 1, 2, 4)[dictionary]  # after the window and dictionary ids
    width = (single, 2, 4, 8)[fcs]
    if width == 0 or len(body) < at + width:
        return None
    size = int.from_bytes(body[at : at + width], "little")
    return size + 256 if width == 2 else size


def _check_frame(body: memoryview, codec: str, nbytes: int) -> None:
    """What a stored chunk's frame must say before it is decoded into ``nbytes`` bytes.

    Raises:
        ProtocolError: a codec this reader does not decode; a frame declaring a decoded size
            other than ``nbytes`` (a stored chunk declares its own exactly); a blosc frame
            whose compressed size is not the bytes it came in (c-blosc would read past them).
    """
    if codec not in CHUNK_CODECS:
        raise ProtocolError(f"chunk codec {codec!r} is not one of {CHUNK_CODECS}")
    if codec == "blosc" and (len(body) < 16 or int.from_bytes(body[12:16], "little") != len(body)):
        raise ProtocolError(f"blosc frame of {len(body)} bytes declares another length")
    declared = _declared_size(body, codec)
    if declared is not None and declared != nbytes:
        raise ProtocolError(f"chunk holds {declared} bytes, expected {nbytes}")


def decode_chunk(data: bytes, codec: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    """Stored inner-chunk bytes → the array they hold, after checking their CRC-32C.

    Raises:
        ProtocolError: the checksum, the codec's frame or the decoded size is wrong.
    """
    out = np.empty(shape, dtype=dtype)
    decode_chunk_into(data, codec, out)
    return out


def decode_chunk_into(data: bytes, codec: str, out: np.ndarray) -> None:
    """:func:`decode_chunk` into ``out`` (C-contiguous and writeable, the chunk's dtype and
    shape): the codec writes straight into it, with no decoded copy in between, and never
    more than it holds — whatever the frame says, decoding stops at ``out``'s end.

    Raises:
        ProtocolError: as :func:`decode_chunk`, or the frame decodes to fewer bytes than
            ``out`` holds.
    """
    if not data:  # not in the shard: the fill value
        out.fill(0)
        return
    body = _checked_body(data)
    _check_frame(body, codec, out.nbytes)
    try:  # a zstd frame without its size, too: numcodecs stops at out's end, or fails
        if codec == "zstd":
            _ZSTD.decode(body, out=out)
        else:  # its header declares out's size (checked above)
            blosc.decompress(body, out)
    except Exception as e:  # the codecs raise RuntimeError/ValueError for a bad frame
        raise ProtocolError(f"chunk does not decompress ({codec}): {e}") from None


def decode_part(data: bytes, codec: str, dest: np.ndarray, rows: int, skip: int = 0) -> None:
    """Rows ``[skip, skip + len(dest))`` of a stored chunk of ``rows`` rows, into ``dest``:
    decompressed in place when they are the whole chunk, else decoded aside (the chunk's
    own memory) and copied.

    Raises:
        ProtocolError: as :func:`decode_chunk`.
    """
    if skip == 0 and len(dest) == rows:
        decode_chunk_into(data, codec, dest)
    else:
        part = decode_chunk(data, codec, dest.dtype, (rows, *dest.shape[1:]))
        dest[...] = part[skip : skip + len(dest)]


def into_place(
    data: bytes,
    codec: str,
    dest: np.ndarray,
    where: Callable[[], str],
    rows: int | None = None,
    skip: int = 0,
) -> None:
    """:func:`decode_part` of a chunk read from this machine's disk (the whole chunk unless
    ``rows`` says how many it holds): damage is the store's.

    Raises:
        CorruptStoreError: naming ``where()`` (called only then).
    """
    try:
        decode_part(data, codec, dest, len(dest) if rows is None else rows, skip)
    except ProtocolError as e:
        raise CorruptStoreError(f"{where()}: {e}; run `logitstore verify`") from None
