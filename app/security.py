"""Security headers for every response (the CSP for the demo page) and a limit on JSON request bodies."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body

logger = logging.getLogger(__name__)

# The demo page loads only its own script, style and media; no inline script, no third parties.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
_ALWAYS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_PAGE = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeadersMiddleware:
    """Adds nosniff/referrer headers to every response and the CSP to the demo page and its files."""

    def __init__(self, app: ASGIApp, page_paths: tuple[str, ...] = ("/", "/static/")) -> None:
        self.app = app
        self.page_paths = page_paths

    def _is_page(self, path: str) -> bool:
        return any(
            path == p if not p.endswith("/") or p == "/" else path.startswith(p) for p in self.page_paths
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _ALWAYS + (_PAGE if self._is_page(scope["path"]) else [])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (n, v) for n, v in extra if n not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


MAX_JSON_BODY_BYTES = 1024 * 1024  # a search or an ingest-by-path/URL request is a few hundred bytes


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413 before they are read whole (uploads excepted).

    Multipart uploads stream to disk under their own limit (TVS_MAX_UPLOAD_BYTES). Every other body is
    JSON that the app parses in memory: without this, a 16 MiB search body is read in full to answer 422.
    A declared Content-Length is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit():
            # The server frames the body by its Content-Length: it cannot carry more than declared.
            if int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # Chunked, no length: read it here (at most max_bytes + one chunk), then hand it on.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        buffered = iter(messages)

        async def replay() -> Message:
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = (
            f"the request body is larger than {self.max_bytes} bytes; send a short JSON body, "
            "or upload video files as multipart/form-data"
        )
        await JSONResponse(error_body("body_too_large", detail), status_code=413)(scope, receive, send)
