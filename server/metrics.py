"""Request counts, bytes and latencies, rendered in the Prometheus text format:
:class:`Metrics`, the middleware that feeds it, and the ``/metrics`` route.

With ``--workers N`` each request reaches one of N processes, and a scrape reaches one of
them too. So that every scrape sees the whole server, each worker writes its counters to a
file in a directory the supervisor made (:data:`SHARED_ENV`), at most every
:data:`FLUSH_SECONDS`, and ``/metrics`` sums its own live counters with every other
worker's last file: the other workers' counts lag by at most that long. A worker that died
keeps its file, so counters never go backwards when uvicorn replaces it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "FLUSH_SECONDS",
    "SHARED_ENV",
    "Metrics",
    "Observe",
    "get_metrics",
    "mark_failed",
    "router",
]

_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
#: the directory the workers of one server share their counters in (``--workers`` > 1)
SHARED_ENV = "LOGITSTORE_SERVER_METRICS_DIR"
#: how often a worker writes its counters for the others (when they changed)
FLUSH_SECONDS = 0.5


def _escape(label: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """This process's counters; with ``shared`` (a directory), also every other worker's.

    Args:
        shared: the directory the workers of one server write their counters to, or
            ``None`` for a server of one process.
    """

    def __init__(self, shared: str | os.PathLike[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._bytes: defaultdict[str, int] = defaultdict(int)
        self._latency: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(_BUCKETS))
        self._latency_sum: defaultdict[str, float] = defaultdict(float)
        self._latency_count: defaultdict[str, int] = defaultdict(int)
        self._shared = Path(shared) if shared is not None else None
        self._pid = os.getpid()
        self._dirty = True  # the first flush announces this worker, even before a request
        self._stop = threading.Event()
        if self._shared is not None:
            threading.Thread(target=self._flusher, name="metrics-flush", daemon=True).start()

    def observe(self, route: str, status: int, nbytes: int, seconds: float) -> None:
        route = _escape(route)
        with self._lock:
            self._requests[route, status] += 1
            self._bytes[route] += nbytes
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    self._latency[route][i] += 1
            self._latency_sum[route] += seconds
            self._latency_count[route] += 1
            self._dirty = True

    def add_bytes(self, route: str, nbytes: int) -> None:
        """Bytes of a streamed body, counted as they are sent."""
        with self._lock:
            self._bytes[_escape(route)] += nbytes
            self._dirty = True

    # -- sharing between workers --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's counters as JSON-able data."""
        with self._lock:
            return {
                "pid": self._pid,
                "requests": [[r, s, n] for (r, s), n in self._requests.items()],
                "bytes": dict(self._bytes),
                "latency": {r: list(b) for r, b in self._latency.items()},
                "latency_sum": dict(self._latency_sum),
                "latency_count": dict(self._latency_count),
            }

    def flush(self) -> None:
        """Write this process's counters for the other workers (write, then rename: a
        reader never sees half a file)."""
        if self._shared is None:
            return
        with self._lock:
            self._dirty = False
        data = json.dumps(self.snapshot())
        final = self._shared / f"worker-{self._pid}.json"
        tmp = final.with_suffix(".tmp")
        try:
            tmp.write_text(data)
            os.replace(tmp, final)
        except OSError:  # the supervisor is gone and took the directory: nothing to share
            self._stop.set()

    def close(self) -> None:
        """Write the counters one last time and stop the flushing thread."""
        self._stop.set()
        self.flush()

    def _flusher(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            if self._dirty:
                self.flush()

    def _workers(self) -> list[dict[str, Any]]:
        """Every worker's counters: this one's live, the others' from their last file."""
        mine = self.snapshot()
        if self._shared is None:
            return [mine]
        out = [mine]
        try:
            files = sorted(self._shared.glob("worker-*.json"))
        except OSError:
            files = []
        for f in files:
            if f.name == f"worker-{self._pid}.json":
                continue
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):  # replaced while read: counted at the next scrape
                continue
        return out

    # -- the text format ----------------------------------------------------------------------

    def render(self) -> str:
        workers = self._workers()
        requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        sent: defaultdict[str, int] = defaultdict(int)
        latency: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(_BUCKETS))
        latency_sum: defaultdict[str, float] = defaultdict(float)
        latency_count: defaultdict[str, int] = defaultdict(int)
        for w in workers:
            for route, status, n in w["requests"]:
                requests[route, int(status)] += n
            for route, n in w["bytes"].items():
                sent[route] += n
            for route, buckets in w["latency"].items():
                latency[route] = [a + b for a, b in zip(latency[route], buckets, strict=True)]
            for route, t in w["latency_sum"].items():
                latency_sum[route] += t
            for route, n in w["latency_count"].items():
                latency_count[route] += n
        lines = [
            "# HELP logitstore_requests_total HTTP requests by route and status.",
            "# TYPE logitstore_requests_total counter",
        ]
        for (route, status), n in sorted(requests.items()):
            lines.append(f'logitstore_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP logitstore_response_bytes_total Bytes of response bodies sent.",
            "# TYPE logitstore_response_bytes_total counter",
        ]
        for route, n in sorted(sent.items()):
            lines.append(f'logitstore_response_bytes_total{{route="{route}"}} {n}')
        lines += [
            "# HELP logitstore_request_seconds Time to the response's headers.",
            "# TYPE logitstore_request_seconds histogram",
        ]
        for route in sorted(latency_count):
            for bound, n in zip(_BUCKETS, latency[route], strict=True):
                lines.append(
                    f'logitstore_request_seconds_bucket{{route="{route}",le="{bound}"}} {n}'
                )
            count = latency_count[route]
            lines.append(f'logitstore_request_seconds_bucket{{route="{route}",le="+Inf"}} {count}')
            lines.append(f'logitstore_request_seconds_sum{{route="{route}"}} {latency_sum[route]}')
            lines.append(f'logitstore_request_seconds_count{{route="{route}"}} {count}')
        lines += [
            "# HELP logitstore_worker_processes Server processes whose counts the above sum "
            "(workers replaced after a crash included).",
            "# TYPE logitstore_worker_processes gauge",
            f"logitstore_worker_processes {len(workers)}",
            "# HELP logitstore_worker_requests_total Requests answered, by worker process id.",
            "# TYPE logitstore_worker_requests_total counter",
        ]
        for w in sorted(workers, key=lambda w: int(w["pid"])):
            n = sum(int(c[2]) for c in w["requests"])
            lines.append(f'logitstore_worker_requests_total{{worker="{int(w["pid"])}"}} {n}')
        return "\n".join(lines) + "\n"


#: the outcome of the request this task serves: ``[status]``, set by :class:`Observe`
_outcome: ContextVar[list[int] | None] = ContextVar("logitstore_outcome", default=None)


def mark_failed(status: int = 500) -> None:
    """Count the current request as ``status``: a streamed body that failed after its
    headers (a 200) went out calls this, so ``/metrics`` shows the failure."""
    box = _outcome.get()
    if box is not None:
        box[0] = status


class Observe:
    """Times and counts every request under its route's template (``/v1/stores/{name}``),
    never its path: paths are the client's to choose and must not mint new series.

    A request is counted when its response ends, with the status it ended with (see
    :func:`mark_failed`); its latency is the time to the response's headers."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        box = [500]  # an app that never answers failed
        seen: dict[str, float] = {}
        token = _outcome.set(box)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                box[0] = int(message["status"])
                seen["latency"] = time.perf_counter() - t0
                for k, v in message.get("headers", ()):
                    if k.lower() == b"content-length":
                        seen["size"] = int(v)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            _outcome.reset(token)
            template = getattr(scope.get("route"), "path", "unmatched")
            latency = seen.get("latency", time.perf_counter() - t0)
            self.metrics.observe(template, box[0], int(seen.get("size", 0)), latency)


async def get_metrics(request: Request) -> Metrics:
    """The app's :class:`Metrics` (a FastAPI dependency)."""
    metrics: Metrics = request.app.state.metrics
    return metrics


router = APIRouter()


@router.get("/metrics", summary="Prometheus text format")
async def prometheus(metrics: Annotated[Metrics, Depends(get_metrics)]) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
