"""The HTTP service: a thin FastAPI app over the public logitstore reader (docs/PROTOCOL.md).

Stateless and read-only: the set of stores is fixed when the app is made, requests never
name a file-system path, and every bad request is a 4xx with a JSON body. The parts:

    config   ServerConfig: what is served (the one schema; JSON to worker processes)
    deps     the stores, a store by name, checked position ranges (FastAPI dependencies)
    stores   the /v1 routes; stream: the streamed body with one block read ahead
    raw      raw store keys with Range and ETag (zarr over HTTP)
    trl      TRL's POST /get_sequence_logprobs/, answered from stores by token content;
             trl_vllm: the same for TRL >= 1.11, which asks vLLM's /v1/completions
    errors   the one table of error codes and HTTP statuses, and its exception handlers
    auth     bearer tokens; metrics: Prometheus counters, their middleware and /metrics
    guard    the HTTP protocol with limits on headers: size, time, connections waiting
    view     the store browser page and its JSON; measures: what it shows, computed
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext

import uvicorn
from fastapi import FastAPI

import logitstore

from . import errors, guard, raw, stores, trl, trl_vllm, view
from .auth import BearerAuth
from .config import CONFIG_ENV, ServerConfig
from .deps import State
from .metrics import SHARED_ENV, Metrics, Observe
from .metrics import router as metrics_router

__all__ = ["ServerConfig", "app_from_env", "create_app", "serve"]

#: what uvicorn imports in every worker process
FACTORY = "logitstore_server.app:app_from_env"


def create_app(config: ServerConfig, *, shared_metrics: str | None = None) -> FastAPI:
    """The app for ``config``; opens every store now (a store that cannot be opened stops
    the server from starting, with the reader's error).

    ``shared_metrics``: the directory in which the worker processes of one server share
    their counters, so that ``/metrics`` answers for all of them (server/metrics.py)."""
    state = State.open(config)
    metrics = Metrics(shared_metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        metrics.close()  # a stopping worker's last counts stay in the sum

    app = FastAPI(
        title="logitstore",
        version=logitstore.__version__,
        description="Teacher distributions for knowledge distillation, streamed. "
        "Wire format: docs/PROTOCOL.md.",
        lifespan=lifespan,
    )
    app.state.logitstore = state
    app.state.metrics = metrics
    errors.install(app)
    app.add_middleware(Observe, metrics=metrics)
    if config.tokens:  # outermost: a refused request reaches nothing else
        app.add_middleware(BearerAuth, tokens=config.tokens, metrics=metrics)
    app.include_router(stores.router)
    app.include_router(raw.router)
    app.include_router(trl.router)
    app.include_router(trl_vllm.router)
    app.include_router(metrics_router)
    app.include_router(view.router)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (:data:`FACTORY`): the config travels in an environment variable,
    so ``--workers N`` processes all build the same app."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with `logitstore serve`")
    return create_app(ServerConfig.from_json(text), shared_metrics=os.environ.get(SHARED_ENV))


def serve(
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
) -> None:
    """Serve ``config`` with uvicorn until interrupted; prints each store's URL first.

    With ``config.workers`` > 1, uvicorn's supervisor binds the socket and starts that many
    worker processes, which accept connections from it in turn and are replaced if they die;
    each builds the app from :data:`CONFIG_ENV`, and they share their counters through a
    private temporary directory (removed when the server stops).

    Example:
        >>> serve(ServerConfig.from_cli(["teacher.zarr"]), port=8000)
        serving /abs/teacher.zarr at http://127.0.0.1:8000/v1/stores/teacher.zarr
    """
    os.environ[CONFIG_ENV] = config.to_json()  # no tokens: workers read --token-file
    guard.raise_fd_limit()  # connections are files; workers inherit the limit
    shown = f"[{host}]" if ":" in host else host
    for name, path in config.stores.items():
        print(f"serving {path} at http://{shown}:{port}/v1/stores/{name}", flush=True)
    if config.workers > 1:
        print(f"{config.workers} worker processes share the port", flush=True)
    print(f"browse the stores at http://{shown}:{port}/", flush=True)
    shared: AbstractContextManager[str | None] = (
        tempfile.TemporaryDirectory(prefix="logitstore-metrics-")
        if config.workers > 1
        else nullcontext(None)
    )
    with shared as directory:
        if directory is not None:
            os.environ[SHARED_ENV] = directory
        else:
            os.environ.pop(SHARED_ENV, None)
        uvicorn.run(
            FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=config.workers,
            log_level=log_level,
            loop="auto",
            http=guard.PROTOCOL,  # header size and time limits (server/guard.py)
            timeout_keep_alive=int(guard.KEEP_ALIVE),
        )
