"""``logitstore copy``: move a store between local disk and object storage."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import EPILOG

__all__ = ["add_parsers"]


def _copy(args: argparse.Namespace) -> int:
    from ..tools.copy import copy_store
    from ..write.lock import store_lock

    # The destination's lock (a lease in object storage), as a writer holds it: a copy never
    # replaces a store a running job writes, and two copies to one place do not interleave.
    with store_lock(args.dst):
        report = copy_store(
            args.src,
            args.dst,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.no_progress,
        )
    kept = report.keys - report.copied
    print(
        f"copied {report.copied} of {report.keys} keys ({report.bytes_copied / 1e6:.1f} MB, "
        f"{report.mb_per_s:.1f} MB/s; {kept} already there) to {report.dst}; verified",
        file=sys.stderr,
    )
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``copy`` on the subparsers ``sub``."""
    cp = sub.add_parser(
        "copy",
        help="copy a store between local disk and object storage (resumable, verified)",
        description="Copy the complete store SRC to DST: a directory or an object-storage "
        "URL (s3://bucket/prefix/store.zarr; credentials and endpoint from the standard AWS "
        "environment, e.g. AWS_PROFILE or AWS_ENDPOINT_URL), either way. Each file or object "
        "lands whole and the store's zarr.json last, so an interrupted copy never reads as a "
        "store; the same command resumes it, keeping what is already there. The copy is "
        "read back and verified at the end (checksums, invariants, identity).",
        epilog=EPILOG,
    )
    cp.add_argument("src", metavar="SRC", help="the store to copy (directory or URL)")
    cp.add_argument("dst", metavar="DST", help="where the copy goes (directory or URL)")
    cp.add_argument(
        "--overwrite", action="store_true", help="replace a store of other contents at DST"
    )
    cp.add_argument(
        "--workers", type=int, default=8, help="files or objects in flight at once (default 8)"
    )
    cp.add_argument("--no-progress", action="store_true", help="no progress bar")
    cp.set_defaults(func=_copy)
