"""/metrics on a port of its own (TVS_METRICS_PORT): a second small uvicorn server in a thread of the API."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.errors import AppError, UserError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class MetricsServerError(AppError, UserError, RuntimeError):
    """The metrics port could not be bound or served."""


class MetricsServer:
    """Serves GET /metrics, and nothing else, on host:port, for a scraper on a private network.

    Its own thread and event loop: uvicorn listens for signals only in the main thread, so the main
    server keeps handling SIGTERM, and a slow scrape never waits on the API's loop.
    """

    def __init__(self, render: Callable[[], bytes], host: str, port: int) -> None:
        self._render = render
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _app(self) -> Starlette:
        async def metrics(request: Request) -> Response:
            body = await run_in_threadpool(self._render)  # counting the jobs reads the catalog
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])

    def start(self) -> None:
        """Bind (a taken port fails here, with its address) and serve; blocks until it listens."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise MetricsServerError(
                f"cannot serve /metrics on {self.host}:{self.port} (TVS_METRICS_HOST, TVS_METRICS_PORT): {e}"
            ) from e
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="metrics-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise MetricsServerError(f"the /metrics server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        logger.info("serving /metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
        self._server = self._thread = None
