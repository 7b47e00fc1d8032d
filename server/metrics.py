"""Request counts, bytes and latencies, rendered in the Prometheus text format (per process)."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Metrics"]

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
