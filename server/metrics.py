"""Request counts, bytes and latencies, rendered in the Prometheus text format (per process):
:class:`Metrics`, the middleware that feeds it, and the ``/metrics`` route."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextvars import ContextVar
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "Observe", "get_metrics", "mark_failed", "router"]

_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


def _escape(label: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._bytes: defaultdict[str, int] = defaultdict(int)
        self._latency: defaultdict[str, list[int]] = defaultdict(lambda: [0] * len(_BUCKETS))
        self._latency_sum: defaultdict[str, float] = defaultdict(float)
        self._latency_count: defaultdict[str, int] = defaultdict(int)

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

    def add_bytes(self, route: str, nbytes: int) -> None:
        """Bytes of a streamed body, counted as they are sent."""
        with self._lock:
            self._bytes[_escape(route)] += nbytes

    def render(self) -> str:
        lines = [
            "# HELP logitstore_requests_total HTTP requests by route and status.",
            "# TYPE logitstore_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self._requests.items()):
                lines.append(f'logitstore_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP logitstore_response_bytes_total Bytes of response bodies sent.",
                "# TYPE logitstore_response_bytes_total counter",
            ]
            for route, n in sorted(self._bytes.items()):
                lines.append(f'logitstore_response_bytes_total{{route="{route}"}} {n}')
            lines += [
                "# HELP logitstore_request_seconds Time to the response's headers.",
                "# TYPE logitstore_request_seconds histogram",
            ]
            for route in sorted(self._latency_count):
                for bound, n in zip(_BUCKETS, self._latency[route], strict=True):
                    lines.append(
                        f'logitstore_request_seconds_bucket{{route="{route}",le="{bound}"}} {n}'
                    )
                count = self._latency_count[route]
                lines.append(
                    f'logitstore_request_seconds_bucket{{route="{route}",le="+Inf"}} {count}'
                )
                lines.append(
                    f'logitstore_request_seconds_sum{{route="{route}"}} {self._latency_sum[route]}'
                )
                lines.append(f'logitstore_request_seconds_count{{route="{route}"}} {count}')
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
