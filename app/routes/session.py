"""POST /session: trade a key for an HttpOnly cookie, so a browser's <video> and <img> tags can read."""

from __future__ import annotations

import logging
import time
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from app.access import SESSION_COOKIE, Access, issue_session
from app.deps import WRITE_PROBLEMS, KeysDep, PresentedKey, SettingsDep, unauthorized

logger = logging.getLogger(__name__)

router = APIRouter(tags=["access"])


class SessionPublic(BaseModel):
    access: Literal["read", "write"] = Field(description="what the presented key may do")
    expires_in_s: int | None = Field(
        description="seconds the session cookie reads for; null when no key is configured (no cookie)"
    )


@router.post(
    "/session",
    response_model=SessionPublic,
    responses={401: WRITE_PROBLEMS[401]},
    summary="Start a browser session: the key in a header sets a read-only HttpOnly cookie",
)
def start_session(
    request: Request, response: Response, presented: PresentedKey, keys: KeysDep, settings: SettingsDep
) -> SessionPublic:
    if keys.write is None:
        return SessionPublic(access="write", expires_in_s=None)
    level = keys.access_for(presented)
    if level is Access.NONE:
        raise unauthorized(presented)
    ttl = settings.session_ttl_s
    # The cookie only ever reads (writes need the header), and SameSite=Strict keeps other sites' pages
    # from sending it at all.
    response.set_cookie(
        SESSION_COOKIE,
        issue_session(keys.session_secret(), time.time(), ttl),
        max_age=ttl,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return SessionPublic(access="write" if level is Access.WRITE else "read", expires_in_s=ttl)
