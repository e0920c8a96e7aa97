"""GET /openapi.json, /docs and /redoc: the API reference, behind the same access as the library's reads."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.deps import ReadAccess

logger = logging.getLogger(__name__)

OPENAPI_URL = "/openapi.json"

# A browser opens these with the session cookie the demo page sets (POST /session), a client with the key.
router = APIRouter(include_in_schema=False, dependencies=[ReadAccess])


def _openapi_url(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + OPENAPI_URL


@router.get(OPENAPI_URL)
def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    # persistAuthorization: the key given to Authorize survives a reload of the page.
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_ui_parameters={"persistAuthorization": True},
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_openapi_url(request), title=f"{request.app.title} - ReDoc")
