"""Who may call what: the write and read-only API keys, compared in constant time, and browser session tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from dataclasses import dataclass
from enum import IntEnum

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
SESSION_COOKIE = "tvs_session"
_SESSION_CONTEXT = b"tvs-browser-session-v1"


class Access(IntEnum):
    """What a request may do; a higher level includes the lower ones."""

    NONE = 0
    READ = 1  # search, list, watch (the read-only key, or a browser session cookie)
    WRITE = 2  # also add and delete videos (the write key)


@dataclass(frozen=True)
class Keys:
    """The configured keys; `write` None means no key is configured and every route is open."""

    write: str | None
    read: str | None = None

    def access_for(self, presented: str | None) -> Access:
        """The level a presented key grants: both keys are compared, in constant time, whatever matches."""
        if self.write is None:
            return Access.WRITE
        if presented is None:
            return Access.NONE
        given = presented.encode()
        is_write = hmac.compare_digest(given, self.write.encode())
        is_read = self.read is not None and hmac.compare_digest(given, self.read.encode())
        if is_write:
            return Access.WRITE
        return Access.READ if is_read else Access.NONE

    def session_secret(self) -> bytes:
        """The key that signs session cookies: derived from both keys, so every replica agrees and
        rotating either key ends every session."""
        assert self.write is not None
        material = _SESSION_CONTEXT + b"\0" + (self.read or "").encode()
        return hmac.new(self.write.encode(), material, hashlib.sha256).digest()


def _signature(secret: bytes, expires: int) -> str:
    mac = hmac.new(secret, _SESSION_CONTEXT + b"\0" + str(expires).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issue_session(secret: bytes, now: float, ttl_s: int) -> str:
    """A cookie value `<expiry>.<signature>`: it grants read access until the expiry (unix seconds)."""
    expires = int(now) + ttl_s
    return f"{expires}.{_signature(secret, expires)}"


def session_is_valid(secret: bytes, token: str | None, now: float) -> bool:
    if not token:
        return False
    expires_text, _, signature = token.partition(".")
    if not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    good = hmac.compare_digest(signature.encode(), _signature(secret, expires).encode())
    return good and now < expires
