"""The compressed stream's steps read from the shards (server/chunks.py sends them).

A step is every stored inner chunk that begins in one window of ``--block-positions``
positions, each behind its record head, in one buffer. The stream reads a step when the
socket has taken the one before:

* on the event loop, when every chunk of it is in the page cache: a read with Linux's
  ``RWF_NOWAIT`` fails rather than wait for the disk, and a copy from the page cache costs
  less than handing the read to a thread and back (one stream went from 1.3 to 2.0 GB/s);
* in a thread otherwise (the step's chunks on disk alone, a shard not opened before), which
  then asks the kernel to read the next step in the background;
* and where the filesystem cannot read without waiting (tmpfs, network filesystems, systems
  without ``RWF_NOWAIT``), or the steps are larger than :data:`LOOP_READ_BYTES`, always in a
  thread, the next step read ahead while this one is sent.

Pieces of a step go to the transport as views of its buffer (cycle.py), and the transport
keeps views of what the socket has not taken: :class:`StepBuffers` refills only a buffer that
nothing views.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import logitstore
from logitstore.format.chunk_decode import crc_ok
from logitstore.format.chunks import CHUNK_HEAD_BYTES, ChunkColumn, ShardFiles, pack_chunk_head

__all__ = [
    "LOOP_READ_BYTES",
    "StepBuffers",
    "advise",
    "can_read_cached",
    "fits_loop",
    "read_from_disk",
    "read_step",
    "shards",
    "steps",
]

Step = list[tuple[int, int, int]]  # (first position, column, chunk) of each record

#: Linux's flag for a read that fails rather than wait for the disk (None elsewhere)
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
#: devices (``st_dev``) whose filesystem refused such a read: their steps go to threads
_no_nowait: set[int] = set()
#: what a read with RWF_NOWAIT fails with where the filesystem cannot do it
_CANNOT = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM}
#: the largest step read on the event loop (the copy and CRC of 8 MiB take ~2 ms, during
#: which the worker's other connections wait)
LOOP_READ_BYTES = 8 << 20
#: step buffers kept per stream: the one being sent, the one before while the transport still
#: holds views of its end, and the one being filled
_KEPT_BUFFERS = 3


def steps(plan: Step, positions: int) -> list[Step]:
    """The plan cut into steps by where chunks begin: one step per window of ``positions``
    positions in which a chunk begins. (A column whose chunks are longer than the window,
    such as a 1-D one with a chunk per shard, sends each in the window where it begins.)"""
    out: list[Step] = []
    window = -1
    for item in plan:  # ordered by first position
        if item[0] // positions != window:
            window = item[0] // positions
            out.append([])
        out[-1].append(item)
    return out


def fits_loop(nbytes: int) -> bool:
    """Whether a step of ``nbytes`` may be read on the event loop."""
    return nbytes <= LOOP_READ_BYTES


def can_read_cached(device: int) -> bool:
    """Whether steps of a store on ``device`` may be tried from the page cache."""
    return _NOWAIT is not None and device not in _no_nowait


def read_step(
    root: Path,
    layout: list[ChunkColumn],
    items: Step,
    buf: bytearray,
    cached_on: int | None = None,
) -> tuple[bytearray, int] | None:
    """The records of ``items`` written into ``buf`` (a larger one if it is short): each
    record's head, then its chunk read from the shard straight behind it, one copy from the
    page cache, its CRC-32C checked. Returns the buffer and how many of its bytes the records
    fill.

    With ``cached_on`` (the store's device), for the event loop: ``None`` as soon as a chunk
    is not wholly in the page cache, the step is larger than :data:`LOOP_READ_BYTES`, or the
    read fails in any way; the caller then reads the step in a thread, whose blocking read
    reports what is wrong.

    Raises:
        CorruptStoreError: a shard is cut short, or a chunk fails its CRC-32C on this disk
            (a ``store_error`` the client does not retry, not damage in transit).
    """
    with ShardFiles() as files:
        where = [files.locate(root, layout[i], chunk) for _, i, chunk in items]
        total = sum(CHUNK_HEAD_BYTES + w[2] for w in where)
        if cached_on is not None and (_NOWAIT is None or not fits_loop(total)):
            return None
        if len(buf) < total:
            buf = bytearray(total + total // 8)  # a little slack: steps differ in size
        view = memoryview(buf)
        at = 0
        for (first, i, chunk), (fd, offset, nbytes, path) in zip(items, where, strict=True):
            c = layout[i]
            pack_chunk_head(buf, at, i, first, c.rows, nbytes)
            at += CHUNK_HEAD_BYTES
            data = view[at : at + nbytes]
            if cached_on is not None:
                assert _NOWAIT is not None
                try:
                    got = os.preadv(fd, [data], offset, _NOWAIT)
                except BlockingIOError:
                    return None
                except OSError as e:  # a thread's blocking read tells what is wrong
                    if e.errno in _CANNOT:
                        _no_nowait.add(cached_on)  # this filesystem cannot (tmpfs, NFS)
                    return None
                if got != nbytes:  # partly cached, or cut short: the blocking read tells
                    return None
            elif os.preadv(fd, [data], offset) != nbytes:
                raise logitstore.CorruptStoreError(
                    f"shard {path} is cut short; run `logitstore verify`"
                )
            if not crc_ok(data):
                raise logitstore.CorruptStoreError(
                    f"array {c.name!r}, chunk {chunk} (in shard {path}) fails its CRC-32C on "
                    "the server's disk; run `logitstore verify`"
                )
            at += nbytes
    return buf, total


def read_from_disk(
    root: Path, layout: list[ChunkColumn], items: Step, buf: bytearray, ahead: Step | None
) -> tuple[bytearray, int]:
    """:func:`read_step` waiting for the disk (in a thread), then the chunks of ``ahead``
    asked for in the background (:func:`advise`)."""
    got = read_step(root, layout, items, buf)
    assert got is not None
    if ahead is not None:
        advise(root, layout, ahead)
    return got


def shards(layout: list[ChunkColumn], items: Step) -> set[tuple[int, int]]:
    """``(column, shard)`` of every chunk of ``items``."""
    return {(i, layout[i].shard_of(chunk)[0]) for _, i, chunk in items}


def advise(root: Path, layout: list[ChunkColumn], items: Step) -> None:
    """Ask the kernel to read the chunks of ``items`` in the background (a hint: whatever
    fails here is found again, and reported, when the step is read)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        with ShardFiles() as files:
            for _, i, chunk in items:
                fd, offset, nbytes, _ = files.locate(root, layout[i], chunk)
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
    except (OSError, logitstore.LogitStoreError):
        pass


class StepBuffers:
    """The step buffers of one stream. A buffer is refilled only when no view of it lives: a
    ``bytearray`` with live views refuses to change size, which is the test."""

    def __init__(self) -> None:
        self._kept: list[bytearray] = []

    def take(self, busy: int = -1) -> tuple[int, bytearray]:
        """A buffer free to refill, other than place ``busy``, and its place (-1: a new
        buffer, not kept)."""
        for i, buf in enumerate(self._kept):
            if i == busy:
                continue
            try:
                buf.append(0)
            except BufferError:
                continue  # still viewed
            del buf[-1]
            return i, buf
        if len(self._kept) < _KEPT_BUFFERS:
            self._kept.append(bytearray())
            return len(self._kept) - 1, self._kept[-1]
        return -1, bytearray()

    def keep(self, place: int, buf: bytearray) -> None:
        """``buf`` (grown by the read, perhaps) back in ``place``."""
        if place >= 0:
            self._kept[place] = buf
