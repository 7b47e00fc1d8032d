"""``logitstore copy SRC DST``: move a complete store between local disk and object storage
(either way, or bucket to bucket), resumable, verified at the end.

The destination follows the creation protocol of FORMAT.md §6.6: the creation marker first,
then every file or object except the group's ``zarr.json``, each landing whole (a file by
write-then-rename, an object in one PUT), then ``zarr.json``, then the marker is removed. A
copy cut short therefore never reads as a store, and the same command resumes it: keys
already at the destination with the source's size are kept. At the end the destination is
read back whole (:func:`logitstore.verify`: every checksum, invariant and the identity).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import CorruptStoreError, LogitStoreError, StoreExistsError
from ..format.objects import CREATING_KEY, WRITER_KEY
from ..format.storage import StorePath, location, open_group, read_metadata, store_path
from ..read.local import LogitStore
from .verify import verify

__all__ = ["CopyReport", "copy_store"]

_GROUP = "zarr.json"
_NOT_COPIED = (CREATING_KEY, WRITER_KEY)


@dataclass
class CopyReport:
    """What :func:`copy_store` did."""

    src: str
    dst: str
    keys: int = 0  # keys the store has
    copied: int = 0  # keys sent by this run (the rest were there from an earlier one)
    bytes_copied: int = 0
    seconds: float = 0.0
    verified: bool = False
    faults: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_copied / 1e6 / max(self.seconds, 1e-9)


class _Side:
    """Keys of one end of a copy, in a directory or under an object prefix."""

    def __init__(self, root: StorePath) -> None:
        self.root = root
        self.loc = location(root)

    def sizes(self) -> dict[str, int]:
        if self.loc is not None:
            return self.loc.sizes()
        root = Path(self.root)
        if not root.is_dir():
            return {}
        return {
            str(p.relative_to(root)): p.stat().st_size
            for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".partial")
        }

    def read(self, key: str) -> bytes:
        if self.loc is not None:
            data = self.loc.read(key)
            if data is None:
                raise CorruptStoreError(f"{self.loc.url}/{key} disappeared during the copy")
            return data
        return Path(self.root, key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        if self.loc is not None:
            self.loc.write(key, data)
            return
        path = Path(self.root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a file lands whole

    def delete(self, key: str) -> None:
        if self.loc is not None:
            self.loc.delete(key)
        else:
            Path(self.root, key).unlink(missing_ok=True)

    def remove_partials(self) -> None:
        """Delete the temporary files a copy killed mid-key left in a directory (an object
        lands whole: none there); verify would otherwise refuse every resumed copy."""
        if self.loc is None and Path(self.root).is_dir():
            for p in Path(self.root).rglob("*.partial"):
                p.unlink(missing_ok=True)


def copy_store(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    workers: int = 8,
    progress: bool = False,
) -> CopyReport:
    """Copy the complete store ``src`` to ``dst`` (directories or object-storage URLs) and
    verify the copy.

    Args:
        src, dst: a store directory or URL (``s3://bucket/prefix/store.zarr``), and where
            the copy goes.
        overwrite: replace a complete store of other contents at ``dst``.
        workers: keys in flight at once (parallel GETs and PUTs).
        progress: show a progress bar (bytes).

    Raises:
        IncompleteStoreError: ``src``'s writer has not finished.
        StoreExistsError: ``dst`` holds something that is not a store, or (without
            ``overwrite``) a complete store with other contents.
        CorruptStoreError: the copy does not verify (the message lists the faults).
        StorageError: object storage refused or failed a request.

    Example:
        >>> copy_store("teacher.zarr", "s3://bucket/runs/teacher.zarr").mb_per_s
    """
    source = LogitStore(src)  # refuses an incomplete or unreadable store
    src_root, dst_root = source.path, store_path(dst)
    if str(src_root) == str(dst_root):
        raise LogitStoreError(f"source and destination are the same store: {str(src_root)!r}")
    report = CopyReport(str(src_root), str(dst_root))
    a, b = _Side(src_root), _Side(dst_root)
    t0 = time.perf_counter()
    want = {k: n for k, n in a.sizes().items() if k not in _NOT_COPIED}
    if _GROUP not in want:
        raise CorruptStoreError(f"{str(src_root)!r} lists no {_GROUP}")
    report.keys = len(want)
    have = _prepare(b, source.metadata.identity, overwrite)
    todo = sorted(k for k in want if k != _GROUP and have.get(k) != want[k])
    total = sum(want[k] for k in todo) + want[_GROUP]
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="copy", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        for n in pool.map(lambda k: _copy_key(a, b, k), _in_order(todo)):
            report.copied += 1
            report.bytes_copied += n
            bar.update(n)
        # The group's metadata lands last: only now is the destination a store.
        n = _copy_key(a, b, _GROUP)
        report.copied += 1
        report.bytes_copied += n
        bar.update(n)
    b.delete(CREATING_KEY)
    report.seconds = time.perf_counter() - t0
    checked = verify(dst_root, progress=progress)
    report.faults = list(checked.faults)
    if not checked.ok:
        raise CorruptStoreError(
            f"the copy at {str(dst_root)!r} does not verify: {'; '.join(checked.faults[:3])}; "
            "run the same copy again (it re-sends what differs in size), or with overwrite"
        )
    report.verified = True
    return report


def _in_order(keys: list[str]) -> Iterator[str]:
    # Arrays' metadata before their chunks is not needed (nothing reads before zarr.json),
    # but keeps a partial copy easy to read for a person: small keys first.
    yield from sorted(keys, key=lambda k: (not k.endswith(_GROUP), k))


def _copy_key(a: _Side, b: _Side, key: str) -> int:
    data = a.read(key)
    b.write(key, data)
    return len(data)


def _prepare(b: _Side, identity: str, overwrite: bool) -> dict[str, int]:
    """Check the destination and put the creation marker: returns the sizes of the keys an
    earlier, interrupted copy of the same store left there (to keep)."""
    have = b.sizes()
    marker = {"copy_of": identity, "time": time.time()}
    if _GROUP in have and CREATING_KEY not in have:
        try:
            existing = read_metadata(open_group(b.root)).identity
        except LogitStoreError as e:
            raise StoreExistsError(
                f"{str(b.root)!r} holds something that is not a readable store ({e}); "
                "remove it yourself or choose another destination"
            ) from None
        if existing != identity and not overwrite:
            raise StoreExistsError(
                f"{str(b.root)!r} already holds a store with other contents (identity "
                f"{existing[:19]}…); pass --overwrite to replace it"
            )
        if existing == identity and not overwrite:
            # The same store: a copy whose verify was cut short, or a copy made before.
            b.write(CREATING_KEY, json.dumps(marker).encode())
            b.remove_partials()
            b.delete(_GROUP)
            return {k: n for k, n in have.items() if k != _GROUP}
        have = {}
    elif have and CREATING_KEY not in have and set(have) - {WRITER_KEY}:
        raise StoreExistsError(
            f"{str(b.root)!r} exists and is not a logitstore store; refusing to touch it. "
            "Choose another destination"
        )
    elif CREATING_KEY in have:
        earlier = _read_marker(b)
        if earlier.get("copy_of") != identity:
            have = {}  # a cut-short write or a copy of another store: start again
    b.write(CREATING_KEY, json.dumps(marker).encode())
    b.remove_partials()
    if not have:  # clear what a cut-short creation of something else left
        for k in b.sizes():
            if k not in _NOT_COPIED:
                b.delete(k)
    b.delete(_GROUP)
    return {k: n for k, n in have.items() if k not in _NOT_COPIED and k != _GROUP}


def _read_marker(b: _Side) -> dict[str, object]:
    try:
        obj = json.loads(b.read(CREATING_KEY))
    except (OSError, ValueError, LogitStoreError):
        return {}
    return obj if isinstance(obj, dict) else {}
