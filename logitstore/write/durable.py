"""Durability of a commit (docs/FORMAT.md §6.4): file data and directory entries forced to
stable storage with ``fsync`` before the step that depends on them.

A rename makes a file appear whole, but only ``fsync`` of the file and then of its directory
makes it survive a power loss: without it, a commit record can reach the disk before the
shard it vouches for. The writer calls :func:`sync_file` on every shard file before writing
the shard's commit record, on the commit record itself, and on the group metadata when the
store is marked complete; :func:`sync_tree` once on a newly created store. Object storage
needs none of this (a PUT is durable when it returns): those calls do nothing for URLs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["local_key", "sync_dir", "sync_file", "sync_tree"]


def local_key(root: Path | str, key: str) -> Path | str:
    """The file of ``key`` in a local store; ``""`` (nothing to sync) for a URL."""
    return Path(root, key) if isinstance(root, Path) else ""


def sync_dir(path: Path) -> None:
    """``fsync`` a directory, so the entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path | str) -> None:
    """``fsync`` a file's data, then its directory's entry for it. No-op for URLs."""
    if not isinstance(path, Path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(path.parent)


def sync_tree(root: Path | str) -> None:
    """``fsync`` every file and directory under ``root``, then ``root``'s own entry in its
    parent. No-op for URLs."""
    if not isinstance(root, Path):
        return
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(dirpath))
    sync_dir(root.parent)
