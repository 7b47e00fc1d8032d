"""What a server serves: :class:`ServerConfig`, the one schema of a server's settings.

``logitstore serve`` builds it from its arguments (:meth:`ServerConfig.from_cli`), and it
reaches uvicorn's worker processes as JSON in the environment variable :data:`CONFIG_ENV` —
without the tokens: a process's environment is readable in ``/proc/PID/environ`` and is
inherited by every child, so the JSON names the token file, which each worker reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import logitstore

__all__ = ["CONFIG_ENV", "ServerConfig", "check_workers", "max_workers"]

#: carries a :class:`ServerConfig` as JSON to every worker process (``--workers N``)
CONFIG_ENV = "LOGITSTORE_SERVER_CONFIG"


@dataclass(frozen=True)
class ServerConfig:
    """What a server serves, and its limits (docs/PROTOCOL.md).

    Attributes:
        stores: URL name → store directory.
        tokens: the bearer tokens a request may carry; none: requests need no token.
        max_positions: most positions one request may ask for (413 ``range_too_large`` above).
        block_positions: rows per streamed block; a stream holds about two blocks in memory.
        token_file: where ``tokens`` were read from; worker processes read them there again.
        workers: server processes sharing the listening socket (``--workers``): 1 to
            :func:`max_workers`.
    """

    stores: dict[str, str]
    tokens: tuple[str, ...] = ()
    max_positions: int = 1 << 24
    block_positions: int = 1 << 14
    token_file: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        for option in ("max_positions", "block_positions"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + option.replace("_", "-")
                raise logitstore.LogitStoreError(
                    f"{flag} must be a positive number of positions, got {value!r}"
                )
        check_workers(self.workers)

    @classmethod
    def from_cli(
        cls,
        stores: Iterable[str | os.PathLike[str]],
        *,
        token_file: str | os.PathLike[str] | None = None,
        max_positions: int = 1 << 24,
        block_positions: int = 1 << 14,
        workers: int = 1,
    ) -> ServerConfig:
        """The config for serving the store directories ``stores``, each under its
        directory's name, checked before any server starts.

        Every store is opened once here, so a missing, incomplete or damaged store stops
        the command with the reader's error instead of failing requests later.

        Args:
            stores: store directories or object-storage URLs (``s3://bucket/prefix/x.zarr``);
                the URL name of each is its last component.
            token_file: a file of bearer tokens, one per line (``None``: no token needed).
            max_positions, block_positions, workers: as the attributes.

        Raises:
            StoreNotFoundError, IncompleteStoreError, FormatError: a store cannot be served.
            LogitStoreError: two stores have the same directory name, ``token_file``
                cannot be read or holds no token, a limit is not positive, or ``workers``
                is outside 1 to :func:`max_workers`.

        Example:
            >>> config = ServerConfig.from_cli(["runs/teacher.zarr"], token_file="tokens")
            >>> config.stores          # {"teacher.zarr": "/abs/runs/teacher.zarr"}
        """
        check_workers(workers)  # before the stores are opened: a typo fails at once
        named: dict[str, str] = {}
        for path in stores:
            opened = logitstore.LogitStore(path)  # refuses incomplete or damaged metadata now
            # A directory by its absolute path; an object-storage URL (s3://...) as it is.
            where = opened.path if isinstance(opened.path, str) else str(Path(path).resolve())
            name = where.rsplit("/", 1)[-1]
            if name in named:
                raise logitstore.LogitStoreError(
                    f"two stores are named {name!r} (the directory name is the URL "
                    "name); rename one"
                )
            named[name] = where
        tokens = _read_tokens(token_file) if token_file else ()
        resolved_file = str(Path(token_file).resolve()) if token_file else None
        return cls(named, tokens, max_positions, block_positions, resolved_file, workers)

    def to_json(self) -> str:
        """The config as JSON for worker processes: never the tokens themselves, only the
        file they are read from (a config with tokens but no file cannot be handed over)."""
        if self.tokens and not self.token_file:
            raise logitstore.LogitStoreError(
                "a server with tokens hands them to its workers through --token-file; "
                "build the config with ServerConfig.from_cli(token_file=...)"
            )
        return json.dumps(
            {
                "stores": self.stores,
                "token_file": self.token_file,
                "max_positions": self.max_positions,
                "block_positions": self.block_positions,
                "workers": self.workers,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        d = json.loads(text)
        token_file = d.get("token_file")
        return cls(
            stores=d["stores"],
            tokens=_read_tokens(token_file) if token_file else (),
            max_positions=d.get("max_positions", cls.max_positions),
            block_positions=d.get("block_positions", cls.block_positions),
            token_file=token_file,
            workers=d.get("workers", 1),
        )


def max_workers() -> int:
    """The most ``--workers`` this machine accepts: 4 per core this process may run on.
    Processes beyond the cores add memory (each opens every store) and no speed."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return 4 * cores


def check_workers(workers: object) -> None:
    """Refuse a ``--workers`` value outside 1 to :func:`max_workers`, saying why.

    Raises:
        LogitStoreError: ``workers`` is not such a number.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise logitstore.LogitStoreError(
            f"--workers must be a number of server processes, at least 1; got {workers!r}"
        )
    if workers > (most := max_workers()):
        raise logitstore.LogitStoreError(
            f"--workers {workers} is more than {most} (4 per core here): processes beyond the "
            "cores add memory (each opens every store) and no speed; use fewer, or run "
            "replicas on more machines behind a load balancer"
        )


def _read_tokens(token_file: str | os.PathLike[str]) -> tuple[str, ...]:
    try:
        lines = Path(token_file).read_text().splitlines()
    except OSError as e:
        raise logitstore.LogitStoreError(f"cannot read --token-file: {e}") from None
    tokens = tuple(t.strip() for t in lines if t.strip())
    if not tokens:
        raise logitstore.LogitStoreError(
            f"--token-file {os.fspath(token_file)} holds no token (one per line)"
        )
    return tokens
