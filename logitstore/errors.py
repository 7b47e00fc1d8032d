"""Errors raised by logitstore.

Every error is a :class:`LogitStoreError`, which subclasses :class:`ValueError`, so
callers can catch the whole family at once. Errors for things that are not there also
subclass the builtin a caller would expect::

    ValueError
     └── LogitStoreError
          ├── FormatError              bytes or metadata do not follow docs/FORMAT.md
          │    ├── UnsupportedVersionError  a format version this reader does not know
          │    ├── CorruptStoreError        a checksum, range or sum check failed
          │    ├── ProtocolError            a stream broke off or was damaged in transit
          │    └── StreamMismatchError      a stream is for another store or request
          ├── IncompleteStoreError     the writer is still running or was killed
          ├── StoreExistsError         (+ FileExistsError) refusing to overwrite a store
          ├── ResumeMismatchError      resuming with other data or settings than the store's
          ├── StoreNotFoundError       (+ FileNotFoundError) no store at that path
          ├── InputError               bad input (empty file, bad JSONL line, short document)
          ├── TeacherError             unusable teacher (vocab mismatch, NaN logits, ...)
          ├── PositionError            (+ IndexError) a position or range outside the store
          └── RemoteError              a server refused a request, or stayed unreachable
               └── StorageError        (+ OSError) object storage refused or failed a
                                       request (names the bucket, key and endpoint)

Messages say what was expected, what was found and what to do. All errors pickle, so
they cross DataLoader worker and process boundaries intact.
"""

from __future__ import annotations

__all__ = [
    "CorruptStoreError",
    "FormatError",
    "IncompleteStoreError",
    "InputError",
    "LogitStoreError",
    "PositionError",
    "ProtocolError",
    "RemoteError",
    "ResumeMismatchError",
    "StorageError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StreamMismatchError",
    "TeacherError",
    "UnsupportedVersionError",
]


class LogitStoreError(ValueError):
    """Base class of every error logitstore raises on purpose."""


class FormatError(LogitStoreError):
    """The store's bytes or metadata do not follow the format specification."""


class UnsupportedVersionError(FormatError):
    """The store was written in a format version this reader does not understand."""


class CorruptStoreError(FormatError):
    """A checksum, bounds or consistency check failed; the message names where."""


class IncompleteStoreError(LogitStoreError):
    """The store's writer has not finished (it is still running, or it was interrupted)."""


class StoreExistsError(LogitStoreError, FileExistsError):
    """A complete store already exists where a new one was to be written."""


class ResumeMismatchError(LogitStoreError):
    """An interrupted store was written from other data or settings than the resume asks for."""


class StoreNotFoundError(LogitStoreError, FileNotFoundError):
    """There is no logitstore store at the given location."""


class InputError(LogitStoreError):
    """The input data cannot be used (empty file, invalid JSONL line, too-short document...)."""


class TeacherError(LogitStoreError):
    """The teacher model cannot be used as asked, or produced invalid output."""


class PositionError(LogitStoreError, IndexError):
    """A position, sequence index or range lies outside the store."""


class ProtocolError(FormatError):
    """A stream broke off or was damaged in transit (truncated, corrupt): worth retrying."""


class StreamMismatchError(FormatError):
    """A stream is for another store or request than the one asked for: retrying will not
    help (was the store replaced on the server?)."""


class RemoteError(LogitStoreError):
    """A server refused a request, or could not be reached after every retry."""


class StorageError(RemoteError, OSError):
    """Object storage refused a request (no such bucket, access denied) or stayed unreachable
    after every retry; the message names the bucket, the key and the endpoint."""
