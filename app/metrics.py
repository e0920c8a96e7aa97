"""Prometheus metrics: request latency, search latency per stage, index size and place, jobs by state."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per app, so several apps in one process (tests) never clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "tvs_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.search_stage = Histogram(
            "tvs_search_stage_seconds",
            "Search latency per stage (encode, faiss, catalog, tokens, rerank, total), per batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.search_batch_size = Histogram(
            "tvs_search_batch_size",
            "Queries per micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.searches = Counter("tvs_searches", "Search queries answered", registry=self.registry)
        self.index_size = Gauge(
            "tvs_index_size", "Segments in this process's vector index", registry=self.registry
        )
        self.index_info = Gauge(
            "tvs_index_info",
            "1 for the vector index's device (cpu, cuda:N) and FAISS factory",
            ["device", "factory"],
            registry=self.registry,
        )
        self.jobs = Gauge("tvs_jobs", "Ingestion jobs by state", ["state"], registry=self.registry)
        self.feed_lag_seconds = Gauge(
            "tvs_feed_lag_seconds",
            "How long the oldest change-feed row this process has not applied has been waiting (0: caught up)",
            registry=self.registry,
        )
        self.feed_lag_rows = Gauge(
            "tvs_feed_lag_rows", "Change-feed rows of this model not applied yet", registry=self.registry
        )
        self.uploads = Counter(
            "tvs_ingest_requests",
            "POST /videos requests by source and outcome",
            ["source", "outcome"],
            registry=self.registry,
        )

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.search_stage.labels(stage=stage).observe(seconds)

    def render(
        self,
        index_size: int,
        jobs_by_state: dict[str, int],
        index_info: tuple[str, str] | None = None,
        feed_lag: tuple[float, int] = (0.0, 0),
    ) -> bytes:
        """`index_info`: (device, factory) of the index, None before it is open; `feed_lag`: (seconds, rows)."""
        self.index_size.set(index_size)
        self.feed_lag_seconds.set(feed_lag[0])
        self.feed_lag_rows.set(feed_lag[1])
        self.index_info.clear()  # one series: the index moves (a rebuild) or falls back, the old label goes
        if index_info is not None:
            self.index_info.labels(device=index_info[0], factory=index_info[1]).set(1)
        for state, n in jobs_by_state.items():
            self.jobs.labels(state=state).set(n)
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Times every HTTP request, labelled by its route template (so /videos/12 and /videos/13 share one)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self._metrics()
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            metrics.requests.labels(
                method=scope["method"], route=_route_template(scope), status=str(status)
            ).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    # The router records the matched route in the (shared) scope while handling the request.
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "<unmatched>"
