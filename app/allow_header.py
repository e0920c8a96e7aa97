"""405 answers whose `Allow` header lists every method of the path, not just those of the first route matched.

Starlette answers 405 from the first route whose path matches; `/videos` is two routes (GET and POST), so its
405 said `Allow: POST` alone. RFC 9110 asks for every method the resource supports: they are read from the
app's own OpenAPI document, the contract clients see.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import http_error

_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _path_methods(app: FastAPI) -> list[tuple[re.Pattern[str], list[str]]]:
    cached = getattr(app.state, "path_methods", None)
    if cached is None:
        cached = []
        for template, item in app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            methods = sorted(m.upper() for m in item if m in _HTTP_METHODS)
            cached.append((re.compile(f"^{pattern}$"), methods))
        app.state.path_methods = cached
    return cached


def allowed_methods(request: Request) -> list[str]:
    """Every documented method at this request's path (empty for paths the OpenAPI document does not list)."""
    path = request.url.path
    methods: set[str] = set()
    for pattern, listed in _path_methods(request.app):
        if pattern.match(path):
            methods.update(listed)
    return sorted(methods)


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    methods = allowed_methods(request)
    if methods:
        headers = {**(exc.headers or {}), "Allow": ", ".join(methods)}
        exc = StarletteHTTPException(exc.status_code, exc.detail, headers=headers)
    return await http_error(request, exc)
