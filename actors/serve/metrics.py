"""Prometheus metrics of the ingress: request counts and latency histograms per route.

Why our own (``prometheus_client``) next to Ray Serve's built-in ``ray_serve_*`` metrics: those
are exported by Ray's metrics agent on its own port, per deployment, and need the cluster's
Prometheus set-up; ``GET /metrics`` here answers on the app's port, per route template and
status. Each ingress replica counts its own requests (a registry per replica): a scraper behind
several replicas sums them, as with any multi-process server.
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from starlette.responses import Response

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouteMetrics:
    """``bmray_http_requests_total{route,method,status}`` and
    ``bmray_http_request_seconds{route,method}`` in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("bmray_http_requests", "HTTP requests answered",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("bmray_http_request_seconds", "HTTP request latency",
                                 ("route", "method"), buckets=LATENCY_BUCKETS,
                                 registry=self.registry)

    def install(self, app: FastAPI) -> None:
        """Time every request of ``app`` and serve the registry at ``GET /metrics``."""

        @app.middleware("http")
        async def observe(request: Request,
                          call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            start = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            # The route template (/v1/search), never the raw path: unknown paths share one label.
            name = getattr(route, "path", None) or "unmatched"
            self.requests.labels(name, request.method, str(response.status_code)).inc()
            self.latency.labels(name, request.method).observe(time.perf_counter() - start)
            return response

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
