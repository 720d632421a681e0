"""What the service reports about itself: readiness (`WorkerBoard`, read by ``/health``) and
Prometheus metrics (``/metrics``: requests by route and status, latency by route, the model and
its load time, the workers), summed over every worker process.

The worker processes of `recsys.serve.workers` write their metrics into the folder named by
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode), which the parent makes
before it starts them; a scrape answered by any worker adds up every worker's files. An app
served in one process without the parent keeps its metrics in memory."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from multiprocessing.sharedctypes import SynchronizedArray

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys.serve.dependencies import check_api_key

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

# the metrics of this process (in multiprocess mode their values live in files)
REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "recsys_requests",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "recsys_request_duration_seconds",
    "Time from a request's start to its response's end, by method and route template",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LOAD_SECONDS = Gauge(
    "recsys_model_load_seconds",
    "Seconds a worker took to load its checkpoint and build its app",
    registry=REGISTRY,
    multiprocess_mode="liveall",  # one series per live worker (label pid)
)
MODEL_INFO = Gauge(
    "recsys_model_info",
    "The model the workers serve (value 1): class, variant, data source, checkpoint file",
    ["net", "variant", "source", "checkpoint"],
    registry=REGISTRY,
    multiprocess_mode="livemax",  # the models of live workers: two during a rolling reload
)


class WorkerBoard:
    """Which worker slots accept connections, and how often each was restarted: a shared
    array that the parent writes (a slot is ready once its worker said so, not ready once it
    died) and every worker's ``/health`` and ``/metrics`` read."""

    def __init__(self, array: SynchronizedArray):
        self.array = array
        self.workers = len(array) // 2

    @classmethod
    def create(cls, context, workers: int) -> WorkerBoard:
        """A board for ``workers`` slots in shared memory of ``context`` (a multiprocessing
        context), handed to the workers as they start."""
        return cls(context.Array("i", 2 * workers))

    @property
    def ready(self) -> int:
        return sum(self.array[: self.workers])

    def set_ready(self, slot: int, ready: bool) -> None:
        self.array[slot] = int(ready)

    def restarted(self, slot: int) -> None:
        with self.array.get_lock():
            self.array[self.workers + slot] += 1

    @property
    def restarts(self) -> list[int]:
        return list(self.array[self.workers :])


def health(app: FastAPI) -> JSONResponse:
    """200 ``{"status": "ok", "workers": N, "ready": N}`` when every worker accepts
    connections, else 503 with ``"status": "not ready"``; an app served without the parent
    of `recsys.serve.workers` (no board) is one worker, ready."""
    board: WorkerBoard | None = getattr(app.state, "board", None)
    workers, ready = (board.workers, board.ready) if board is not None else (1, 1)
    ok = ready == workers
    return JSONResponse(
        {"status": "ok" if ok else "not ready", "workers": workers, "ready": ready},
        status_code=200 if ok else 503,
    )


class BoardCollector:
    """The board's figures at scrape time: workers, ready workers, restarts per slot."""

    def __init__(self, board: WorkerBoard):
        self.board = board

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("recsys_workers", "Worker processes configured", self.board.workers)
        yield GaugeMetricFamily(
            "recsys_workers_ready", "Worker processes accepting connections", self.board.ready
        )
        restarts = CounterMetricFamily(
            "recsys_worker_restarts", "Workers restarted after they died, by slot", labels=["slot"]
        )
        for slot, count in enumerate(self.board.restarts):
            restarts.add_metric([str(slot)], count)
        yield restarts


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus' text format: every worker's metrics added up (multiprocess mode), or this
    process's own."""
    if os.environ.get(MULTIPROC_DIR):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    extra: CollectorRegistry | None = getattr(request.app.state, "board_registry", None)
    if extra is not None:
        body += generate_latest(extra)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts each HTTP request by method, route template (``/recommend``, not its query;
    ``unmatched`` for paths without a route) and status, and times it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # an exception that escapes is a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on a match
            path = getattr(route, "path", "unmatched")
            method = scope["method"]
            REQUESTS.labels(method, path, str(status)).inc()
            LATENCY.labels(method, path).observe(time.perf_counter() - start)


def instrument(
    app: FastAPI,
    metrics_public: bool = False,
    board: WorkerBoard | None = None,
    load_seconds: float | None = None,
) -> None:
    """Add the metrics middleware and ``/metrics`` (behind the app's API key unless
    ``metrics_public``) to ``app``; record its model and ``load_seconds``; ``board``: the
    parent's `WorkerBoard`, which ``/health`` and ``/metrics`` read."""
    app.add_middleware(MetricsMiddleware)
    app.include_router(router, dependencies=[] if metrics_public else [Depends(check_api_key)])
    if board is not None:
        app.state.board = board
        app.state.board_registry = CollectorRegistry(auto_describe=True)
        app.state.board_registry.register(BoardCollector(board))
    rec = app.state.recommender
    model = rec.metadata()["model"]
    MODEL_INFO.labels(
        model["net"].rsplit(".", 1)[-1], model.get("variant") or "", rec.source, rec.ckpt_path.name
    ).set(1)
    if load_seconds is not None:
        LOAD_SECONDS.set(load_seconds)
