"""The request id (X-Request-ID, taken when sane, else made) on every log line of a request, and one access line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body
from indexer.log_setup import request_id

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A proxy's or client's id is kept only when it cannot forge log lines or bloat them.
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _SANE_ID.fullmatch(text) else None
    return None


class RequestLogMiddleware:
    """Sets the request id for the request's context, echoes it in X-Request-ID, logs method/path/status/ms.

    An exception no handler took is logged here, with its traceback and the request id, and answered with a
    JSON 500 (`code` internal_error) that carries the same id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if started:
                raise  # the response is half sent: only the server can end it
            detail = f"internal error; the service's log has the details under request id {rid}"
            await JSONResponse(error_body("internal_error", detail), 500)(scope, receive, send_with_id)
        finally:
            ms = (time.perf_counter() - start) * 1000
            method, path = scope["method"], scope["path"]
            access_logger.info(
                "%s %s %d %.1f ms",
                method,
                path,
                status,
                ms,
                extra={"method": method, "path": path, "status": status, "duration_ms": round(ms, 2)},
            )
            request_id.reset(token)
