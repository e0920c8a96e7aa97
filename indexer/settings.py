"""Settings the `indexer` CLI and the service share: one pydantic-settings class (`TVS_*`, `.env`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

logger = logging.getLogger(__name__)

# Beside the code, not in the current directory: the API and the CLI resolve the same model wherever they start.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
ENV_FILE_VAR = "TVS_ENV_FILE"  # which dotenv file to read (default `.env`; empty: none)
DEFAULT_ENV_FILE = ".env"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def default_model() -> str:
    """The bundled demo checkpoint when it is installed beside the code, else the small random-weight preset."""
    return str(DEMO_MODEL_DIR) if (DEMO_MODEL_DIR / "config.json").is_file() else "small"


def env_file() -> str | None:
    """The dotenv file both processes read, looked up when settings are made (so tests and tools can turn it off)."""
    return os.environ.get(ENV_FILE_VAR, DEFAULT_ENV_FILE) or None


class SharedSettings(BaseSettings):
    """What the `indexer` CLI and the API both read (env prefix `TVS_`, then `.env`); the service extends it."""

    model_config = SettingsConfigDict(env_prefix="TVS_", extra="ignore", protected_namespaces=())

    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/catalog.db
    # An older PostgreSQL schema is upgraded at start-up only when this is true (SQLite always is, after
    # a backup copy); otherwise `indexer migrate` does it, once, as a release step.
    auto_migrate: bool = False
    model: str = Field(default_factory=default_model)
    device: str | None = None  # None: CUDA when present, else CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1)  # None: torch's default (all cores)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        dotenv = DotEnvSettingsSource(settings_cls, env_file=env_file())
        return init_settings, env_settings, dotenv, file_secret_settings

    @field_validator("model", "device", "database_url", mode="before")
    @classmethod
    def _blank_is_default(cls, value: Any, info: Any) -> Any:
        # `TVS_MODEL=` in an env file (or an image built without a baked model) means "the default".
        if isinstance(value, str) and not value.strip():
            return default_model() if info.field_name == "model" else None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        device = value.strip().lower()
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N")
        return device

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()
