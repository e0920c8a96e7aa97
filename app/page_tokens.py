"""Search page tokens: an opaque cursor (base64url JSON) holding a position, bound to one search."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from typing import Any

from app.errors import AppError, UserError

logger = logging.getLogger(__name__)

MAX_RESULT_DEPTH = 1000  # paging stops at this many results: deeper ones are not worth ranking
TOKEN_VERSION = 1


class PageTokenError(AppError, UserError, ValueError):
    """A page_token this service did not issue, issued for another search, or past the depth limit."""

    code = "bad_page_token"


def search_digest(fields: dict[str, Any]) -> str:
    """What a token is bound to: every request field that changes which hits exist or their order."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(offset: int, digest: str) -> str:
    payload = json.dumps({"v": TOKEN_VERSION, "o": offset, "s": digest}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, digest: str) -> int:
    """The position a token resumes at; PageTokenError when it is not one of ours for this search.

    Not signed: it carries only a position, which a client could ask for with `limit` anyway, and the
    digest that keeps a token from being replayed against a different query, filter or cut-off.
    """
    not_ours = PageTokenError(
        "page_token is not a token this service issued: send back the next_page_token of the previous "
        "response unchanged, or leave page_token out for the first page"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError) as e:
        raise not_ours from e
    if not isinstance(data, dict) or data.get("v") != TOKEN_VERSION or set(data) != {"v", "o", "s"}:
        raise not_ours
    offset = data["o"]
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 1:
        raise not_ours
    if data["s"] != digest:
        raise PageTokenError(
            "page_token belongs to another search: the query, filter, rerank, group_by, min_score or the "
            "model differ from the search that issued it; leave page_token out to start from the first page"
        )
    if offset >= MAX_RESULT_DEPTH:
        raise PageTokenError(
            f"page_token points past result {MAX_RESULT_DEPTH}, the deepest a search pages; "
            "narrow the search (words, filter, min_score) instead"
        )
    return offset
