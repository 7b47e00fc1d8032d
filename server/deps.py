"""What route handlers depend on (FastAPI ``Depends``): the server's stores, a store by name
(404 ``unknown_store``) and checked position ranges (400 ``bad_range``, 416
``range_not_satisfiable``, 413 ``range_too_large``).

A dependency that takes query parameters declares them itself, so FastAPI parses them (400
``bad_request``) before the store is looked up: the order of refusals PROTOCOL.md §4 implies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

import logitstore
from logitstore.read.store import check_range

from .config import ServerConfig
from .errors import ApiError

__all__ = ["Served", "Span", "State", "get_state", "get_store", "position_range", "sequence_range"]


@dataclass(frozen=True)
class Served:
    """A store as served: ``info`` is computed once, at start (it walks every file to count
    bytes on disk); served stores are complete and read-only, so it does not change."""

    name: str
    store: logitstore.LogitStore
    info: dict[str, Any]


@dataclass(frozen=True)
class State:
    """The app's stores (fixed when it is made: requests never name a file-system path)."""

    config: ServerConfig
    stores: dict[str, Served]

    @classmethod
    def open(cls, config: ServerConfig) -> State:
        """Open every store of ``config`` now.

        Raises:
            LogitStoreError: a store cannot be opened (the server does not start).
        """
        stores = {}
        for name, path in config.stores.items():
            store = logitstore.LogitStore(path)
            info = logitstore.store_info(store)
            info.pop("path")  # the server's file system is its own business
            info |= {"server": {"max_positions": config.max_positions}}
            stores[name] = Served(name, store, info)
        return cls(config, stores)

    def get(self, name: str) -> Served:
        served = self.stores.get(name)
        if served is None:
            raise ApiError("unknown_store", f"no store named {name!r}; see /v1/stores")
        return served


@dataclass(frozen=True)
class Span:
    """Positions ``[start, stop)`` of ``store``, checked: what one stream sends."""

    store: logitstore.LogitStore
    start: int
    stop: int


async def get_state(request: Request) -> State:
    state: State = request.app.state.logitstore
    return state


AppState = Annotated[State, Depends(get_state)]


async def get_store(name: str, state: AppState) -> Served:
    """The store named in the path. Raises: ApiError ``unknown_store``."""
    return state.get(name)


async def position_range(name: str, start: int, stop: int, state: AppState) -> Span:
    """``?start=&stop=`` of the store named in the path, checked."""
    return _checked(state, state.get(name).store, start, stop)


async def sequence_range(name: str, index: int, state: AppState) -> Span:
    """The positions of sequence ``index`` of the store named in the path, checked."""
    store = state.get(name).store
    if not 0 <= index < store.num_sequences:
        raise ApiError(
            "range_not_satisfiable",
            f"sequence {index} is out of range: {store.num_sequences} sequences",
        )
    return _checked(state, store, int(store.offsets[index]), int(store.offsets[index + 1]))


def _checked(state: State, store: logitstore.LogitStore, start: int, stop: int) -> Span:
    # The reader's check decides whether the range is in the store; the wire code says whose
    # mistake it is: no range at all (400) or a range past this store's end (416).
    try:
        check_range(start, stop, len(store))
    except logitstore.PositionError:
        if start < 0 or stop < start:
            raise ApiError(
                "bad_range", f"expected 0 <= start <= stop, got [{start}, {stop})"
            ) from None
        raise ApiError(
            "range_not_satisfiable",
            f"stop {stop} is past the end of the store ({len(store)} positions)",
        ) from None
    limit = state.config.max_positions
    if stop - start > limit:
        raise ApiError(
            "range_too_large",
            f"{stop - start} positions asked for; at most {limit} per request: split the range",
        )
    return Span(store, start, stop)
