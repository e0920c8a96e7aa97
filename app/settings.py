"""Service settings: the shared `TVS_*` settings (indexer.settings) plus the service's own."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from indexer.settings import DEMO_MODEL_DIR, SharedSettings, default_model

logger = logging.getLogger(__name__)

__all__ = ["DEMO_MODEL_DIR", "Settings", "default_model"]

MIN_PRODUCTION_KEY_LENGTH = 16


def _split_list(value: Any) -> Any:
    # Accept a JSON list or a comma-separated string, since both are natural in an env file.
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(SharedSettings):
    """Everything the API process reads (prefix `TVS_`, then `.env`): the shared settings and these."""

    env: Literal["development", "production"] = "development"
    # --- Access (README "Access"; app/access.py) ---
    # With a key configured every route but /health and the demo page's files needs one. api_key may
    # do everything; read_api_key may search, list and watch but not add or delete.
    api_key: SecretStr | None = None
    read_api_key: SecretStr | None = None
    # A public archive: search, the video list and details, media, thumbnails and /docs need no key
    # (jobs, /metrics and writes still do).
    public_read: bool = False
    # Lifetime of the HttpOnly cookie POST /session sets, with which a browser's <video> and <img> tags
    # read media and thumbnails (they cannot send a header).
    session_ttl_s: int = Field(default=12 * 3600, ge=60)
    # /metrics on a second server of its own (then absent from the main port); None: on the main port.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # --- end of Access ---
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    allow_private_urls: bool = False
    url_timeout_s: float = Field(default=30.0, gt=0)
    url_max_duration_s: float = Field(default=900.0, gt=0)
    url_max_redirects: int = Field(default=5, ge=0)
    index_factory: str = "Flat"
    top_k: int | None = Field(default=None, ge=1)  # None: the model's own k
    # 1 turns micro-batching off. 8 rather than larger: with many clients two batches overlap (one encodes
    # while the next one's requests arrive), which bench/search.py measured faster on a 2-core CPU than
    # one batch of everyone in lock-step; on a GPU a larger batch pays.
    batch_max_size: int = Field(default=8, ge=1)
    batch_max_wait_ms: float = Field(default=3.0, ge=0)
    worker: bool = True
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    follow_interval_s: float = Field(default=0.25, gt=0)
    # /health answers 503 while the oldest change this replica has not applied is older than this.
    max_feed_lag_s: float = Field(default=5.0, gt=0)
    # Start-up replays the change feed for at most this long before serving; the follower thread replays
    # the rest while /health answers 503 with the lag.
    feed_catch_up_s: float = Field(default=30.0, ge=0)

    @field_validator("allowed_roots", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("api_key", "read_api_key", mode="before")
    @classmethod
    def _blank_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_read_key(self) -> Settings:
        if self.read_api_key is None:
            return self
        if self.api_key is None:
            raise ValueError(
                "TVS_READ_API_KEY is set but TVS_API_KEY is not: set the write key too, or the read key "
                "would guard nothing (without TVS_API_KEY every route is open)"
            )
        if self.read_api_key.get_secret_value() == self.api_key.get_secret_value():
            raise ValueError("TVS_READ_API_KEY must differ from TVS_API_KEY (the write key)")
        return self

    @property
    def reads_are_public(self) -> bool:
        """Whether search, the video list, media, thumbnails and /docs answer without a key."""
        return self.api_key is None or self.public_read

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env == "production":
            key = self.api_key.get_secret_value() if self.api_key else ""
            if len(key) < MIN_PRODUCTION_KEY_LENGTH:
                raise ValueError(
                    "TVS_ENV=production needs TVS_API_KEY set to a secret of at least "
                    f"{MIN_PRODUCTION_KEY_LENGTH} characters (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`); refusing to start with open write endpoints"
                )
            read_key = self.read_api_key.get_secret_value() if self.read_api_key else None
            if read_key is not None and len(read_key) < MIN_PRODUCTION_KEY_LENGTH:
                raise ValueError(
                    f"TVS_ENV=production needs TVS_READ_API_KEY to be at least {MIN_PRODUCTION_KEY_LENGTH} "
                    "characters too (or unset)"
                )
            if "*" in self.cors_origins:
                raise ValueError("TVS_CORS_ORIGINS='*' is not allowed in production; list the origins")
        return self

    @property
    def resolved_roots(self) -> list[Path]:
        return [root.expanduser().resolve() for root in self.allowed_roots]
