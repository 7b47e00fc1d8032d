"""The read side: one store interface (:class:`StoreBase`), a local and a remote store that
implement it, :func:`open` to get either, and the torch ``LogitDataset`` (in
:mod:`logitstore.read.dataset`, imported only by those who train)."""

from __future__ import annotations

import os

from .local import LogitStore
from .remote import RemoteStore
from .store import StoreBase

__all__ = ["LogitStore", "RemoteStore", "StoreBase", "open"]


def open(
    path: str | os.PathLike[str], *, allow_incomplete: bool = False, token: str | None = None
) -> StoreBase:
    """Open the store at ``path`` — a directory, an object-storage URL
    (``s3://bucket/prefix/store.zarr``; credentials and endpoint from the AWS environment), or
    an ``http(s)://`` URL that ``logitstore serve`` printed — for reading.

    Args:
        path: a store directory or a store URL.
        allow_incomplete: (directories, object storage) open a store whose writer has not
            finished, to read its committed shards.
        token: (http URLs) the bearer token; default the ``LOGITSTORE_TOKEN`` environment variable.

    Raises:
        StoreNotFoundError: no store at ``path``.
        UnsupportedVersionError: written in a format version this reader does not know.
        IncompleteStoreError: the writer has not finished (unless ``allow_incomplete``).
        RemoteError: the server refused the request or could not be reached.
        StorageError: object storage refused or failed a request (no such bucket, access
            denied, endpoint unreachable after retries).

    Example:
        >>> store = logitstore.open("teacher.zarr")   # or "http://host:8000/v1/stores/teacher"
        >>> len(store), store.offsets[:3]
    """
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        return RemoteStore(path, token=token)
    return LogitStore(path, allow_incomplete=allow_incomplete)
