"""Stores in object storage: ``s3://bucket/prefix/store.zarr`` and the other URLs fsspec
knows (``gs://``, ``az://``, ``memory://``, ...), through zarr's fsspec-backed store.

Why fsspec (s3fs) rather than obstore, measured on a 131k-position top-64 store served by a
moto server on loopback (benchmarks/results/s3.md): obstore read 2,048-position windows
~2x faster, but a DataLoader worker forked after the parent had read through obstore hung
(its Rust runtime does not survive ``fork``), while s3fs does; and botocore reads every
standard AWS source — environment, ``~/.aws/config`` profiles, ``AWS_ENDPOINT_URL`` — which
obstore only partly does.

What this module adds to zarr's store: the few object operations the commit protocol needs
(conditional create, delete, listing; FORMAT.md §6.6), retries with backoff for transient
failures (botocore's standard mode), and errors that name the bucket and the key.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import AsyncIterator, Iterable
from functools import cached_property
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from ..errors import LogitStoreError, StorageError

__all__ = ["CREATING_KEY", "WRITER_KEY", "ObjectLocation", "is_object_url"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: http(s) URLs are stores served by ``logitstore serve``; ``file://`` is a local directory.
_NOT_OBJECTS = ("http", "https", "file", "local")

#: present while a store's objects are being created, so a creation cut short is recognised
#: as ours and replaced (FORMAT.md §6.6)
CREATING_KEY = ".logitstore-creating.json"
#: the lease of the job writing the store (FORMAT.md §6.6)
WRITER_KEY = ".logitstore-writer.json"

# Names of exception classes that mean "the endpoint could not be reached", matched by name
# so that this module need not import botocore or aiohttp.
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ConnectionRefusedError",
)


def is_object_url(target: object) -> bool:
    """Whether ``target`` names a store in object storage (a URL with a scheme other than
    ``http``, ``https`` or ``file``)."""
    if not isinstance(target, str):
        return False
    m = _SCHEME.match(target)
    return m is not None and m.group(1).lower() not in _NOT_OBJECTS


def _storage_options(scheme: str) -> dict[str, Any]:
    if scheme not in ("s3", "s3a"):
        return {}
    # Transient failures (503 SlowDown, 5xx, throttling, dropped connections) are retried by
    # botocore with exponential backoff and jitter; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, the
    # standard variables, override the defaults here.
    retries = {
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "6")),
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
    }
    opts: dict[str, Any] = {
        "config_kwargs": {"retries": retries, "connect_timeout": 10, "read_timeout": 60},
        # Other processes (ranks, resumed jobs, copies) change the objects: never answer
        # "does this key exist" from a listing cached earlier.
        "use_listings_cache": False,
    }
    # botocore would read these itself; passing them makes them part of the key under which
    # fsspec caches file systems, so a changed environment gets a new client, not a stale one.
    env = os.environ
    for option, names in (
        ("endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
        ("key", ("AWS_ACCESS_KEY_ID",)),
        ("secret", ("AWS_SECRET_ACCESS_KEY",)),
        ("token", ("AWS_SESSION_TOKEN",)),
        ("profile", ("AWS_PROFILE",)),
    ):
        value = next((env[n] for n in names if env.get(n)), None)
        if value is not None:
            opts[option] = value
    return opts


class ObjectLocation:
    """A store's place in object storage: ``scheme://bucket/prefix``.

    Credentials, region and endpoint come from the standard sources of the backend (for S3:
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws/config``,
    ``AWS_ENDPOINT_URL`` for S3-compatible servers, instance roles).

    Raises:
        StorageError: the URL names no bucket, or the backend's library is not installed.
    """

    def __init__(self, url: str) -> None:
        m = _SCHEME.match(url)
        if m is None:
            raise LogitStoreError(f"{url!r} is not a URL (expected scheme://bucket/prefix)")
        self.scheme = m.group(1).lower()
        rest = url[m.end() :].strip("/")
        if not rest:
            raise StorageError(
                f"{url!r} names no bucket: expected {self.scheme}://BUCKET/PREFIX/STORE.zarr"
            )
        self.url = f"{self.scheme}://{rest}"
        self.bucket, _, self.prefix = rest.partition("/")
        self._root = rest  # the path fsspec uses: bucket/prefix

    def __repr__(self) -> str:
        return f"ObjectLocation({self.url!r})"

    @property
    def name(self) -> str:
        """The last component of the URL (``store.zarr``)."""
        return self._root.rsplit("/", 1)[-1]

    @cached_property
    def fs(self) -> Any:
        """The synchronous fsspec file system (one per location and process)."""
        return self._filesystem(asynchronous=False)

    def _filesystem(self, *, asynchronous: bool) -> Any:
        import fsspec

        try:
            cls = fsspec.get_filesystem_class(self.scheme)
        except (ImportError, ValueError) as e:
            extra = " (pip install 'logitstore[s3]')" if self.scheme.startswith("s3") else ""
            raise StorageError(
                f"cannot open {self.url!r}: no installed file system for {self.scheme}://"
                f"{extra}: {e}"
            ) from None
        return cls(asynchronous=asynchronous, **_storage_options(self.scheme))

    def zarr_store(self, *, read_only: bool) -> WrapperStore[FsspecStore]:
        """zarr's fsspec store over this location, with errors that name bucket and key."""
        fs = self._filesystem(asynchronous=True)
        inner = FsspecStore(fs=fs, path=self._root, read_only=read_only)
        return NamedErrorStore(inner, self)

    # -- messages --------------------------------------------------------------------------

    def endpoint(self) -> str:
        """Where requests go, for messages: the configured endpoint, or the cloud's own."""
        client = getattr(self.fs, "s3", None)
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return str(url or env or f"the default {self.scheme} endpoint")

    def error(self, e: BaseException, action: str, key: str = "") -> StorageError:
        """A :class:`StorageError` for ``e``, raised while ``action`` on ``key``: says what
        failed, where (bucket, key, endpoint) and what to do."""
        where = f"{self.url}/{key}" if key else self.url
        names = {c.__name__ for c in type(e).__mro__}
        msg = str(e) or type(e).__name__
        if names & set(_UNREACHABLE):
            return StorageError(
                f"{action} {where}: cannot reach the object store at {self.endpoint()} "
                f"(after retries): {msg}. Check AWS_ENDPOINT_URL and the network"
            )
        if isinstance(e, PermissionError):
            return StorageError(
                f"{action} {where}: access denied by {self.endpoint()} ({msg}). Check the "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and "
                f"that they may use bucket {self.bucket!r}"
            )
        if isinstance(e, FileNotFoundError) and "bucket" in msg.lower():
            return StorageError(
                f"{action} {where}: bucket {self.bucket!r} does not exist at "
                f"{self.endpoint()}. Check the URL, or create the bucket"
            )
        return StorageError(f"{action} {where} failed: {type(e).__name__}: {msg}")

    # -- objects ---------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root

    def check_bucket(self) -> None:
        """Raise :class:`StorageError` unless the bucket exists and the credentials may list
        it; a store that is not there is then just that, not a missing bucket."""
        try:
            self.fs.ls(self.bucket, detail=False)
        except FileNotFoundError:
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint()} (store "
                f"{self.url!r}). Check the URL, or create the bucket"
            ) from None
        except Exception as e:  # PermissionError, connection errors, ...
            raise self.error(e, "listing the bucket of") from None

    def exists(self, key: str) -> bool:
        try:
            return bool(self.fs.exists(self._path(key)))
        except Exception as e:
            raise self.error(e, "checking") from None

    def read(self, key: str) -> bytes | None:
        """The whole object ``key``, or ``None`` if there is none."""
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.error(e, "reading", key) from None

    def read_tagged(self, key: str) -> tuple[bytes, str | None] | None:
        """The whole object ``key`` and its ETag (``None`` where the backend gives none), or
        ``None`` if there is none. The tag is read first: should the object change in between,
        a put conditioned on the tag (:meth:`replace`) fails rather than overwrite it."""
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.error(e, "reading", key) from None
        data = self.read(key)
        if data is None:
            return None
        tag = info.get("ETag") or info.get("etag")
        return data, None if tag is None else str(tag)

    def replace(self, key: str, data: bytes, etag: str) -> bool:
        """Put ``data`` as object ``key`` only if the object there still has ``etag``
        (``If-Match``; S3); ``False`` if it was changed or deleted meanwhile."""
        try:
            self.fs.pipe_file(self._path(key), data, IfMatch=etag)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EINVAL:  # s3fs's translation of 412 PreconditionFailed
                return False
            raise self.error(e, "writing", key) from None
        except Exception as e:
            raise self.error(e, "writing", key) from None
        return True

    def read_json(self, key: str) -> Any:
        raw = self.read(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def size(self, key: str) -> int | None:
        """Bytes of object ``key``; ``None`` if there is none."""
        try:
            return int(self.fs.size(self._path(key)))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.error(e, "sizing", key) from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of object ``key`` (one ranged GET)."""
        try:
            return bytes(self.fs.cat_file(self._path(key), start=start, end=end))
        except Exception as e:
            raise self.error(e, "reading", key) from None

    def write(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
        """Put ``data`` as object ``key`` in one request. With ``create_only`` the put is
        conditional (``If-None-Match: *``) and returns ``False`` if the key exists."""
        try:
            self.fs.pipe_file(self._path(key), data, mode="create" if create_only else "overwrite")
        except FileExistsError:
            if create_only:
                return False
            raise self.error(FileExistsError(key), "writing", key) from None
        except Exception as e:
            raise self.error(e, "writing", key) from None
        return True

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self.error(e, "deleting", key) from None

    def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self.error(e, f"deleting {len(paths)} objects under") from None

    def sizes(self) -> dict[str, int]:
        """Every object under the location: key (relative) → bytes."""
        try:
            found = self.fs.find(self._root, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise self.error(e, "listing") from None
        n = len(self._root) + 1
        return {
            p[n:]: int(info.get("size") or 0)
            for p, info in found.items()
            if p.startswith(self._root + "/") and info.get("type", "file") != "directory"
        }


class NamedErrorStore(WrapperStore[FsspecStore]):
    """zarr's fsspec store, whose failures are :class:`StorageError` naming bucket and key
    (zarr would pass on the backend's bare ``PermissionError: Forbidden``)."""

    def __init__(self, store: FsspecStore, location: ObjectLocation) -> None:
        super().__init__(store)
        self._location = location

    def _with_store(self, store: FsspecStore) -> NamedErrorStore:
        return type(self)(store, self._location)

    def _error(self, e: Exception, action: str, key: str) -> Exception:
        return e if isinstance(e, LogitStoreError) else self._location.error(e, action, key)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        try:
            return await self._store.get(key, prototype, byte_range)
        except Exception as e:
            raise self._error(e, "reading", key) from None

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        try:
            return await self._store.get_partial_values(prototype, key_ranges)
        except Exception as e:
            raise self._error(e, "reading", key_ranges[0][0] if key_ranges else "") from None

    async def exists(self, key: str) -> bool:
        try:
            return await self._store.exists(key)
        except Exception as e:
            raise self._error(e, "checking", key) from None

    async def set(self, key: str, value: Buffer) -> None:
        try:
            await self._store.set(key, value)
        except Exception as e:
            raise self._error(e, "writing", key) from None

    async def delete(self, key: str) -> None:
        try:
            await self._store.delete(key)
        except Exception as e:
            raise self._error(e, "deleting", key) from None

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        try:
            async for k in self._store.list_dir(prefix):
                yield k
        except Exception as e:
            raise self._error(e, "listing", prefix) from None
