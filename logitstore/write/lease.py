"""One job per store in object storage: a lease object (FORMAT.md §6.6).

Object stores have no ``flock``, but they have conditional writes: the job that writes a store
puts ``.logitstore-writer.json`` under the store's prefix with ``If-None-Match: *``, so of two
jobs started on one store exactly one gets it; the other is refused with the holder's host,
process and the time its lease runs out. The holder renews the lease every quarter of its
length; a job that was killed stops renewing it, and once it has run out (default 60 s,
``LOGITSTORE_LEASE_SECONDS``) the next run takes it over and resumes. Leaving normally, or
with an error, deletes it, so a rerun resumes at once.

Expiry compares the holder's clock with the next job's: hosts must agree on the time to well
within the lease (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..errors import LogitStoreError, StoreExistsError
from ..format.objects import WRITER_KEY, ObjectLocation

__all__ = ["LEASE_ENV", "check_lease", "object_lease"]

# Stores whose lease this process held and lost (taken over, or run out while renewals
# failed), by URL: the writer checks before each shard (:func:`check_lease`).
_LOST: dict[str, str] = {}

#: seconds a writer's lease lasts without renewal
LEASE_ENV = "LOGITSTORE_LEASE_SECONDS"


def _lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise LogitStoreError(f"{LEASE_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


class _Lease:
    def __init__(self, loc: ObjectLocation, ttl: float) -> None:
        self.loc, self.ttl = loc, ttl
        self.job = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        return json.dumps(
            {
                "job": self.job,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + self.ttl,
            }
        ).encode()

    def acquire(self) -> None:
        if self.loc.write(WRITER_KEY, self.body(), create_only=True):
            return
        tagged = self.loc.read_tagged(WRITER_KEY)
        if tagged is None:  # released meanwhile
            if self.loc.write(WRITER_KEY, self.body(), create_only=True):
                return
            tagged = self.loc.read_tagged(WRITER_KEY)
        held = _parse(None if tagged is None else tagged[0])
        left = _seconds_left(held)
        if left > 0:
            raise self._refusal(held, left)
        # The holder stopped renewing (it was killed): take over, still one at a time. On S3
        # the put is conditioned on the run-out lease's ETag, so of two jobs that both saw it
        # run out exactly one takes it (a delete then a create would let the second delete
        # the first one's new lease and both would write).
        etag = None if tagged is None else tagged[1]
        if etag is not None and self.loc.scheme in ("s3", "s3a"):
            taken = self.loc.replace(WRITER_KEY, self.body(), etag)
        else:
            self.loc.delete(WRITER_KEY)
            taken = self.loc.write(WRITER_KEY, self.body(), create_only=True)
        if not taken:
            held = self.loc.read_json(WRITER_KEY)
            raise self._refusal(held, max(_seconds_left(held), 0.0))

    def _refusal(self, held: Any, left: float) -> StoreExistsError:
        who = (
            f"pid {held.get('pid')} on {held.get('host')}"
            if isinstance(held, dict)
            else "another process"
        )
        return StoreExistsError(
            f"another job is writing {self.loc.url!r} ({who}; its lease runs out in "
            f"{left:.0f} s); two writers of one store lose data. Wait for it to finish; if it "
            f"was killed, run this command again once the lease has run out to resume "
            f"(lease: {self.loc.url}/{WRITER_KEY}, length {LEASE_ENV}={self.ttl:g})"
        )

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="logitstore-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        until = time.time() + self.ttl  # when the lease last put runs out
        while not self._stop.wait(self.ttl / 4):
            with contextlib.suppress(LogitStoreError):  # a missed renewal is retried next time
                tagged = self.loc.read_tagged(WRITER_KEY)
                held = _parse(None if tagged is None else tagged[0])
                if not (isinstance(held, dict) and held.get("job") == self.job):
                    self._lose(f"another job took over its lease (now {held!r})")
                    return
                body, etag = self.body(), None if tagged is None else tagged[1]
                # On S3 the put is conditioned on the lease just read: a job taking it over
                # between the read and the put is not overwritten (the renewal fails instead).
                if etag is not None and self.loc.scheme in ("s3", "s3a"):
                    if not self.loc.replace(WRITER_KEY, body, etag):
                        self._lose("another job took over its lease while it was renewed")
                        return
                else:
                    self.loc.write(WRITER_KEY, body)
                until = json.loads(body)["expires"]
            if time.time() > until:  # another job may take it over any moment now
                self._lose(f"its lease ran out at {until:.0f} while renewals failed")
                return

    def _lose(self, why: str) -> None:
        _LOST[self.loc.url] = (
            f"this job stopped writing {self.loc.url!r}: {why}; two writers of one store lose "
            f"data. Committed shards are kept: once no other job writes the store, run the "
            f"same command again to resume (lease: {self.loc.url}/{WRITER_KEY})"
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if _LOST.pop(self.loc.url, None) is not None:
            return  # not ours any more: another job's lease is not deleted
        with contextlib.suppress(LogitStoreError):
            held = self.loc.read_json(WRITER_KEY)
            if isinstance(held, dict) and held.get("job") == self.job:
                self.loc.delete(WRITER_KEY)


def _parse(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def _seconds_left(held: Any) -> float:
    if not isinstance(held, dict) or not isinstance(held.get("expires"), int | float):
        return 0.0  # unreadable: treated as run out, so a damaged lease cannot block forever
    return float(held["expires"]) - time.time()


def check_lease(url: str) -> None:
    """Raise :class:`StoreExistsError` if this process held the lease of the store at
    ``url`` and lost it; a writer calls it before each shard."""
    why = _LOST.get(url)
    if why is not None:
        raise StoreExistsError(why)


@contextlib.contextmanager
def object_lease(url: str) -> Iterator[None]:
    """Hold the writer's lease of the store at ``url`` for the ``with`` block.

    Raises:
        StoreExistsError: another job holds a lease that has not run out.
        StorageError: the object store refused or failed a request.
    """
    lease = _Lease(ObjectLocation(url), _lease_seconds())
    lease.acquire()
    lease.start_renewing()
    try:
        yield
    finally:
        lease.release()
