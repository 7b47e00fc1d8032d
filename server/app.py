"""The HTTP service: a thin FastAPI app over the public logitstore reader (docs/PROTOCOL.md).

Stateless and read-only: the set of stores is fixed when the app is made, requests never
name a file-system path, and every bad request is a 4xx with a JSON body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import logitstore
from logitstore.format.protocol import encode_block, encode_end, encode_header

from .metrics import Metrics

__all__ = ["ServerConfig", "app_from_env", "create_app"]

CONFIG_ENV = "LOGITSTORE_SERVER_CONFIG"
_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


@dataclass(frozen=True)
class ServerConfig:
    """What a server serves. ``stores`` maps URL names to store directories."""

    stores: dict[str, str]
    tokens: tuple[str, ...] = ()
    max_positions: int = 1 << 24  # per request: 413 above (PROTOCOL.md §4)
    block_positions: int = 1 << 14  # rows per streamed block; memory is O(2 blocks)
    public_health: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "stores": self.stores,
                "tokens": list(self.tokens),
                "max_positions": self.max_positions,
                "block_positions": self.block_positions,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        d = json.loads(text)
        return cls(
            stores=d["stores"],
            tokens=tuple(d.get("tokens", ())),
            max_positions=d.get("max_positions", 1 << 24),
            block_positions=d.get("block_positions", 1 << 14),
        )


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def create_app(config: ServerConfig) -> FastAPI:
    """The app for ``config``; opens every store now (a store that cannot be opened stops
    the server from starting, with the reader's error)."""
    stores: dict[str, logitstore.LogitStore] = {}
    for name, path in config.stores.items():
        store = logitstore.open(path)
        assert isinstance(store, logitstore.LogitStore)
        stores[name] = store
    # Served stores are complete and read-only: their info (which walks every file to count
    # bytes on disk) is computed once, not on every metadata request.
    infos: dict[str, dict[str, Any]] = {}
    for name, store in stores.items():
        info = logitstore.store_info(store)
        info.pop("path")  # the server's file system is its own business
        infos[name] = info | {"server": {"max_positions": config.max_positions}}
    metrics = Metrics()
    app = FastAPI(
        title="logitstore",
        version=logitstore.__version__,
        description="Teacher distributions for knowledge distillation, streamed. "
        "Wire format: docs/PROTOCOL.md.",
    )

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        route = request.scope.get("route")
        if config.tokens and not (request.url.path == "/v1/health" and config.public_health):
            denied = _check_token(request.headers.get("authorization"), config.tokens)
            if denied is not None:  # one fixed label: request paths must not mint new series
                metrics.observe("unauthenticated", denied.status_code, 0, time.perf_counter() - t0)
                return denied
        response: Response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        size = int(response.headers.get("content-length", 0))
        metrics.observe(template, response.status_code, size, time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(400, "bad_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(logitstore.LogitStoreError)
    async def store_error(request: Request, exc: logitstore.LogitStoreError) -> JSONResponse:
        if isinstance(exc, logitstore.PositionError):
            return _error(416, "range_not_satisfiable", str(exc))
        return _error(500, "store_error", str(exc))  # damage on disk: the operator must look

    def get_store(name: str) -> logitstore.LogitStore:
        store = stores.get(name)
        if store is None:
            raise ApiError(404, "unknown_store", f"no store named {name!r}; see /v1/stores")
        return store

    def check_range(store: logitstore.LogitStore, start: int, stop: int) -> None:
        if start < 0 or stop < start:
            raise ApiError(400, "bad_range", f"expected 0 <= start <= stop, got [{start}, {stop})")
        if stop > len(store):
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"stop {stop} is past the end of the store ({len(store)} positions)",
            )
        if stop - start > config.max_positions:
            raise ApiError(
                413,
                "range_too_large",
                f"{stop - start} positions asked for; at most {config.max_positions} "
                "per request: split the range",
            )

    def stream(store: logitstore.LogitStore, start: int, stop: int) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield encode_header(store.metadata, start, stop)
            step = config.block_positions
            read = lambda a: store.read_stored(a, min(a + step, stop))  # noqa: E731
            pending = (
                asyncio.ensure_future(asyncio.to_thread(read, start)) if stop > start else None
            )
            try:
                for a in range(start, stop, step):
                    assert pending is not None
                    rows = await pending
                    # Read the next block while this one goes out: bounded at two blocks.
                    nxt = a + step
                    pending = (
                        asyncio.ensure_future(asyncio.to_thread(read, nxt)) if nxt < stop else None
                    )
                    block = encode_block(a, rows)
                    metrics.add_bytes("/v1/stores/{name}/positions", len(block))
                    yield block
                yield encode_end(stop, stop - start)
            finally:  # the client went away (or a read failed): drop the read-ahead
                if pending is not None:
                    pending.cancel()

        return StreamingResponse(
            body(),
            media_type="application/x-logitstore-stream",
            headers={"X-Logitstore-Positions": f"{start}-{stop}"},
        )

    @app.get("/v1/health", summary="Liveness")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "stores": len(stores)}

    @app.get("/v1/stores", summary="The stores this server serves")
    async def list_stores(request: Request) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        return {
            "stores": [
                {
                    "name": n,
                    "url": f"{base}/v1/stores/{n}",
                    "num_positions": len(s),
                    "encoding": s.encoding.to_dict(),
                }
                for n, s in stores.items()
            ]
        }

    @app.get("/v1/stores/{name}", summary="A store's metadata (as `logitstore info --json`)")
    async def store_metadata(name: str) -> dict[str, Any]:
        get_store(name)  # 404 for unknown names
        return infos[name]

    @app.get("/v1/stores/{name}/offsets", summary="Sequence boundaries, little-endian int64")
    async def offsets(name: str) -> Response:
        data = get_store(name).offsets.astype("<i8").tobytes()
        return Response(data, media_type="application/octet-stream")

    @app.get("/v1/stores/{name}/tokenizer", summary="The teacher's tokenizer.json")
    async def tokenizer(name: str) -> Response:
        tok = get_store(name).tokenizer()
        if tok is None:
            raise ApiError(404, "no_tokenizer", f"store {name!r} holds no tokenizer")
        return Response(tok.to_str(), media_type="application/json")

    @app.get("/v1/stores/{name}/positions", summary="Positions [start, stop), streamed")
    async def positions(name: str, start: int, stop: int) -> StreamingResponse:
        store = get_store(name)
        check_range(store, start, stop)
        return stream(store, start, stop)

    @app.get("/v1/stores/{name}/sequences/{index}", summary="One sequence, streamed")
    async def sequence(name: str, index: int) -> StreamingResponse:
        store = get_store(name)
        if not 0 <= index < store.num_sequences:
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"sequence {index} is out of range: {store.num_sequences} sequences",
            )
        start, stop = int(store.offsets[index]), int(store.offsets[index + 1])
        check_range(store, start, stop)
        return stream(store, start, stop)

    @app.api_route(
        "/v1/stores/{name}/zarr/{key:path}",
        methods=["GET", "HEAD"],
        summary="Raw store keys, with Range, ETag and Last-Modified (zarr over HTTP)",
    )
    async def raw(name: str, key: str, request: Request) -> Response:
        root = Path(get_store(name).path).resolve()
        if (
            len(key) > 512
            or not _KEY.match(key)
            or any(part in (".", "..") for part in key.split("/"))
        ):
            raise ApiError(
                400,
                "bad_key",
                "keys are relative store paths of at most 512 "
                "characters, without '.' or '..' segments",
            )
        try:
            path = (root / key).resolve()
            found = path.is_relative_to(root) and path.is_file()
            stat = path.stat() if found else None
        except OSError:  # e.g. a name too long for the file system
            stat = None
        if stat is None or path.name.endswith(".partial"):
            raise ApiError(404, "no_such_key", f"store {name!r} has no key {key!r}")
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        headers = {
            "ETag": etag,
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
        }
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        size = stat.st_size
        span = _parse_range(request.headers.get("range"), size)
        if span is None:
            data = b"" if request.method == "HEAD" else await asyncio.to_thread(path.read_bytes)
            return Response(
                data,
                200,
                headers={**headers, "Content-Length": str(size)},
                media_type="application/octet-stream",
            )
        first, last = span
        if request.method == "HEAD":
            data = b""
        else:
            data = await asyncio.to_thread(_read_span, path, first, last)
        headers |= {
            "Content-Range": f"bytes {first}-{last}/{size}",
            "Content-Length": str(last - first + 1),
        }
        return Response(data, 206, headers=headers, media_type="application/octet-stream")

    @app.get("/metrics", summary="Prometheus text format")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _read_span(path: Path, first: int, last: int) -> bytes:
    with path.open("rb") as f:
        f.seek(first)
        return f.read(last - first + 1)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → inclusive (first, last); ``None`` for no
    (or an ignorable multi-range) header; 416 when nothing of the file is asked for."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None:
        if header.strip().startswith("bytes=") and "," in header:
            return None  # several ranges: RFC 9110 lets a server send the whole file
        raise ApiError(400, "bad_range_header", f"cannot parse Range header {header!r}")
    a, b = m.groups()
    if not a and not b:
        raise ApiError(400, "bad_range_header", f"cannot parse Range header {header!r}")
    if not a:  # suffix: the last b bytes
        n = int(b)
        if n == 0 or size == 0:
            raise ApiError(416, "range_not_satisfiable", f"empty suffix of a {size}-byte key")
        return max(0, size - n), size - 1
    first = int(a)
    last = min(int(b), size - 1) if b else size - 1
    if first >= size or (b and int(b) < first):
        raise ApiError(
            416, "range_not_satisfiable", f"range {header!r} is outside the key's {size} bytes"
        )
    return first, last


def _check_token(header: str | None, tokens: tuple[str, ...]) -> JSONResponse | None:
    if not header or not header.lower().startswith("bearer "):
        return _error(
            401,
            "unauthorized",
            "this server needs 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": "Bearer"},
        )
    given = header[7:].strip().encode()
    ok = False
    for token in tokens:  # compare with every token, in constant time, whatever matches
        ok |= hmac.compare_digest(given, token.encode())
    if not ok:
        return _error(403, "forbidden", "the bearer token is not valid for this server")
    return None


def app_from_env() -> FastAPI:
    """uvicorn factory (``server.app:app_from_env``): the config travels in an environment
    variable, so ``--workers N`` processes all build the same app."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with `logitstore serve`")
    return create_app(ServerConfig.from_json(text))
